"""The benchmark suite and its report still run (a seconds-long subset; no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_subset_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_scale_channels.py", "-q", "-p", "no:cacheprovider",
         "--benchmark-only", "-o", "addopts=", f"--benchmark-json={out}",
         "-k", "copy_bandwidth or (16x512x8x8 and fp32 and nchw and forward-)"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    benches = json.loads(out.read_text())["benchmarks"]
    timed = [b["extra_info"]["ms"] for b in benches if "ms" in b["extra_info"]]
    assert len(timed) == 1 and set(timed[0]) == {"frem", "eager", "compiled"}
    report = subprocess.run([sys.executable, "benchmarks/report.py", str(out)], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "| 16x512x8x8 | fp32 | nchw | forward |" in report and "copy bandwidth" in report
