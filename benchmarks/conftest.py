"""Shared timing for the benchmarks.

Every comparison is measured in alternation (A B C A B C ...) within one run,
so drift on a shared machine hits all of them alike, and reported as ratios.

On CUDA a call's device time comes from CUDA events around it, with input
sets rotated so that the 50 MB L2 cannot hold them; there is no L2 flush
between calls, whose dirty lines would be written back inside the next timed
call. Small tensors (under ``GRAPH_BYTES``) are also timed as CUDA-graph
replays (device time without launch gaps) and by wall clock over back-to-back
calls (host time a call). On CPU every figure is the median wall time.
pytest-benchmark records its own statistics and these figures
(``extra_info``); ``report.py`` turns the JSON into ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# benchmarks/gpu.sh's CPU-sized form (CI): proves every benchmark runs, measures nothing worth keeping.
SMALL = os.environ.get("FREM_GPU_SMALL") == "1"
ROTATE_BYTES = 256 * 2**20  # rotate input sets until they exceed every cache
GRAPH_BYTES = 32 * 2**20    # below this, also time CUDA-graph replays and host time


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved_ms(fns: dict, repeat: int = 75, warmup: int = 3) -> dict:
    """Median milliseconds a call of each fn, measured in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    if DEVICE.type == "cuda":
        marks = {name: [] for name in fns}
        for _ in range(repeat):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                marks[name].append((start, end))
        torch.cuda.synchronize()
        return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in marks.items()}
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def host_us(fns: dict, calls: int = 200, rounds: int = 5) -> dict:
    """Microseconds of host time a call: back-to-back calls, one sync at the end,
    alternating the fns round by round (on a GPU faster than the host this is
    the Python and dispatch cost, which decides small tensors)."""
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            per[name].append(1e6 * (time.perf_counter() - start) / calls)
    return {name: statistics.median(v) for name, v in per.items()}


def graph_us(fns: dict) -> dict:
    """Microseconds of device time a call, replayed from CUDA graphs (no launch gaps)."""
    import triton.testing
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = 1e3 * float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        except Exception as error:  # a path that cannot be captured is reported, not fatal
            out[name] = f"not capturable: {type(error).__name__}"
    return out


def rotation(make, nbytes: int) -> list:
    """Enough independent input sets that cycling through them defeats the caches."""
    count = max(1, min(8, -(-ROTATE_BYTES // max(nbytes, 1))))
    return [make() for _ in range(count)]


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (1 << 30 if DEVICE.type == "cuda" else 1 << 26) // 4
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)
    ms = interleaved_ms({"copy": lambda: dst.copy_(src)}, repeat=20)["copy"]
    return 2 * 4 * n / (ms * 1e-3)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Record the library versions the figures belong to."""
    import triton
    output_json["frem_versions"] = {"torch": torch.__version__, "triton": triton.__version__}
