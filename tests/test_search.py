"""The search's own rules: its space, what it reports to the pruner, that pruning prunes, what it maximises.

The trainings are replaced by a stand-in that reports chosen validation scores,
so these run in seconds and test the tuner's bookkeeping, not the network.
"""

import json

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
