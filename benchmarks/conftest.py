"""Shared timing for the benchmarks.

On CUDA every figure is a device-side median from ``triton.testing.do_bench``
(CUDA events, warmed up), with inputs rotated so the 50 MB L2 cannot hold them.
On CPU it is the median wall time of many runs. pytest-benchmark records both
its own statistics and these figures (``extra_info``), and ``report.py`` turns
the JSON into the Markdown tables of ``benchmarks/README.md``.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROTATE_BYTES = 256 * 2**20  # rotate input sets until they exceed every cache


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, *, warmup: int = 3, repeat: int = 15) -> float:
    """Median milliseconds of ``fn()`` on DEVICE."""
    if DEVICE.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def interleaved_median_ms(fns: dict, rounds: int = 5) -> dict:
    """Median ms of each fn, measured in alternation (A B C A B C ...) so that
    drift on a shared machine hits all of them alike."""
    if DEVICE.type == "cuda":
        per_round = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                per_round[name].append(median_ms(fn))
        return {name: statistics.median(v) for name, v in per_round.items()}
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    for _ in range(15 * rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def rotation(make, nbytes: int) -> list:
    """Enough independent input sets that cycling through them defeats the caches."""
    count = max(1, min(8, -(-ROTATE_BYTES // max(nbytes, 1))))
    return [make() for _ in range(count)]


def run_benchmark(benchmark, fn, **extra):
    """Time ``fn`` with pytest-benchmark (synchronised) and our median; record both."""
    def synced():
        fn()
        sync()
    ms = median_ms(fn)
    benchmark.extra_info.update({"device": device_name(), "median_ms": ms, **extra})
    benchmark.pedantic(synced, rounds=10 if DEVICE.type == "cuda" else 5, iterations=1, warmup_rounds=1)
    return ms


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (1 << 30 if DEVICE.type == "cuda" else 1 << 26) // 4
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * 4 * n / (ms * 1e-3)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Record the library versions the figures belong to."""
    import triton
    output_json["frem_versions"] = {"torch": torch.__version__, "triton": triton.__version__}
