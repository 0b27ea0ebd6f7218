"""The CUDA paths: the op's kernels through the registered op, compile, and devices other than cuda:0.

These run wherever CUDA exists and skip cleanly elsewhere (the same kernels
run on CPU under the interpreter in test_kernels.py).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_close_to_reference, feature_maps, reference, scales

import frem
import frem.kernels.scale_channels as op

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_op_forward_and_backward_on_cuda(data):
    x = data.draw(feature_maps()).cuda().requires_grad_(True)
    scale = data.draw(scales(x.shape[1])).cuda()
    y = op.op()(x, scale)  # the Triton kernels, whatever the size
    assert_close_to_reference(y, reference(x.detach().cpu(), scale.cpu()).to(x.dtype).double(), x.dtype)
    grad = torch.randn(x.shape, dtype=torch.float64).to(x.dtype).cuda()
    y.backward(grad)
    assert_close_to_reference(x.grad, reference(grad.cpu(), scale.cpu()).to(x.dtype).double(), x.dtype)


@pytest.mark.parametrize("grad_kind", ["expanded", "sliced", "channels_last"])
def test_op_backward_with_odd_gradients_on_cuda(grad_kind):
    x = torch.randn(4, 6, 10, 12, device="cuda", requires_grad=True)
    scale = torch.tensor([1.0, 632.0, 1.0, 3.0, 1.0, 250.0], device="cuda")
    if grad_kind == "expanded":
        grad = torch.full((1, 1, 1, 1), 2.0, device="cuda").expand(x.shape)
    elif grad_kind == "sliced":
        grad = torch.randn(4, 6, 10, 24, device="cuda")[..., ::2]
    else:
        grad = torch.randn(x.shape, device="cuda").contiguous(memory_format=torch.channels_last)
    op.op()(x, scale).backward(grad)
    assert torch.allclose(x.grad, grad * scale.view(1, -1, 1, 1), rtol=2**-23, atol=0)


def test_large_tensors_take_the_kernel_and_small_ones_plain_torch(monkeypatch):
    calls = []
    real = op.op()
    monkeypatch.setattr(op, "op", lambda: lambda x, s: calls.append(x.numel()) or real(x, s))
    scale = torch.ones(512, device="cuda")
    small = torch.randn(16, 512, 8, 8, device="cuda", dtype=torch.bfloat16)
    exact = torch.randn(op.KERNEL_MIN_NUMEL // 512, 512, 1, 1, device="cuda", dtype=torch.bfloat16)
    large = torch.randn(op.KERNEL_MIN_NUMEL // 512 + 1, 512, 1, 1, device="cuda", dtype=torch.bfloat16)
    for x in (small, exact, large):
        assert torch.equal(op.scale_channels(x, scale), x)
    assert calls == [op.KERNEL_MIN_NUMEL, large.numel()]


def test_compile_channels_last_bf16_autocast_matches_eager():
    from models import tiny_unet
    torch.manual_seed(0)
    model = tiny_unet().cuda().to(memory_format=torch.channels_last)
    frem.attach(model, B=16, X=250.0)
    model.train()
    x = torch.randn(4, 1, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for m in model.modules():  # batch-norm in eval: both passes see the same statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        out_compiled, out_eager = compiled(x), model(x)
    assert out_compiled.dtype == out_eager.dtype == torch.bfloat16
    assert torch.allclose(out_compiled.float(), out_eager.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_tensor_on_the_second_gpu_is_scaled_there():
    torch.cuda.set_device(0)
    x = torch.randn(8, 4, 64, 64, device="cuda:1")
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0], device="cuda:1")
    y = op.op()(x, scale)
    assert y.device == x.device and torch.cuda.current_device() == 0
    assert torch.equal(y, x * scale.view(1, -1, 1, 1))


def test_a_checkpoint_saved_on_the_gpu_loads_onto_the_cpu(tmp_path):
    """evaluate and predict run on machines without the GPU a run trained on."""
    checkpoint = pytest.importorskip("frem.seg.checkpoint")
    state = {"config": {}, "model": {"w": torch.ones(2, device="cuda")}, "classes": ["a"], "in_channels": 1,
             "normalization": {}}
    checkpoint.save(state, tmp_path / "best.pt")
    assert checkpoint.load(tmp_path / "best.pt")["model"]["w"].device.type == "cpu"


def test_a_tiny_run_trains_resumes_and_scores_on_the_gpu(tiny_config):
    """The trainer's device paths: batches, flips and order on the GPU, channels_last, bf16 autocast,
    the GPU generator in the checkpoint; the scores equal a CPU evaluation of the same best.pt."""
    pytest.importorskip("segmentation_models_pytorch")
    from frem.seg.evaluate import evaluate_run
    from frem.seg.train import train
    first = train(tiny_config(epochs=1, device="cuda"))
    assert first["device"].startswith("cuda") and first["history"][0]["frem_channels"]
    resumed = train(tiny_config(epochs=2, device="cuda", resume=True))
    assert [r["epoch"] for r in resumed["history"]] == [0, 1]
    on_cpu = evaluate_run(tiny_config().out, device="cpu")
    assert on_cpu["miou"] == pytest.approx(resumed["test"]["miou"], abs=0.02)  # bf16 on the GPU, fp32 here
