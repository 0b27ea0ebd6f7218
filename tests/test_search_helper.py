"""frem.search: the paper's space relative to the layer's width, the trial's setting as attach's arguments,
reporting to a pruner; and the example that searches a user's own loop on a resumable SQLite study."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from models import HandUNet

import frem
import frem.search

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "search_own_loop.py"


def a_trial(study=None):
    study = study or optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return study, study.ask()


def test_the_space_is_the_papers_relative_to_the_width():
    _, trial = a_trial()
    setting = frem.search.suggest(trial, 48, prefix="deep.")
    assert trial.distributions == {"deep.B": optuna.distributions.IntDistribution(1, 48),
                                   "deep.X": optuna.distributions.FloatDistribution(1.0, 10000.0, log=True)}
    assert setting == {"B": trial.params["deep.B"], "X": trial.params["deep.X"]}
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="channels is the layer's width"):
            frem.search.suggest(trial, bad)


def test_one_site_gets_B_and_X_of_its_measured_width():
    _, trial = a_trial()
    net = HandUNet()
    (handle,) = frem.search.attach_trial(net, trial, example_input=torch.randn(1, 1, 16, 16), mode="fixed")
    assert set(trial.params) == {"B", "X"} and trial.distributions["B"].high == 32  # the bottleneck's width
    assert frem.attached(net) == [handle]
    assert (handle.layer, handle._B_spec, handle.X, handle.mode) == ("middle", trial.params["B"], trial.params["X"],
                                                                     "fixed")


def test_several_sites_have_parameters_and_seeds_of_their_own():
    _, trial = a_trial()
    net = HandUNet()
    deep, skip = frem.search.attach_trial(net, trial, ["middle", "enc2"], example_input=torch.randn(1, 1, 16, 16),
                                          seed=7)
    assert trial.distributions["middle.B"].high == 32 and trial.distributions["enc2.B"].high == 16
    assert (deep.layer, deep.X, deep.seed) == ("middle", trial.params["middle.X"], 7)
    assert (skip.layer, skip.X, skip.seed) == ("enc2", trial.params["enc2.X"], 8)
    net(torch.randn(2, 1, 16, 16))
    assert (deep.B, skip.B) == (trial.params["middle.B"], trial.params["enc2.B"])


def test_a_layer_of_unknown_width_needs_an_example():
    _, trial = a_trial()
    with pytest.raises(ValueError, match="'middle' does not declare its width: pass example_input"):
        frem.search.attach_trial(HandUNet(), trial, "middle")
    with pytest.raises(ValueError, match="layers is empty"):
        frem.search.attach_trial(HandUNet(), trial, [])
    assert not trial.params  # nothing suggested, nothing attached


def test_report_hands_the_score_to_the_pruner():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    frem.search.report(trial, 0.7, 0)
    with pytest.raises(optuna.TrialPruned):
        frem.search.report(trial, 0.2, 1)
    assert study._storage.get_trial(trial._trial_id).intermediate_values == {0: 0.7, 1: 0.2}


def test_the_pruners_and_a_wrong_name():
    assert isinstance(frem.search.pruner("hyperband", 10), optuna.pruners.HyperbandPruner)
    assert frem.search.pruner("hyperband", 10)._max_resource == 10
    assert isinstance(frem.search.pruner("median", 10), optuna.pruners.MedianPruner)
    with pytest.raises(ValueError, match="unknown pruner 'asha': hyperband, median or none"):
        frem.search.pruner("asha", 10)


@pytest.mark.slow
def test_the_example_searches_a_users_loop_and_a_second_run_continues_the_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for run, (trials, total) in enumerate([(3, 3), (2, 5)]):
        result = subprocess.run([sys.executable, str(EXAMPLE), "--trials", str(trials), "--epochs", "3",
                                 "--storage", storage], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{trials} trials in" in result.stdout and f"the study now holds {total}" in result.stdout
    study = optuna.load_study(study_name="frem-own-loop", storage=storage)
    assert len(study.trials) == 5 and all(t.state.is_finished() for t in study.trials)
    assert all(set(t.params) == {"B", "X"} and 1 <= t.params["B"] <= 32 for t in study.trials)
