"""Test set-up: without a GPU, the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before
frem is imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(os.environ.get("FREM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "drosophila-vnc")
TINY_SECTIONS = {"train": (0,), "val": (12,), "test": (15,)}


@pytest.fixture(scope="session")
def drosophila_root() -> Path:
    if not (DATA / "SHA256SUMS").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the Drosophila data at {DATA} (FREM_DATA)")
        pytest.skip(f"no Drosophila data at {DATA}; set FREM_DATA")  # said loudly in the header
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


def _data_missing() -> bool:
    return not (DATA / "SHA256SUMS").is_file()


def pytest_report_header(config):
    if _data_missing():
        return [f"!!! NO DROSOPHILA DATA at {DATA}: every test that trains or reads it will be SKIPPED. "
                "Set FREM_DATA=/path/to/drosophila-vnc (CI fails instead of skipping) !!!"]
    return [f"Drosophila data: {DATA}"]


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "Drosophila data" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"!!! {len(skipped)} tests were SKIPPED for want of the Drosophila data "
                                    f"at {DATA}: set FREM_DATA !!!", red=True, bold=True)
