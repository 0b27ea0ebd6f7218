"""benchmarks/gpu.sh, the GPU run, works end to end: here in its CPU-sized form."""

import json
import os
import subprocess
import tarfile

import pytest


@pytest.mark.slow
def test_every_slice_of_the_gpu_script_runs_on_cpu(drosophila_root, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "FREM_DATA": str(drosophila_root), "FREM_GPU_SMALL": "1",
           "REPRO_OUT": str(tmp_path / "reproduction")}  # nothing written into the working tree
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "all"], cwd=os.path.dirname(os.path.dirname(__file__)),
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "device.txt").read_text().startswith("device cpu; torch ")
    assert "passed" in (out / "tests.log").read_text()
    for name in ("ops", "overhead", "epoch"):
        assert json.loads((out / f"{name}.json").read_text())["benchmarks"], name
        assert "- device: **cpu" in (out / f"{name}.md").read_text()
    assert "| frem |" in (out / "reproduction" / "README.md").read_text()
    with tarfile.open(out / "reproduction-runs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/frem-seed0/metrics.json" in names and not any(n.endswith(".pt") for n in names)
    assert (tmp_path / "reproduction" / "runs" / "frem-seed0" / "metrics.json").exists()
