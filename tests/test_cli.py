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


def recorder(monkeypatch, module, name, result):
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return result
    monkeypatch.setattr(module, name, record)
    return calls


@pytest.mark.parametrize("options, seeds, trials, results", [
    (["--quick"], [0], 6, "R/results"), ([], [0, 1, 2], 20, "R/results"),
    (["--quick", "--seeds", "2", "--tune-trials", "0", "--results", "T"], [0, 1], 0, "T"),
])
def test_reproduce_takes_its_defaults_from_the_protocol_and_the_options_win(options, seeds, trials, results,
                                                                            monkeypatch, capsys):
    from frem.seg import reproduce
    calls = recorder(monkeypatch, reproduce, "reproduce", {"verdict": "V", "beside_paper": "P"})
    assert main(["reproduce", "--out", "R", "--paper", "none", "--epochs", "3", *options]) == 0
    (base,), kwargs = calls[0]
    assert (kwargs["seeds"], kwargs["tune_trials"], kwargs["results_dir"], kwargs["out"]) == (seeds, trials, results, "R")
    assert kwargs["paper_tables"] == "none" and base.epochs == 3 and base.quick == ("--quick" in options)
    assert capsys.readouterr().out == f"{results}/README.md\nV\n\nP\n"


def test_tune_passes_its_options_and_prints_the_command_apart(monkeypatch, capsys):
    from frem.seg import tune
    calls = recorder(monkeypatch, tune, "tune", {"best_value": 0.5, "train_command": "frem train --B 3"})
    assert main(["tune", "--quick", "--trials", "4", "--study", "s", "--storage", "journal:j", "--pruner", "median",
                 "--out", "O", "--no-progress", "--epochs", "2", "--device", "cuda:1"]) == 0
    (base,), kwargs = calls[0]
    assert kwargs == {"trials": 4, "study_name": "s", "storage": "journal:j", "out": "O", "pruner": "median",
                      "progress": False} and (base.epochs, base.device) == (2, "cuda:1")
    out = capsys.readouterr().out
    assert '"best_value": 0.5' in out and "train_command" not in out.split("\n\n")[0]
    assert out.endswith("Train the best setting in full with:\n  frem train --B 3\n")
    assert main(["tune", "--quick", "--trials", "0"]) == 2 and "--trials must be at least 1, got 0" in capsys.readouterr().err


def test_predict_evaluate_and_download_pass_what_they_were_given(monkeypatch, capsys, tmp_path):
    from frem.seg import evaluate, predict
    from frem.seg.data import drosophila
    predicted = recorder(monkeypatch, predict, "predict", [tmp_path / "a_labels.png"])
    assert main(["predict", "--checkpoint", "c.pt", "x.tif", "y.png", "--out", "O", "--device", "cuda:1"]) == 0
    assert predicted == [(("c.pt", ["x.tif", "y.png"], "O"), {"device": "cuda:1"})]
    evaluated = recorder(monkeypatch, evaluate, "evaluate_run", {"miou": 0.25})
    assert main(["evaluate", "R", "--data", "D"]) == 0
    assert evaluated == [(("R",), {"device": "cpu", "data_root": "D"})]
    downloaded = recorder(monkeypatch, drosophila, "download", tmp_path)
    assert main(["data", "download", "drosophila", "--dest", "D", "--url", "U"]) == 0
    assert downloaded == [(("D", "U"), {})]
    assert capsys.readouterr().out.splitlines()[-1] == f"downloaded and verified: {tmp_path}"


def test_an_interrupted_command_says_how_to_continue(monkeypatch, capsys):
    from frem.seg import train

    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", interrupted)
    assert main(["train", "--quick", "--out", "R"]) == 130
    assert capsys.readouterr().err == "frem train: interrupted; `--resume` continues a training run\n"


def test_a_mistyped_option_is_the_commands_error_with_the_option_meant(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--quik", "--seeed", "3"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("frem train: error: unrecognized arguments: --quik --seeed 3 "
                                       "(did you mean --quick, --seed?)\n")


def test_missing_extras_are_named_from_the_installed_metadata(monkeypatch):
    from importlib import metadata

    from frem.seg import cli
    monkeypatch.setattr(metadata, "requires", lambda name: [
        'numpy', 'no-such-dist-frem>=1; extra == "seg"', "tqdm ; extra == 'seg'", 'no-such-other; extra == "lightning"',
        'no-such-third[x] ; python_version >= "3.9" and extra == "seg"'])
    assert cli.missing_requirements() == ["no-such-dist-frem", "no-such-third"]
    assert cli.missing_requirements("lightning") == ["no-such-other"]


def test_without_the_seg_extra_the_command_names_it_in_one_line(monkeypatch, capsys):
    from frem.seg import cli
    monkeypatch.setattr(cli, "missing_requirements", lambda: ["segmentation-models-pytorch", "optuna"])
    assert main(["train", "--quick"]) == 2
    assert capsys.readouterr().err == ("frem: the command line needs the 'seg' extra (missing: "
                                       "segmentation-models-pytorch, optuna): pip install \"frem[seg]\"\n")
