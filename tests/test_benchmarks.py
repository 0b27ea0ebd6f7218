"""The benchmark commands of docs/kernel.md run as written (a seconds-long subset; no timing asserted)."""

import pytest
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # minutes in all: left out of `-m "not slow"`

ROOT = Path(__file__).resolve().parents[1]
SUBSET = "copy_bandwidth or (16x512x8x8 and fp32 and nchw and forward-)"


def readme_command(program: str) -> list[str]:
    """The first line of docs/kernel.md's Benchmarks section that runs ``program``."""
    section = (ROOT / "docs" / "kernel.md").read_text().split("## Benchmarks", 1)[1]
    line = next(line for line in section.splitlines() if line.startswith(program + " "))
    return shlex.split(line.split("#")[0])


def test_the_readme_benchmark_command_runs_and_reports(tmp_path):
    command = readme_command("pytest")
    assert command[:3] == ["pytest", "benchmarks/", "--benchmark-only"]
    out = tmp_path / "results.json"
    command = [re.sub(r"--benchmark-json=.*", f"--benchmark-json={out}", arg) for arg in command]
    result = subprocess.run([sys.executable, "-m", *command, "-q", "-p", "no:cacheprovider", "-k", SUBSET],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    benches = json.loads(out.read_text())["benchmarks"]
    timed = [b["extra_info"] for b in benches if "ms" in b["extra_info"]]
    assert len(timed) == 1 and set(timed[0]["ms"]) == {"frem", "kernel", "eager", "compiled", "copy"}
    assert timed[0]["compiled_graphs"] >= 1  # the compiled column really was compiled
    report = readme_command("python")
    assert report[:2] == ["python", "benchmarks/report.py"]
    text = subprocess.run([sys.executable, report[1], str(out)], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    assert "| 16x512x8x8 | fp32 | nchw | forward |" in text and "copy bandwidth" in text
    assert re.search(r"\| [1-9]\d* graph\(s\) \|", text)
