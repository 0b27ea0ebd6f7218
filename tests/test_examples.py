"""The scripts in examples/ run as documented."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # minutes in all: left out of `-m "not slow"`

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
NEEDS = {"nnunet_trainer.py": ("dynamic_network_architectures", "nnunet")}  # script -> (module, extra)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    if script.name in NEEDS and not os.environ.get("CI"):  # CI installs every extra and runs them all
        module, extra = NEEDS[script.name]
        pytest.importorskip(module, reason=f'needs the {extra} extra: pip install ".[{extra}]"')
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FREM(B=" in result.stdout
