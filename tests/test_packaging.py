"""A non-editable install ships kernels/ as frem.kernels."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_imports_the_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   check=True, cwd=tmp_path)
    assert (target / "frem" / "kernels" / "scale_channels.py").is_file()
    assert (target / "frem" / "data" / "drosophila_sha256sums.txt").is_file()
    probe = ("import frem, frem.kernels.scale_channels as k, frem.data.drosophila as d; "
             "assert len(d.checksums()) == 120; "
             "print(k.__file__); print(frem.scale_channels is k.scale_channels)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "True"
