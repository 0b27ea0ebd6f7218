"""The registered op's autograd, on the CPU, through the same registration the GPU uses.

``torch.ops.frem.scale_channels`` carries its own backward (``dx = op(dy, scale)``).
On a CPU nothing in frem calls the op (small and CPU tensors take plain torch
ops), so these tests call it directly: once with its CPU kernel, once with the
Triton kernels forced in as the CPU kernel, run by the interpreter
(``TRITON_INTERPRET=1``, set by conftest without a GPU).
"""

import pytest
import torch
from conftest import KERNEL_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_close_to_reference, feature_maps, reference, scales

import frem.kernels.scale_channels as k


@pytest.fixture(params=["torch kernel", "triton kernels"])
def registered(request, monkeypatch):
    """The op, its CPU kernel either its own or the Triton launcher (interpreted without a GPU)."""
    op = k.op()
    if request.param == "triton kernels":
        if KERNEL_DEVICE != "cpu":
            pytest.skip("on CUDA the op runs the Triton kernels anyway (test_cuda.py)")
        op.register_kernel("cpu")(lambda x, scale: k.launch_scale_channels(x, scale, torch.empty_like(x)))
        yield op
        op.register_kernel("cpu")(k._scale_channels_torch)
    else:
        yield op


def test_gradcheck_and_gradgradcheck_in_float64(registered):
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 632.0, 1.0 / 3.0, 250.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: registered(t, scale), (x,))
    assert torch.autograd.gradgradcheck(lambda t: registered(t, scale), (x,))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_backward_matches_the_reference_in_every_dtype(data):
    op = k.op()
    x = data.draw(feature_maps(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)))
    scale = data.draw(scales(x.shape[1]))
    if x.dtype == torch.float64:
        scale = scale.double()
    x = x.detach().requires_grad_(True)
    y = op(x, scale)
    assert_close_to_reference(y, reference(x.detach(), scale).to(x.dtype).double(), x.dtype)
    grad = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    y.backward(grad)
    assert_close_to_reference(x.grad, reference(grad, scale).to(x.dtype).double(), x.dtype)


@pytest.mark.parametrize("grad_kind", ["dense", "expanded", "sliced", "channels_last"])
def test_the_ops_backward_scales_the_gradient_by_the_channel_scale(registered, grad_kind):
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    scale = torch.tensor([1.0, 632.0, 2.0, 250.0])
    grad = {"dense": lambda: torch.randn(x.shape),
            "expanded": lambda: torch.full((1, 1, 1, 1), 2.0).expand(x.shape),  # what y.sum() sends back
            "sliced": lambda: torch.randn(3, 4, 5, 12)[..., ::2],
            "channels_last": lambda: torch.randn(x.shape).contiguous(memory_format=torch.channels_last)}[grad_kind]()
    registered(x, scale).backward(grad)
    assert torch.equal(x.grad, grad * scale.view(1, -1, 1, 1))


@pytest.mark.parametrize("shape", [(2, 5, 6, 4), (2, 49, 4), (1, 2, 3, 4, 4)])
def test_channels_last_maps_and_tokens_reach_the_kernels_as_a_permuted_view(registered, shape):
    """What scale_channels(x, scale, dim=-1) hands the op: (N, C, ...) with the channels innermost in
    memory, which the dense kernel serves (its column orientation), forward and backward, no copy."""
    x = torch.randn(shape, requires_grad=True)
    scale = torch.tensor([1.0, 632.0, 2.0, 250.0])
    moved = x.movedim(-1, 1)
    assert moved.stride(1) == 1 and not k.tile_plan(moved, torch.empty_like(moved))["ROW_CHANNEL"]
    y = registered(moved, scale).movedim(1, -1)
    assert y.is_contiguous() and torch.equal(y, x * scale)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, scale.expand(shape))


def test_float64_keeps_a_float64_scale_exactly(registered):
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    scale = torch.tensor([1.0 / 3.0, 632.0 + 1e-9, 0.1], dtype=torch.float64)  # not representable in float32
    assert torch.equal(registered(x, scale), x * scale.view(1, -1, 1))
    assert torch.equal(k.scale_channels(x, scale), x * scale.view(1, -1, 1))
