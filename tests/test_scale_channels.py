"""frem.scale_channels against a float64 reference: forward, backward, compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_close_to_reference, feature_maps, maps_with_channel_dim, reference, scales

import frem
import frem.kernels.scale_channels as k
from frem.kernels.scale_channels import op, scale_channels

SETTINGS = settings(max_examples=80, deadline=None)


@SETTINGS
@given(data=st.data())
def test_forward_and_backward_match_float64_reference(data):
    x = data.draw(feature_maps()).requires_grad_(True)
    scale = data.draw(scales(x.shape[1]))
    y = frem.scale_channels(x, scale)
    assert_close_to_reference(y, reference(x.detach(), scale).to(x.dtype).double(), x.dtype)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        # memory format kept, never a bare .contiguous() (strides of size-1 dims mean nothing)
        assert [st for st, n in zip(y.stride(), y.shape) if n > 1] == \
            [st for st, n in zip(x.stride(), x.shape) if n > 1]

    grad = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    y.backward(grad)
    assert_close_to_reference(x.grad, reference(grad, scale).to(x.dtype).double(), x.dtype)


@SETTINGS
@given(data=st.data())
def test_channels_in_another_dim_match_float64_reference_forward_and_backward(data):
    """Channels last (N, *spatial, C), tokens (N, L, C) and any other dim: the op on a permuted view."""
    x, dim = data.draw(maps_with_channel_dim())
    x.requires_grad_(True)
    scale = data.draw(scales(x.shape[dim]))
    y = frem.scale_channels(x, scale, dim=dim)
    assert_close_to_reference(y, reference(x.detach(), scale, dim).to(x.dtype).double(), x.dtype)
    if x.is_contiguous():  # an (N, H, W, C) or (N, L, C) tensor stays contiguous: no copy, no reorder
        assert y.is_contiguous()
    grad = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    y.backward(grad)
    assert_close_to_reference(x.grad, reference(grad, scale, dim).to(x.dtype).double(), x.dtype)


def test_a_channel_dim_that_is_not_one_is_refused_by_name():
    x = torch.randn(2, 5, 3)
    for bad in (0, 3, -3, True, 1.0):
        with pytest.raises(ValueError, match=r"dim must name a channel dim of x \(1 to 2, or -1 to -2; 0 is the batch\)"):
            frem.scale_channels(x, torch.ones(3), dim=bad)
    with pytest.raises(ValueError, match=r"scale must have shape \(C,\) = \(3,\)"):
        frem.scale_channels(x, torch.ones(5), dim=-1)


def test_gradcheck_with_the_channels_last():
    scale = torch.tensor([1.0, 632.0, 0.5], dtype=torch.float64)
    for shape in [(2, 5, 3), (1, 4, 2, 3), (2, 2, 2, 2, 3)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: frem.scale_channels(t, scale, dim=-1), (x,))
        assert torch.autograd.gradgradcheck(lambda t: frem.scale_channels(t, scale, dim=-1), (x,))


@SETTINGS
@given(data=st.data())
def test_backward_with_expanded_and_strided_gradients(data):
    """The gradient of y.sum() is stride-0 expanded; others arrive sliced."""
    x = data.draw(feature_maps(dtypes=(torch.float32,))).requires_grad_(True)
    scale = data.draw(scales(x.shape[1]))
    value = data.draw(st.floats(-100, 100, allow_nan=False))
    grad = torch.full((1,) * x.dim(), value).expand(x.shape)  # every stride 0
    frem.scale_channels(x, scale).backward(grad)
    assert_close_to_reference(x.grad, reference(grad, scale).float().double(), torch.float32)
    x.grad = None
    frem.scale_channels(x, scale).sum().backward()
    assert_close_to_reference(x.grad, reference(torch.ones_like(x), scale).float().double(),
                              torch.float32)


def test_gradcheck_float64():
    scale = torch.tensor([1.0, 632.0, 0.5, 1.0], dtype=torch.float64)
    for shape in [(2, 4), (2, 4, 3), (1, 4, 3, 2), (2, 4, 2, 2, 2)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: frem.scale_channels(t, scale), (x,))
        assert torch.autograd.gradgradcheck(lambda t: frem.scale_channels(t, scale), (x,))


def test_scale_gets_no_gradient():
    scale = torch.full((3,), 2.0, requires_grad=True)
    x = torch.randn(2, 3, 4, requires_grad=True)
    frem.scale_channels(x, scale).sum().backward()
    assert scale.grad is None and torch.equal(x.grad, torch.full_like(x, 2.0))


def test_compile_fullgraph_forward_and_backward():
    scale = torch.tensor([1.0, 250.0, 1.0])

    def f(x):
        return (frem.scale_channels(torch.relu(x), scale) * 2).sum()

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    expected = x.detach().clone().requires_grad_(True)
    f(expected).backward()
    assert torch.allclose(loss, f(x.detach()))
    assert torch.allclose(x.grad, expected.grad)


def test_compile_fullgraph_with_the_channels_last_traces_one_graph():
    """Channels last and tokens under torch.compile(fullgraph=True): the moved view traces, no graph break."""
    import torch._dynamo
    scale = torch.tensor([1.0, 250.0, 1.0])
    for shape in [(2, 5, 5, 3), (2, 49, 3)]:
        torch._dynamo.reset()
        counts = torch._dynamo.utils.counters
        counts.clear()

        def f(x):
            return (frem.scale_channels(torch.relu(x), scale, dim=-1) * 2).sum()

        x = torch.randn(shape, requires_grad=True)
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        loss.backward()
        expected = x.detach().clone().requires_grad_(True)
        f(expected).backward()
        assert torch.allclose(loss, f(x.detach())) and torch.allclose(x.grad, expected.grad)
        assert counts["stats"]["unique_graphs"] == 1


def test_fake_and_meta_keep_memory_format():
    x = torch.empty(2, 3, 4, 4, device="meta").contiguous(memory_format=torch.channels_last)
    y = op()(x, torch.empty(3, device="meta"))
    assert y.shape == x.shape and y.stride() == x.stride()


@pytest.mark.parametrize("x, scale, message", [
    (torch.randn(4), torch.ones(4), "2 to 5 dims"),
    (torch.randn(1, 2, 1, 1, 1, 1), torch.ones(2), "2 to 5 dims"),
    (torch.ones(2, 3, dtype=torch.int64), torch.ones(3), "supports"),
    (torch.randn(2, 3, 4), torch.ones(4), r"shape \(C,\) = \(3,\)"),
    (torch.randn(2, 3, 4), torch.ones(1, 3), r"shape \(C,\) = \(3,\)"),
])
def test_bad_input_is_named(x, scale, message):
    with pytest.raises((ValueError, TypeError), match=message):
        frem.scale_channels(x, scale)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_half_precision_is_one_rounding_of_the_fp32_product_bit_for_bit(data):
    """CPU and small-tensor path: exactly ``(x.float() * scale).to(dtype)``, never rounded twice
    (a scale such as 10000 or 0.1 is not exact in bf16/fp16; 632 and 250 are)."""
    x = data.draw(feature_maps(dtypes=(torch.bfloat16, torch.float16)))
    scale = data.draw(scales(x.shape[1]))
    expected = (x.float() * scale.view((1, -1) + (1,) * (x.dim() - 2))).to(x.dtype)
    y = frem.scale_channels(x, scale)
    assert torch.equal(y, expected)


def test_cpu_tensors_of_any_size_take_plain_torch_ops_never_the_registered_op(monkeypatch):
    """The op's dispatch costs tens of microseconds and buys nothing on a CPU: CPU tensors, above
    the kernel's size threshold too, must never reach it."""
    def refuse():
        raise AssertionError("scale_channels called the registered op for a CPU tensor")

    monkeypatch.setattr(k, "op", refuse)
    scale = torch.tensor([2.0, 0.5, 632.0, 1.0])
    for shape in [(1, 4, 8, 8), (1, 4, 1024, 1025)]:  # below and above KERNEL_MIN_NUMEL
        x = torch.randn(shape)
        assert x.numel() != k.KERNEL_MIN_NUMEL
        torch.testing.assert_close(scale_channels(x, scale), x * scale.view(1, -1, 1, 1), rtol=0, atol=0)


def test_the_scale_is_rounded_to_float32_first_for_float32_and_half_inputs():
    """As the kernels do: a float64 scale is cast to fp32 before the product (fp64 only for fp64 x)."""
    scale = torch.tensor([1 / 3, 2 / 3, 632.1234567891], dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5)
    expected = x * scale.float().view(1, -1, 1, 1)
    assert torch.equal(scale_channels(x, scale), expected)
    assert not torch.equal((x.double() * scale.view(1, -1, 1, 1)).float(), expected)  # the cast shows
    x64 = x.double()
    assert torch.equal(scale_channels(x64, scale), x64 * scale.view(1, -1, 1, 1))


def test_a_scale_on_another_device_moves_to_the_features_device():
    x = torch.empty(2, 3, 4, 4, device="meta")
    y = scale_channels(x, torch.ones(3))
    assert y.device.type == "meta" and y.shape == x.shape
