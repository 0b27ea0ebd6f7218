"""The frem command: predict, and one clear line for every bad input."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from frem.seg.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "frem", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter each: seconds apiece
@pytest.mark.parametrize("args, message", [
    (["train", "--variant", "bogus"], "invalid choice: 'bogus'"),
    (["train", "--quick", "--B", "600"], "B=600 is larger than the 512 channels of layer 'encoder'"),
    (["train", "--quick", "--dataset", "folder"], "--dataset folder needs --data"),
    (["train", "--quick", "--crop", "50"], "--crop must be a multiple of 32"),
    (["evaluate", "/nonexistent/run"], "no checkpoint at /nonexistent/run/best.pt"),
])
def test_bad_input_ends_with_one_line_and_status_2(args, message, drosophila_root, tmp_path):
    result = run_cli(*args, *(["--data", str(drosophila_root), "--out", str(tmp_path / "r")]
                              if args[0] == "train" and "folder" not in args else []))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_empty_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "classes.txt").write_text("a\nb\n")
    assert main(["train", "--quick", "--dataset", "folder", "--data", str(tmp_path / "d"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "no images in" in capsys.readouterr().err


def test_train_then_predict_on_an_unlabelled_section(tiny_config, drosophila_root, tmp_path, capsys):
    config = tiny_config()
    assert main(["train", "--quick", "--data", config.data, "--out", config.out, "--epochs", "1",
                 "--tiles-per-section", "4", "--batch-size", "4", "--no-progress"]) == 0
    image = drosophila_root / "stack2" / "raw" / "00.tif"
    assert main(["predict", "--checkpoint", f"{config.out}/best.pt", str(image),
                 "--out", str(tmp_path / "pred")]) == 0
    labels = np.array(Image.open(tmp_path / "pred" / "00_labels.png"))
    overlay = Image.open(tmp_path / "pred" / "00_overlay.png")
    assert labels.shape == (1024, 1024) and labels.max() <= 3
    assert overlay.size == (1024, 1024) and overlay.mode == "RGB"
