"""frem.scale_channels against eager PyTorch, torch.compile and a same-size copy.

Bytes moved: forward reads x and writes y, backward reads the gradient and
writes dx; the (C,) scale is noise. Every row times, in alternation:

- ``frem``: ``frem.scale_channels`` as FREM calls it (it picks the path);
- ``kernel``: the registered op ``torch.ops.frem.scale_channels`` (the Triton
  kernels on CUDA, its torch body on CPU), whatever the size;
- ``eager``: ``x * scale`` in PyTorch, cast back to x's dtype;
- ``compiled``: the same under ``torch.compile``, compiled afresh for the row
  (``fullgraph=True``, so a row can never fall back to eager unseen);
- ``copy``: ``copy_`` of the same bytes (two copies for forward+backward),
  the ceiling: '% of copy' = copy time / time.
"""

import itertools

import pytest
import torch
from conftest import DEVICE, GRAPH_BYTES, device_name, graph_us, host_us, interleaved_ms, rotation

import frem
from frem.kernels.scale_channels import op

CPU_SIZES = [(16, 512, 8, 8), (16, 512, 32, 32), (8, 256, 128, 128)]
CUDA_SIZES = CPU_SIZES + [(16, 512, 7, 7), (16, 500, 32, 32), (16, 512, 64, 64), (64, 512, 64, 64),
                          (64, 2048, 64, 64), (2, 64, 64, 64, 64)]
SIZES = CUDA_SIZES if DEVICE.type == "cuda" else CPU_SIZES
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REPEAT = 75 if DEVICE.type == "cuda" else 15


def layout_of(name, rank):
    if name == "channels_last":
        return torch.channels_last if rank == 4 else torch.channels_last_3d
    return torch.contiguous_format


def eager_scale(x, scale):
    return (x * scale.view((1, -1) + (1,) * (x.dim() - 2))).to(x.dtype)


def kernel_scale(x, scale):
    return op()(x, scale)


def fresh_compiled():
    """A compiled eager_scale with nothing cached: every row gets its own graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(eager_scale, dynamic=False, fullgraph=True)


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


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


def copy_step(direction, sets):
    """The same bytes as the pass, as copies: read one tensor, write another."""
    pairs = itertools.cycle([(x.detach(), torch.empty_like(x)) for x, _ in sets])
    copies = 2 if direction == "forward+backward" else 1

    def step():
        src, dst = next(pairs)
        for _ in range(copies):
            dst.copy_(src)
    return step


def row_info(ms: dict, nbytes: int, shape, **fields) -> dict:
    """One row of the report: the times, and bandwidth and fraction of the row's own copy."""
    return dict(device=device_name(), shape="x".join(map(str, shape)), bytes=nbytes, ms=ms,
                gbps={k: nbytes / (v * 1e-3) / 1e9 for k, v in ms.items()},
                copy_fraction={k: ms["copy"] / v for k, v in ms.items() if k != "copy"}, **fields)


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["forward", "backward", "forward+backward"])
def test_scale_channels(benchmark, direction, dtype, layout, shape):
    """frem, kernel, eager, compiled and copy in alternation; pytest-benchmark times frem."""
    scale = torch.ones(shape[1], device=DEVICE)
    scale[torch.randperm(shape[1])[: shape[1] // 3]] = 632.0
    numel = torch.Size(shape).numel()
    element = torch.finfo(DTYPES[dtype]).bits // 8
    fmt = layout_of(layout, len(shape))
    sets = rotation(lambda: make_inputs(shape, DTYPES[dtype], fmt), 2 * numel * element)
    compiled = fresh_compiled()
    implementations = {"frem": frem.scale_channels, "kernel": kernel_scale, "eager": eager_scale,
                       "compiled": compiled}
    steps = {name: make_step(fn, direction, sets, scale) for name, fn in implementations.items()}
    steps["copy"] = copy_step(direction, sets)
    nbytes = (2 if direction == "forward+backward" else 1) * 2 * numel * element
    ms = interleaved_ms(steps, repeat=REPEAT)
    info = row_info(ms, nbytes, shape, direction=direction, dtype=dtype, layout=layout,
                    compiled_graphs=compiled_graphs())
    if DEVICE.type == "cuda" and nbytes < GRAPH_BYTES:
        info.update(graph_us=graph_us(steps), host_us=host_us(steps))
    benchmark.extra_info.update(info)
    benchmark.pedantic(steps["frem"], rounds=5, warmup_rounds=1)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="2**31 elements need a GPU")
def test_scale_channels_past_2_31_elements(benchmark):
    shape = (1, 64, 2**25 + 2**12)  # 2**31 + 2**18 elements, bf16: 4.3 GB
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    g = torch.randn_like(x)
    scale = torch.ones(64, device=DEVICE)
    scale[::3] = 632.0
    steps = {name: (lambda fn=fn: torch.autograd.grad(fn(x, scale), x, g))
             for name, fn in (("frem", frem.scale_channels), ("eager", eager_scale))}
    steps["copy"] = copy_step("forward+backward", [(x, g)])
    nbytes = 4 * x.numel() * 2
    ms = interleaved_ms(steps, repeat=5, warmup=1)
    benchmark.extra_info.update(row_info(ms, nbytes, shape, direction="forward+backward", dtype="bf16",
                                         layout="nchw", huge=True))
    benchmark.pedantic(steps["frem"], rounds=1, warmup_rounds=0)


def test_copy_bandwidth(benchmark, copy_bandwidth):
    """The device's copy bandwidth, for the report's header."""
    benchmark.extra_info.update({"copy_gbps": copy_bandwidth / 1e9, "device": device_name()})
    x = torch.empty(1 << 20, device=DEVICE)
    benchmark.pedantic(lambda: x.clone(), rounds=3)
