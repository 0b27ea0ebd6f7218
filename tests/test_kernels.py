"""The Triton kernels themselves, against a float64 reference.

On a machine without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels
run on CPU tensors; with CUDA they run on the GPU. Either way the launcher is
called directly (wrap_triton refuses interpreted kernels in eager mode).
"""

import pytest
import torch
from conftest import KERNEL_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_close_to_reference, feature_maps, reference, scales

import frem.kernels.scale_channels as op


def run_kernel(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = x.to(KERNEL_DEVICE)
    y = torch.empty_like(x).fill_(float("nan"))  # poisoned: every element must be written
    return op.launch_scale_channels(x, scale.to(KERNEL_DEVICE), y)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_kernel_matches_float64_reference(data):
    """Forward (x) and backward (an incoming gradient) take the same launcher."""
    x = data.draw(feature_maps(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)))
    scale = data.draw(scales(x.shape[1]))
    if x.dtype == torch.float64:
        scale = scale.double()
    y = run_kernel(x, scale)
    assert_close_to_reference(y, reference(x, scale).to(x.dtype).double(), x.dtype)


def test_dense_layouts_take_the_dense_kernel(monkeypatch):
    """One flat pass for any dense layout: the strided kernel must not run."""
    op.load_triton()
    monkeypatch.setattr(op, "_scale_strided_kernel", None)
    for x in (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d)):
        y = run_kernel(x, torch.arange(1.0, 4.0))
        assert y.stride() == x.stride()
        assert torch.equal(y.cpu(), x * torch.arange(1.0, 4.0).view((1, -1) + (1,) * (x.dim() - 2)))


# The plan is what the GPU benchmarks measured (one scale per row where a channel's run is long,
# tiles of 16 KiB, K rounded up to a power of two): a change to it must be deliberate.
@pytest.mark.parametrize("shape, fmt, row_channel, inner, rk, blocks", [
    ((2, 3, 4, 5), torch.contiguous_format, True, 20, (6, 20), (128, 32)),      # NCHW: one scale per row
    ((2, 3, 2, 2), torch.contiguous_format, False, 4, (2, 12), (256, 16)),      # short runs: columns
    ((3, 2, 4, 4), torch.contiguous_format, True, 16, (6, 16), (256, 16)),      # two channels; runs of 16
    ((2, 3, 4, 5), torch.channels_last, False, 1, (40, 3), (1024, 4)),          # one scale per column
    ((2, 3, 2, 3, 4), torch.channels_last_3d, False, 1, (48, 3), (1024, 4)),
    ((2, 1, 4, 5), torch.contiguous_format, True, 20, (2, 20), (128, 32)),      # a single channel
    ((2, 1, 4, 5), torch.channels_last, True, 20, (2, 20), (128, 32)),          # ... in channels_last
    ((2, 1, 2, 2), torch.contiguous_format, True, 4, (2, 4), (1024, 4)),        # ... with short runs
    ((3, 70), torch.contiguous_format, False, 1, (3, 70), (32, 128)),           # (N, C)
])
def test_both_tile_orientations(shape, fmt, row_channel, inner, rk, blocks):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    plan = op.tile_plan(x, torch.empty_like(x))
    assert (plan["ROW_CHANNEL"], plan["inner"]) == (row_channel, inner)
    assert (plan["R"], plan["K"]) == rk and (plan["BLOCK_R"], plan["BLOCK_K"]) == blocks
    assert plan["BLOCK_R"] * plan["BLOCK_K"] * x.element_size() == op.TILE_BYTES
    scale = torch.linspace(0.5, 632.0, shape[1])
    assert_close_to_reference(run_kernel(x, scale), reference(x, scale).float().double(), torch.float32)


@pytest.mark.parametrize("layout", ["dense", "strided"])
def test_64_bit_offset_path(monkeypatch, layout):
    """Tensors past 2**31 elements switch to int64 offsets; force the switch small."""
    monkeypatch.setattr(op, "_INT32_LIMIT", 50)
    x = torch.randn(3, 4, 5, 6)
    if layout == "strided":
        x = x[:, :, ::2]
    scale = torch.tensor([1.0, 632.0, 2.0, 0.25]).to(KERNEL_DEVICE)
    RecordFlags.flags.clear()
    y = op.launch_scale_channels(x.to(KERNEL_DEVICE), scale, torch.empty_like(x, device=KERNEL_DEVICE),
                                 wrap=RecordFlags)
    monkeypatch.undo()
    op.launch_scale_channels(x.to(KERNEL_DEVICE), scale, torch.empty_like(x, device=KERNEL_DEVICE),
                             wrap=RecordFlags)
    # 4 warps: what the Hopper compile check and the GPU benchmarks ran
    assert RecordFlags.flags == [(True, 4), (False, 4)]
    assert_close_to_reference(y.cpu(), reference(x, scale.cpu()).float().double(), torch.float32)


@pytest.mark.parametrize("first_stride, int64", [(2**31 - 17, False), (2**31 - 16, True), (2**31, True)])
def test_the_64_bit_switch_follows_the_address_span(first_stride, int64):
    """A (2, 3, 2) view whose addresses span first_stride + 16 elements: int64 exactly
    when that passes 2**31 - 1, whatever the element count (12)."""
    storage = torch.empty(2**31 + 64, device="meta")
    x = storage.as_strided((2, 3, 2), (first_stride, 7, 1))
    assert op.needs_int64(x) is int64
    dense = torch.empty(2**31 - 1 + int64, device="meta")[None]  # (1, C): span = numel
    assert op.needs_int64(dense) is int64


class RecordFlags:
    """A launcher ``wrap`` that records the 64-bit flag and the warp count each launch gets."""
    flags = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            RecordFlags.flags.append((kwargs["INT64"], kwargs["num_warps"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_a_view_spanning_more_than_2_31_elements_runs_with_64_bit_offsets():
    """A small view over a large storage, as_strided so its span really passes 2**31 elements."""
    if KERNEL_DEVICE == "cpu":
        storage = torch.empty(2**31 + 16, dtype=torch.bfloat16)  # virtual memory, pages untouched
    else:
        storage = torch.empty(2**31 + 16, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    x = storage.as_strided((2, 3, 2), (2**31, 7, 1))
    assert sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1 == 2**31 + 16
    x.copy_(torch.randn(2, 3, 2).bfloat16())
    scale = torch.tensor([1.0, 632.0, 3.0], device=storage.device)
    RecordFlags.flags.clear()
    y = op.launch_scale_channels(x, scale, torch.empty_like(x), wrap=RecordFlags)
    assert RecordFlags.flags == [(True, 4)]
    assert_close_to_reference(y, reference(x.cpu(), scale.cpu()).bfloat16().double(), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: 2**31 elements")
def test_more_than_2_31_elements_on_cuda():
    n = 2**31 + 2**20
    x = torch.ones(1, 4, n // 4, dtype=torch.bfloat16, device="cuda")
    x[0, :, -1] = 3.0
    scale = torch.tensor([1.0, 2.0, 4.0, 8.0], device="cuda")
    y = op.launch_scale_channels(x, scale, torch.empty_like(x))
    assert y[0, :, -1].tolist() == [3.0, 6.0, 12.0, 24.0]
    assert y[0, :, 0].tolist() == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_hopper_with_16_byte_accesses_and_64_bit_offsets_past_2_31():
    """Triton's CUDA code generation, which the interpreter skips, runs without a GPU, through
    the real launcher's argument binding (so with the specialisation a GPU launch would get)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile_kernels.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {tuple(line.split()[:2]): dict(kv.split("=") for kv in line.split()[3:-1])
            for line in result.stdout.splitlines() if line.endswith(" ok")}
    assert len(rows) == 4 * 9 + 6
    for (case, dtype), widths in rows.items():  # 64-bit index arithmetic exactly where offsets pass 2**31
        assert widths.pop("index") == ("64" if "past-2^31" in case else "32"), (case, dtype)
        if "pid" in widths:  # the strided kernel widens its program id before multiplying it out
            assert widths.pop("pid") == ("64" if "past-2^31" in case else "32"), (case, dtype)
    for (case, dtype), widths in rows.items():
        if case == "sliced-past-2^31":
            continue  # a (2, 3, 2) view: too small for vectors
        if case.startswith("sliced"):
            assert widths["store"] == "16", (case, dtype)  # y is dense: vector stores
        elif case in ("nchw-7x7", "channels_last-C500"):
            # rows of 49 / 500 elements start unaligned: scalar x accesses (benchmarks/NOTES.md)
            assert widths["store"] == str({"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[dtype]), (case, dtype)
        else:
            assert widths == {"load": "16", "store": "16"}, (case, dtype)
