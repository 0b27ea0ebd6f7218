"""frem.scale_channels against eager PyTorch and torch.compile of the same.

Bytes moved: forward reads x and writes y, backward reads the gradient and
writes dx; the (C,) scale is noise. Achieved bandwidth is compared with the
device's own copy bandwidth measured in the same run.
"""

import itertools

import pytest
import torch
from conftest import DEVICE, device_name, interleaved_median_ms, rotation, run_benchmark, sync

import frem

CPU_SIZES = [(16, 512, 8, 8), (16, 512, 32, 32), (8, 256, 128, 128)]
CUDA_SIZES = CPU_SIZES + [(16, 512, 64, 64), (64, 512, 64, 64), (64, 2048, 64, 64)]
SIZES = CUDA_SIZES if DEVICE.type == "cuda" else CPU_SIZES
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def eager_scale(x, scale):
    return x * scale.view(1, -1, 1, 1).to(x.dtype)


compiled_scale = torch.compile(eager_scale, dynamic=False)
IMPLEMENTATIONS = {"frem": frem.scale_channels, "eager": eager_scale, "compiled": compiled_scale}


def make_inputs(shape, dtype, layout):
    x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=layout)
    return x.requires_grad_(True), torch.randn_like(x)


def make_step(fn, direction, sets, scale):
    cycle = itertools.cycle(sets)
    if direction == "forward":
        def step():
            x, _ = next(cycle)
            with torch.no_grad():
                fn(x, scale)
    elif direction == "backward":
        graphs = itertools.cycle([(fn(x, scale), x, g) for x, g in sets])

        def step():
            y, x, g = next(graphs)
            torch.autograd.grad(y, x, g, retain_graph=True)
    else:
        def step():
            x, g = next(cycle)
            torch.autograd.grad(fn(x, scale), x, g)
    return step


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["forward", "backward", "forward+backward"])
def test_scale_channels(benchmark, copy_bandwidth, direction, dtype, layout, shape):
    """frem, eager and compiled timed in alternation; pytest-benchmark times frem."""
    scale = torch.ones(shape[1], device=DEVICE)
    scale[torch.randperm(shape[1])[: shape[1] // 3]] = 632.0
    numel = torch.Size(shape).numel()
    element = torch.finfo(DTYPES[dtype]).bits // 8
    sets = rotation(lambda: make_inputs(shape, DTYPES[dtype], LAYOUTS[layout]), 2 * numel * element)
    steps = {name: make_step(fn, direction, sets, scale) for name, fn in IMPLEMENTATIONS.items()}
    nbytes = (2 if direction == "forward+backward" else 1) * 2 * numel * element
    ms = interleaved_median_ms(steps)
    benchmark.extra_info.update(
        device=device_name(), direction=direction, dtype=dtype, layout=layout,
        shape="x".join(map(str, shape)), bytes=nbytes, ms=ms,
        gbps={k: nbytes / (v * 1e-3) / 1e9 for k, v in ms.items()},
        copy_fraction={k: nbytes / (v * 1e-3) / copy_bandwidth for k, v in ms.items()})
    benchmark.pedantic(lambda: (steps["frem"](), sync()), rounds=5, warmup_rounds=1)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="2**31 elements need a GPU")
@pytest.mark.parametrize("impl", ["frem", "eager"])
def test_scale_channels_past_2_31_elements(benchmark, copy_bandwidth, impl):
    shape = (1, 64, 2**25 + 2**12)  # 2**31 + 2**18 elements, bf16: 4.3 GB
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    g = torch.randn_like(x)
    scale = torch.ones(64, device=DEVICE)
    scale[::3] = 632.0
    fn = IMPLEMENTATIONS[impl]
    nbytes = 4 * x.numel() * 2
    ms = run_benchmark(benchmark, lambda: torch.autograd.grad(fn(x, scale), x, g), impl=impl,
                       direction="forward+backward", dtype="bf16", layout="nchw",
                       shape="x".join(map(str, shape)), bytes=nbytes, huge=True)
    benchmark.extra_info["gbps"] = nbytes / (ms * 1e-3) / 1e9
    benchmark.extra_info["copy_fraction"] = nbytes / (ms * 1e-3) / copy_bandwidth


def test_copy_bandwidth(benchmark, copy_bandwidth):
    """The ceiling every op figure is compared with."""
    benchmark.extra_info.update({"copy_gbps": copy_bandwidth / 1e9})
    x = torch.empty(1 << 20, device=DEVICE)
    benchmark.pedantic(lambda: x.clone(), rounds=3)
