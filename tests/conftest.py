"""Test set-up: without a GPU, the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before
frem is imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Real data on every machine: an excerpt of the Drosophila data set (sections 0, 1, 2, 12, 13, 15, 16 and
# stack 2's 00, cropped to 256x256; tests/data/drosophila-excerpt/README.md has its license and citation).
EXCERPT = Path(__file__).resolve().parent / "data" / "drosophila-excerpt"
# The whole data set, for the few tests of what only it has (its 120 files, 1024x1024 sections): FREM_DATA, or
# where the project's own machines keep it beside the clone.
DATA = Path(os.environ.get("FREM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "drosophila-vnc")
GET_DATA = ("set FREM_DATA=DIR at the whole Drosophila data set (frem data download drosophila --dest DIR "
            "fetches it, 43 MB)")


def _where_data() -> str:
    """Where the whole data set was looked for, said to a user only where they named it (FREM_DATA)."""
    return f" at {DATA}" if os.environ.get("FREM_DATA") else ""
TINY_SECTIONS = {"train": (0,), "val": (12,), "test": (15,)}


@pytest.fixture(scope="session")
def drosophila_root() -> Path:
    """The excerpt: the Drosophila data's layout and files, cut small, verified against its own checksums."""
    return EXCERPT


@pytest.fixture(scope="session")
def full_drosophila_root() -> Path:
    if not (DATA / "SHA256SUMS").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the Drosophila data at {DATA} (FREM_DATA)")
        pytest.skip(f"needs the whole Drosophila data set{_where_data()}: {GET_DATA}")  # said in the summary
    return DATA


@pytest.fixture
def tiny_config(drosophila_root, tmp_path):
    """A training run of seconds on the real data: one section per split, 64px tiles."""
    from frem.seg.config import TrainConfig

    def make(**changes):
        settings = dict(data=str(drosophila_root), out=str(tmp_path / "run"), epochs=1,
                        tiles_per_section=4, sections=TINY_SECTIONS, batch_size=4, progress=False)
        settings.update(changes)
        return TrainConfig.build(quick=True, **settings)
    return make


REPO = Path(__file__).resolve().parents[1]
# What running the tests may leave in the working tree: caches, never results.
CACHES = (".pytest_cache", ".hypothesis", ".benchmarks", "__pycache__", ".venv", "mutants", ".whl", ".data",
          ".coverage", "frem.egg-info")


def _working_tree_paths() -> set | None:
    """Untracked and ignored paths of the working tree (folders summarised); outside git, every top-level path."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:  # a copy without git (mutation testing's): what lies at its top
        return {p.name for p in REPO.iterdir() if p.name not in CACHES and not p.name.startswith("mutmut")}
    paths = {line[3:].strip().strip('"') for line in done.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in CACHES for part in Path(p).parts)}


@pytest.fixture(scope="session", autouse=True)
def tests_write_only_into_temporary_folders():
    """A test that writes into the working tree (runs/, build/, results/) fails the session."""
    before = _working_tree_paths()
    yield
    after = _working_tree_paths()
    if before is not None and after is not None and after - before:
        pytest.fail(f"the working tree gained {', '.join(sorted(after - before))} while the tests ran: tests must "
                    "write only into temporary folders (tmp_path). If you wrote there yourself meanwhile (a "
                    "prediction into predictions/, say), it may not be the tests': move it and run them again",
                    pytrace=False)


@pytest.fixture(scope="session")
def trained_run(drosophila_root, tmp_path_factory) -> Path:
    """One tiny finished run (frem variant), trained once per session, for tests that only read a run.

    Tests that change a run copy it first (``copy_of_trained_run``)."""
    from frem.seg.config import TrainConfig
    from frem.seg.train import train
    out = tmp_path_factory.mktemp("shared") / "run"
    train(TrainConfig.build(quick=True, data=str(drosophila_root), out=str(out), epochs=2, tiles_per_section=4,
                            sections=TINY_SECTIONS, batch_size=4, progress=False))
    return out


@pytest.fixture
def copy_of_trained_run(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def pytest_report_header(config):
    whole = f"the whole data set at {DATA}" if (DATA / "SHA256SUMS").is_file() else \
        f"no whole data set{_where_data()} (the few tests that need it skip; {GET_DATA})"
    return [f"Drosophila data: the excerpt in {EXCERPT.relative_to(REPO)}; {whole}"]


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "whole Drosophila data" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests skipped for want of the whole Drosophila data "
                                    f"set{_where_data()}: {GET_DATA} to run them", yellow=True)
