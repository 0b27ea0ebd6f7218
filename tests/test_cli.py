"""The frem command: every option reaching what it drives (in-process), help that tells the truth, one clear
line for every bad input, and train-then-predict end to end."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from frem.extras import ROOT
from frem.seg.cli import main
from frem.seg.config import KEEP
from frem.seg.data.images import NORMALIZATIONS
from frem.seg.search_space import TUNABLE
from frem.seg.variants import VARIANTS


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
    result = run_cli(*args, *(["--out", str(tmp_path / "r")] if args[0] == "train" else []),
                     *(["--data", str(drosophila_root)] if args[0] == "train" and "folder" not in args else []))
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
    assert labels.shape == (256, 256) and labels.max() <= 3  # the excerpt's size
    assert overlay.size == (256, 256) and overlay.mode == "RGB"


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
                 "--out", "O", "--no-progress", "--epochs", "2", "--device", "cpu"]) == 0
    (base,), kwargs = calls[0]
    assert kwargs == {"trials": 4, "study_name": "s", "storage": "journal:j", "out": "O", "pruner": "median",
                      "progress": False} and (base.epochs, base.device) == (2, "cpu")
    out = capsys.readouterr().out
    assert out.split("\n\n")[0] == '{\n  "best_value": 0.5\n}'
    assert out.endswith("Train the best setting in full with:\n  frem train --B 3\n")
    assert main(["tune", "--quick", "--trials", "0"]) == 2 and "--trials must be at least 1, got 0" in capsys.readouterr().err


def test_predict_evaluate_and_download_pass_what_they_were_given(monkeypatch, capsys, tmp_path):
    from frem.seg import evaluate, predict
    from frem.seg.data import drosophila
    predicted = recorder(monkeypatch, predict, "predict", [tmp_path / "a_labels.png"])
    assert main(["predict", "--checkpoint", "c.pt", "x.tif", "y.png", "--out", "O", "--device", "cpu"]) == 0
    assert predicted == [(("c.pt", ["x.tif", "y.png"], "O"), {"device": "cpu"})]
    evaluated = recorder(monkeypatch, evaluate, "evaluate_run", {"miou": 0.25})
    assert main(["evaluate", "R", "--data", "D"]) == 0
    assert evaluated == [(("R",), {"device": "auto", "data_root": "D", "split": "test"})]  # every command: auto
    capsys.readouterr()
    assert main(["evaluate", "R", "--split", "val", "--device", "cpu"]) == 0
    assert evaluated[-1] == (("R",), {"device": "cpu", "data_root": None, "split": "val"})
    assert json.loads(capsys.readouterr().out)["split"] == "val"
    assert main(["predict", "--checkpoint", "c.pt", "x.tif", "--out", "O"]) == 0
    assert predicted[-1] == (("c.pt", ["x.tif"], "O"), {"device": "auto"})
    downloaded = recorder(monkeypatch, drosophila, "download", tmp_path)
    assert main(["data", "download", "drosophila", "--dest", "D", "--url", "U"]) == 0
    assert downloaded == [(("D", "U"), {"offline": drosophila.OFFLINE_DOWNLOAD})]  # its own offline advice
    assert capsys.readouterr().out.splitlines()[-1] == f"downloaded and verified: {tmp_path}"


def test_an_interrupted_command_says_how_to_continue(monkeypatch, capsys):
    from frem.seg import train

    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", interrupted)
    assert main(["train", "--quick", "--out", "R"]) == 130
    assert capsys.readouterr().err == ("frem train: interrupted; run the same command with --resume to continue the "
                                       "run from its last epoch\n")


def test_a_mistyped_option_is_the_commands_error_with_the_option_meant(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--quik", "--seeed", "3"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("frem train: error: unrecognized arguments: --quik --seeed 3 "
                                       "(did you mean --quick, --seed?)\n")
    with pytest.raises(SystemExit):
        main(["train", "--seeed=12345678"])  # the option is matched, not the option with its value
    assert capsys.readouterr().err.endswith("(did you mean --seed?)\n")


@pytest.mark.parametrize("command, option, values", [
    ("train", "--variant", VARIANTS), ("tune", "--variant", TUNABLE), ("tune", "--pruner", ("hyperband", "median", "none")),
    ("reproduce", "--paper", ("auto", "drosophila", "mouse-liver", "none")), ("train", "--dataset", ("drosophila", "folder")),
    ("tune", "--normalize", NORMALIZATIONS), ("reproduce", "--keep", KEEP)])
def test_an_option_with_choices_takes_each_and_refuses_the_rest(command, option, values, capsys):
    from frem.seg.cli import build_parser
    for value in values:
        assert getattr(build_parser().parse_args([command, option, value]), option[2:]) == value
    for wrong in ["bogus"] + [v for v in VARIANTS if v not in values and option == "--variant"]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, option, wrong])
        assert f"invalid choice: '{wrong}'" in capsys.readouterr().err


def test_only_a_known_data_set_is_downloaded(capsys):
    from frem.seg.cli import build_parser
    assert build_parser().parse_args(["data", "download", "drosophila"]).name == "drosophila"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "download", "isbi2012"])
    err = capsys.readouterr().err
    assert "invalid choice: 'isbi2012'" in err and "drosophila" in err


def test_missing_extras_are_named_from_the_installed_metadata(monkeypatch):
    from importlib import metadata

    from frem.seg import cli

    def requires(name):  # frem's declared requirements, as pip writes them into its metadata
        if name.lower() != "frem":
            raise metadata.PackageNotFoundError(name)
        return ['numpy', 'no-such-dist-frem>=1; extra == "seg"', "tqdm ; extra == 'seg'", 'Pillow>=9; extra == "seg"',
                'no-such-other; extra == "lightning"', 'no-such-third[x] ; python_version >= "3.9" and extra == "seg"']
    monkeypatch.setattr(metadata, "requires", requires)
    assert cli.missing_requirements() == ["no-such-dist-frem", "no-such-third"]
    assert cli.missing_requirements("lightning") == ["no-such-other"]


def test_without_the_seg_extra_the_command_names_it_in_one_line(monkeypatch, capsys):
    from frem.seg import cli
    monkeypatch.setattr(cli, "missing_requirements", lambda: ["segmentation-models-pytorch", "optuna"])
    assert main(["train", "--quick"]) == 2
    assert capsys.readouterr().err == ("frem: the command line needs the 'seg' extra (missing: "
                                       f"segmentation-models-pytorch, optuna): pip install -e \"{ROOT}[seg]\"\n")


FINISHED = {"test": {"miou": 0.5}, "best_epoch": 2, "best_val_miou": 0.25, "device": "cpu", "wall_time_s": 1.26,
            "history": []}
EVERY_TRAIN_OPTION = ["--dataset", "folder", "--data", "D", "--encoder", "resnet18", "--epochs", "3",
                      "--batch-size", "5", "--lr", "0.002", "--seed", "7", "--crop", "96", "--tiles-per-section", "6",
                      "--val-every", "2", "--val-fraction", "0.25", "--split-seed", "3", "--normalize", "dataset",
                      "--keep", "best", "--device", "cpu", "--no-progress"]
GIVEN = {"dataset": "folder", "data": "D", "encoder": "resnet18", "epochs": 3, "batch_size": 5, "lr": 0.002, "seed": 7,
         "crop": 96, "tiles_per_section": 6, "val_every": 2, "val_fraction": 0.25, "split_seed": 3,
         "normalize": "dataset", "keep": "best", "device": "cpu", "progress": False}


def settings(config, names):
    return {name: getattr(config, name) for name in names}


def test_every_training_option_reaches_the_run_with_its_type(monkeypatch, capsys):
    from frem.seg import train
    calls = recorder(monkeypatch, train, "train", FINISHED)
    assert main(["train", "--variant", "supervision", "--lambda", "0.25", "--out", "O", "--resume",
                 *EVERY_TRAIN_OPTION]) == 0
    (config,), _ = calls[0]
    assert settings(config, GIVEN) == GIVEN and (config.variant, config.lambda_, config.out, config.resume) == (
        "supervision", 0.25, "O", True)
    assert all(type(getattr(config, name)) is type(value) for name, value in GIVEN.items())  # "3" is not 3
    assert capsys.readouterr().out == json.dumps({"run": "O", "test": {"miou": 0.5}, "best_epoch": 2, "best_val_miou": 0.25,
                                                  "device": "cpu", "wall_time_s": 1.3}, indent=2) + "\n"


@pytest.mark.parametrize("options, B, X", [(["--B", "12"], 12, 250.0), (["--B", "0.25", "--X", "40"], 0.25, 40.0)])
def test_B_is_a_count_or_a_fraction_and_X_a_float(options, B, X, monkeypatch):
    from frem.seg import train
    calls = recorder(monkeypatch, train, "train", FINISHED)
    assert main(["train", *options]) == 0
    (config,), _ = calls[0]
    assert (config.B, config.X) == (B, X) and type(config.B) is type(B) and type(config.X) is float


@pytest.mark.parametrize("options, out", [([], "runs/frem"), (["--variant", "dropout"], "runs/dropout"),
                                          (["--quick", "--variant", "baseline"], "runs/baseline")])
def test_without_options_a_run_has_the_protocols_defaults_and_its_variants_folder(options, out, monkeypatch):
    from frem.seg import train
    from frem.seg.config import TrainConfig
    calls = recorder(monkeypatch, train, "train", FINISHED)
    assert main(["train", *options]) == 0
    (config,), _ = calls[0]
    variant = options[options.index("--variant") + 1] if "--variant" in options else "frem"
    assert config == TrainConfig.build(quick="--quick" in options, variant=variant, out=out)
    assert config.progress is True and config.resume is False


@pytest.mark.parametrize("command", ["tune", "reproduce"])
def test_tune_and_reproduce_take_the_same_training_options_as_train(command, monkeypatch):
    from frem.seg import reproduce, tune
    from frem.seg.config import TrainConfig
    calls = recorder(monkeypatch, tune, "tune", {}) if command == "tune" else recorder(
        monkeypatch, reproduce, "reproduce", {"verdict": "V", "beside_paper": ""})
    assert main([command, *EVERY_TRAIN_OPTION]) == 0
    (base,), kwargs = calls[0]
    assert settings(base, GIVEN) == GIVEN and kwargs["progress"] is False
    assert main([command]) == 0  # progress bars unless --no-progress
    assert calls[1][1] == ({"trials": 50, "study_name": "frem", "storage": None, "out": "runs/tune", "pruner": "hyperband",
                            "progress": True} if command == "tune" else
                           {"seeds": [0, 1, 2], "out": "reproduction", "results_dir": "reproduction/results",
                            "tune_trials": 20, "paper_tables": "auto", "progress": True})
    assert main([command, "--quick", *(["--trials", "1", "--variant", "supervision"] if command == "tune" else [])]) == 0
    (base,), _ = calls[2]
    assert base == TrainConfig.build(quick=True, variant="supervision" if command == "tune" else "frem")


def test_every_argument_has_help_and_no_help_misstates_a_default():
    """Every option says what it does, and where its help names a default it is the one the code uses."""
    import argparse

    from frem.seg.cli import add_train_options, build_parser
    from frem.seg.config import QUICK, TrainConfig
    from frem.seg.variants import VARIANT_DEFAULTS
    shared = argparse.ArgumentParser()
    add_train_options(shared)
    protocol = {action.dest for action in shared._actions}  # None here: the protocol's default

    def parsers(parser):
        yield parser
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            for sub in action.choices.values():
                yield from parsers(sub)
    checked = 0
    for parser in parsers(build_parser()):
        trains = protocol <= {action.dest for action in parser._actions}  # train, tune, reproduce
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
                continue
            text = action.help
            assert text and len(text) > 8, f"{parser.prog} {action.dest} has no help"
            default = getattr(TrainConfig, action.dest) if trains and action.dest in protocol else action.default
            stated = re.findall(r"\bdefault ([^;),]+)", text) + re.findall(r"^([\w-]+) \(default\b", text)
            if action.dest == "lambda_":
                assert stated == [str(VARIANT_DEFAULTS["supervision"]["lambda_"])]
            elif action.dest in ("B", "X"):
                stated = dict(re.findall(r"([\w-]+): ([\d.]+)", text))
                assert stated == {v: f"{d[action.dest]:g}" for v, d in VARIANT_DEFAULTS.items() if action.dest in d}
            elif default is not None and not isinstance(default, bool):  # 1 == True
                assert stated and stated[0].split(":")[0] == str(default), (parser.prog, action.dest, text)
            checked += bool(stated)
            if trains and action.dest in QUICK:  # what --quick changes, the help says
                assert f"--quick: {QUICK[action.dest]}" in text, (parser.prog, action.dest, text)
        if trains:
            assert "training protocol:" in parser.format_help()
    assert checked >= 20


def test_a_command_without_its_arguments_says_what_is_missing(capsys):
    for args, missing in [([], "command"), (["data"], "data_command"), (["predict", "x.tif", "--out", "O"], "--checkpoint"),
                          (["predict", "--checkpoint", "c.pt", "x.tif"], "--out")]:
        with pytest.raises(SystemExit) as exit:
            main(args)
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"the following arguments are required: {missing}" in err


def test_a_mistyped_option_of_a_nested_command_is_that_commands_error(capsys):
    with pytest.raises(SystemExit):
        main(["data", "download", "drosophila", "--dset", "D"])
    assert capsys.readouterr().err == ("frem data download: error: unrecognized arguments: --dset D "
                                       "(did you mean --dest?)\n")
    with pytest.raises(SystemExit):
        main(["evaluate", "R", "extra"])  # no option to suggest: the error alone
    assert capsys.readouterr().err == "frem evaluate: error: unrecognized arguments: extra\n"


@pytest.mark.parametrize("error", [ValueError("bad value"), TypeError("bad type"), OSError("disk is full")])
def test_an_error_of_the_run_is_one_line_with_the_command_and_status_2(error, monkeypatch, capsys):
    from frem.seg import evaluate

    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(evaluate, "evaluate_run", failing)
    assert main(["evaluate", "R"]) == 2
    assert capsys.readouterr().err == f"frem evaluate: error: {error}\n"


def test_evaluate_and_predict_print_what_they_produced(monkeypatch, capsys, tmp_path):
    from frem.seg import evaluate, predict
    recorder(monkeypatch, evaluate, "evaluate_run", {"miou": 0.25})
    assert main(["evaluate", "R"]) == 0
    assert capsys.readouterr().out == json.dumps({"run": "R", "checkpoint": "best.pt", "split": "test", "miou": 0.25},
                                                 indent=2) + "\n"  # one key a line, for people and for jq
    recorder(monkeypatch, predict, "predict", [tmp_path / "a_labels.png", tmp_path / "a_overlay.png"])
    assert main(["predict", "--checkpoint", "c.pt", "a.png", "--out", "O"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "a_labels.png"), str(tmp_path / "a_overlay.png")]


def test_timms_deprecation_warning_is_silenced_and_no_other(monkeypatch):
    import warnings

    from frem.seg import evaluate
    recorder(monkeypatch, evaluate, "evaluate_run", {})
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert main(["evaluate", "R"]) == 0
        warnings.warn("`torch.jit.interface` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
        warnings.warn("`torch.jit.interface` is deprecated", DeprecationWarning)
    assert [(str(w.message), w.category) for w in shown] == [("something else is deprecated", FutureWarning), (
        "`torch.jit.interface` is deprecated", DeprecationWarning)]


def test_outside_an_installed_frem_nothing_is_reported_missing(monkeypatch):
    from importlib import metadata

    from frem.seg import cli

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "requires", not_installed)
    assert cli.missing_requirements() == []
    monkeypatch.setattr(metadata, "requires", lambda name: None)  # installed without requirements
    assert cli.missing_requirements() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a CUDA GPU has the device asked for")
def test_a_cuda_device_on_a_machine_without_one_is_one_line_in_every_command(trained_run, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    for argv in (["train", "--quick", "--device", "cuda", "--out", str(tmp_path / "run")],
                 ["evaluate", str(trained_run), "--device", "cuda"],
                 ["predict", "--checkpoint", str(trained_run / "best.pt"), str(image), "--out", str(tmp_path / "p"),
                  "--device", "cuda:1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "there is no CUDA GPU on this machine" in err and "--device cpu" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()  # refused before anything was made
