"""Packaging: the library apart from the application, and what a non-editable install ships."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLICATION_PACKAGES = ("segmentation_models_pytorch", "timm", "optuna", "matplotlib", "PIL",
                        "frem.seg")
# Makes every application package unimportable, as in an environment that installed only `frem`
# (tqdm is left out: torch itself imports it).
BLOCK = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {[p.split(".")[0] for p in APPLICATION_PACKAGES[:-1]]!r}:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_import_frem_loads_no_application_package():
    probe = ("import sys, frem; "
             f"print([m for m in {APPLICATION_PACKAGES!r} if m in sys.modules])")
    result = python(probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_library_works_with_no_application_package_installed():
    code = BLOCK + """
import torch, frem
from torch import nn
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
handle = frem.attach(model, "1", B=2, X=10.0)
model.train()(torch.randn(1, 1, 8, 8)).sum().backward()
frem.resample(model, 1)
assert frem.detach(model) == 1
print("library ok")
"""
    result = python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "library ok"


def test_the_command_without_the_extra_says_what_to_install(monkeypatch, capsys):
    from importlib import metadata

    from frem.seg import cli
    installed = metadata.version

    def version(name):
        if name in ("segmentation-models-pytorch", "optuna"):
            raise metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(cli.metadata, "version", version)
    assert cli.main(["train", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == ("frem: the command line needs the 'seg' extra (missing: segmentation-models-pytorch, "
                   f"optuna): pip install -e \"{ROOT}[seg]\"\n")


def test_the_library_declares_only_torch_triton_and_numpy():
    from importlib import metadata
    requirements = metadata.requires("frem")
    core = sorted(r.split(";")[0].split(">")[0].strip() for r in requirements if "extra ==" not in r)
    assert core == ["numpy", "torch", "triton"]  # numpy: torch warns at every import without it
    seg = {r.split(";")[0].split(">")[0].strip() for r in requirements if 'extra == "seg"' in r}
    assert {"segmentation-models-pytorch", "timm", "optuna", "matplotlib"} <= seg


@pytest.mark.slow
def test_non_editable_install_ships_the_kernels_and_the_application_data(tmp_path):
    # Built from a copy: setuptools builds in the source tree, and tests write only into tmp_path.
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "results", "runs", "mutants", ".whl", ".data", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, cwd=tmp_path)
    assert (target / "frem" / "kernels" / "scale_channels.py").is_file()
    assert (target / "frem" / "seg" / "data" / "drosophila_sha256sums.txt").is_file()
    probe = ("import frem, frem.kernels.scale_channels as k, frem.seg.data.drosophila as d, "
             "frem.seg.paper as p; "
             "assert len(d.checksums()) == 120; assert len(p.load_table(2)) == 5; "
             "print(k.__file__); print(frem.scale_channels is k.scale_channels)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "True"


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["seg", "test"])
def test_the_extras_keep_the_torch_and_torchvision_installed(extra, tmp_path):
    """The README has a CPU-only machine install torch and torchvision from PyTorch's CPU index first; the
    commands after it must then install no other torch, torchvision or NVIDIA wheel (pip's resolution, as a dry
    run against the package index, in this environment)."""
    readme = (ROOT / "README.md").read_text()
    cpu = next(line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line)
    assert cpu.split("#")[0].split() == ["pip", "install", "torch", "torchvision", "--index-url",
                                         "https://download.pytorch.org/whl/cpu"]
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                           "--report", str(report), "-e", f"{ROOT}[{extra}]"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    installs = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    assert not [name for name in installs if name in ("torch", "torchvision") or name.startswith("nvidia-")], installs
