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
def test_example_runs(script, tmp_path):
    if script.name in NEEDS and not os.environ.get("CI"):  # CI installs every extra and runs them all
        module, extra = NEEDS[script.name]
        pytest.importorskip(module, reason=f'needs the {extra} extra: pip install -e ".[{extra}]"')
    # in a folder of its own: what an example writes (search_own_loop.py: its study) stays out of the clone
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FREM(B=" in result.stdout


@pytest.mark.parametrize("script, blocked, extra", [("monai_unet.py", "monai", "monai"),
                                                    ("nnunet_trainer.py", "dynamic_network_architectures", "nnunet")])
def test_an_example_without_its_extra_names_the_install_line(script, blocked, extra):
    from frem.extras import install_command
    path = EXAMPLES[0].parent / script
    code = (f"import runpy, sys; sys.modules[{blocked!r}] = None; sys.modules['nnunetv2'] = None\n"
            f"runpy.run_path({str(path)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"examples/{script} needs " \
        f"{'MONAI' if extra == 'monai' else 'nnU-Net'}: {install_command(extra)}"
