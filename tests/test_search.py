"""The search's own rules: its space, what it reports to the pruner, that pruning prunes, what it maximises.

The trainings are replaced by a stand-in that reports chosen validation scores,
so these run in seconds and test the tuner's bookkeeping, not the network.
"""

import json
import os

import optuna
import pytest

from frem.seg import tune as tuner
from frem.seg.config import TrainConfig
from frem.seg.models import bottleneck_channels, build_model
from frem.seg.search_space import LAMBDA_RANGE, X_RANGE


class RecordingTrial:
    """A stand-in for optuna.Trial that records every suggestion's bounds."""

    def __init__(self):
        self.asked = {}

    def suggest_int(self, name, low, high):
        self.asked[name] = ("int", low, high)
        return high

    def suggest_float(self, name, low, high, log=False):
        self.asked[name] = ("float", low, high, log)
        return high


@pytest.mark.parametrize("variant, expected", [
    ("frem", {"B": ("int", 1, 512), "X": ("float", *X_RANGE, True)}),
    ("frem-fixed", {"B": ("int", 1, 512), "X": ("float", *X_RANGE, True)}),
    ("dropout", {"B": ("int", 1, 512)}),
    ("supervision", {"lambda": ("float", *LAMBDA_RANGE, False)}),
])
def test_the_search_space_reaches_every_channel(variant, expected):
    trial = RecordingTrial()
    tuner.suggest(trial, variant, 512)
    assert trial.asked == expected
    assert X_RANGE == (1.0, 10000.0) and LAMBDA_RANGE == (0.0, 1.0)


def test_the_channel_count_is_the_bottleneck_of_the_tuned_encoder():
    assert bottleneck_channels(build_model("frem", encoder="resnet18", B=1, X=1.0)) == 512
    assert bottleneck_channels(build_model("shallow", encoder="resnet18")) == 256  # one stage less


def fake_training(scores_by_trial, seen):
    """train() as the tuner calls it: reports each validation, returns best and test scores."""
    def train(config, data, on_validation=None, on_epoch=None):
        trial = int(config.out.rsplit("-", 1)[-1])
        scores = scores_by_trial[trial % len(scores_by_trial)]
        history = []
        for epoch, score in enumerate(scores):
            history.append({"epoch": epoch, "val_miou": score})
            seen.append((trial, epoch))
            validates = (epoch + 1) % config.val_every == 0 or epoch == config.epochs - 1
            if on_validation is not None and validates:
                on_validation(epoch, score)
        return {"best_val_miou": max(scores), "test": {"miou": 0.99}, "history": history}
    return train


class Data:
    in_channels, classes = 1, ("a", "b", "c", "d")


def run(tmp_path, monkeypatch, scores, pruner, trials=6, epochs=4, val_every=1):
    seen = []
    monkeypatch.setattr(tuner, "train", fake_training(scores, seen))
    monkeypatch.setattr(tuner, "make_pruner", lambda name, validations: pruner)
    base = TrainConfig.build(quick=True, epochs=epochs, val_every=val_every, data=str(tmp_path))
    summary = tuner.tune(base, trials=trials, study_name="s", storage=None, out=tmp_path / "tune", data=Data(),
                         progress=False)
    study = optuna.load_study(study_name="s", storage=tuner.open_storage(None, tmp_path / "tune"))
    return summary, study, seen


def test_a_hopeless_trial_is_pruned_and_its_training_stopped(tmp_path, monkeypatch):
    # trials alternate between a good curve and a hopeless one; below 0.5 at any step is pruned
    summary, study, seen = run(tmp_path, monkeypatch, [[0.6, 0.7, 0.8, 0.9], [0.1, 0.1, 0.1, 0.1]],
                               optuna.pruners.ThresholdPruner(lower=0.5))
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED] * 3
    hopeless = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all([e for n, e in seen if n == t.number] == [0] for t in hopeless)  # stopped after one epoch
    assert summary["pruned"] == 3 and summary["epochs_spent"] == 3 * 4 + 3 * 1


def test_the_pruner_gets_one_step_per_validation(tmp_path, monkeypatch):
    summary, study, _ = run(tmp_path, monkeypatch, [[0.2, 0.3, 0.4, 0.5, 0.6, 0.7]],
                            optuna.pruners.NopPruner(), trials=1, epochs=6, val_every=2)
    # validations after epochs 1, 3, 5: steps 0, 1, 2, the unit Hyperband's max_resource counts in
    assert sorted(study.trials[0].intermediate_values) == [0, 1, 2]
    assert study.trials[0].intermediate_values == {0: 0.3, 1: 0.5, 2: 0.7}


def test_the_search_maximises_validation_never_test(tmp_path, monkeypatch):
    summary, study, _ = run(tmp_path, monkeypatch, [[0.2, 0.4], [0.5, 0.3]], optuna.pruners.NopPruner(), trials=2,
                            epochs=2)
    assert [t.value for t in study.trials] == [0.4, 0.5]  # the best validation mIoU of each run
    assert summary["best_value"] == 0.5 and summary["best_test_miou"] == 0.99
    assert json.loads((tmp_path / "tune" / "tune_summary.json").read_text())["best_trial"] == 1


@pytest.mark.parametrize("variant, params", [("frem", {"B": 17, "X": 631.8923743928}), ("supervision", {"lambda": 0.3}),
                                             ("dropout", {"B": 200})])
def test_the_printed_train_command_trains_the_best_setting_under_the_searchs_protocol(variant, params, tmp_path):
    import shlex

    from frem.seg.cli import build_parser, train_kwargs
    base = TrainConfig.build(quick=True, variant=variant, epochs=7, val_every=2, crop=128, tiles_per_section=8,
                             lr=3e-4, seed=5, normalize="dataset", data=str(tmp_path), dataset="folder")
    command = shlex.split(tuner.train_command(base, params))
    assert command[:2] == ["frem", "train"]
    args = build_parser().parse_args(command[1:])
    again = TrainConfig.build(quick=args.quick, **train_kwargs(args))
    tuned = base.with_(**{("lambda_" if name == "lambda" else name): value for name, value in params.items()})
    assert again.differences(tuned) == [] and again.out == f"runs/{variant}-tuned"


def test_a_finished_search_run_again_trains_nothing_more(tmp_path, monkeypatch):
    summary, study, seen = run(tmp_path, monkeypatch, [[0.2, 0.4]], optuna.pruners.NopPruner(), trials=2, epochs=2)
    again, study, seen_again = run(tmp_path, monkeypatch, [[0.2, 0.4]], optuna.pruners.NopPruner(), trials=2, epochs=2)
    assert len(study.trials) == 2 and seen_again == [] and again["best_value"] == summary["best_value"]


def test_a_trial_whose_run_folder_holds_a_checkpoint_resumes_it(tmp_path, monkeypatch):
    """A re-queued trial (its worker was killed) finds the killed trial's run folder and continues it."""
    resumed = []
    monkeypatch.setattr(tuner, "train", lambda config, data, on_validation=None: resumed.append(config.resume) or {
        "best_val_miou": 0.5, "test": {"miou": 0.5}, "history": [{"epoch": 0, "val_miou": 0.5}]})
    (tmp_path / "tune" / "trials" / "trial-0001").mkdir(parents=True)
    (tmp_path / "tune" / "trials" / "trial-0001" / "last.pt").write_bytes(b"")
    base = TrainConfig.build(quick=True, epochs=1, data=str(tmp_path))
    tuner.tune(base, trials=2, study_name="s", storage=None, out=tmp_path / "tune", data=Data(), progress=False)
    assert resumed == [False, True]


def test_leaving_a_worker_waits_only_for_trials_that_can_still_finish(tmp_path, monkeypatch):
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"B": 3})
    assert tuner.wait_for_other_workers(study, None) is True  # a re-queued trial waits to be run
    study.optimize(lambda t: t.suggest_int("B", 1, 4), n_trials=1)
    assert tuner.wait_for_other_workers(study, None) is False  # only finished trials: nothing to wait for
    study.ask()  # a running trial of another worker, which journal storage cannot declare dead
    monkeypatch.setattr(tuner.time, "sleep", lambda s: pytest.fail("waited on journal storage"))
    assert tuner.wait_for_other_workers(study, f"journal:{tmp_path / 'j.log'}") is False


def test_a_worker_is_alive_until_its_process_is_gone():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert tuner._alive(os.getpid()) and not tuner._alive(int(done.stdout))


def test_a_journal_study_lives_in_the_file_named_even_in_a_new_folder(tmp_path):
    path = tmp_path / "new" / "deeper" / "study.log"
    storage = tuner.open_storage(f"journal:{path}", tmp_path / "out")
    optuna.create_study(study_name="s", storage=storage).optimize(lambda t: t.suggest_int("B", 1, 4), n_trials=1)
    assert path.stat().st_size > 0
    again = optuna.load_study(study_name="s", storage=tuner.open_storage(f"journal:{path}", tmp_path / "elsewhere"))
    assert len(again.trials) == 1


@pytest.mark.parametrize("validations", [1, 12, 15])
def test_each_pruner_is_set_to_the_number_of_validations(validations):
    """Hyperband's budget is the validations a trial reports (one step each); the median pruner waits
    for 5 trials and a fifth of the validations. Optuna's own attributes: nothing else shows them."""
    hyperband = tuner.make_pruner("hyperband", validations)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (1, validations, 3)
    median = tuner.make_pruner("median", validations)
    assert type(median) is optuna.pruners.MedianPruner
    assert (median._n_startup_trials, median._n_warmup_steps) == (5, max(1, validations // 5))
    assert type(tuner.make_pruner("none", validations)) is optuna.pruners.NopPruner
    with pytest.raises(ValueError, match="unknown pruner 'asha': hyperband, median or none"):
        tuner.make_pruner("asha", validations)
    assert tuner.make_pruner("hyperband", 0)._max_resource == 1  # a budget of at least one step
