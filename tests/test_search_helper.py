"""frem.search: the paper's space relative to the layer's width, the trial's setting as attach's arguments,
reporting to a pruner; and the example that searches a user's own loop on a resumable SQLite study."""

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn
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
    settings = [(t.params["B"], t.params["X"]) for t in study.trials]
    assert len(set(settings)) == 5  # the second run drew settings of its own (TPESampler(seed=0) replayed them)


def objective(trial):
    """A stand-in training: the setting's score, no training."""
    setting = frem.search.suggest(trial, 32)
    return -abs(setting["B"] - 8) - abs(setting["X"] - 250) / 1000


def test_a_resumed_search_never_replays_its_settings_and_a_seed_repeats_a_search(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    frem.search.create_study(url, "s", seed=0).optimize(objective, n_trials=3)
    frem.search.create_study(url, "s", seed=0).optimize(objective, n_trials=3)  # resumed, same seed
    first = [t.params for t in optuna.load_study(study_name="s", storage=url).trials]
    assert len(first) == 6 and all(p not in first[:3] for p in first[3:])
    again = f"sqlite:///{tmp_path / 'b.db'}"
    frem.search.create_study(again, "s", seed=0).optimize(objective, n_trials=6)
    assert [t.params for t in optuna.load_study(study_name="s", storage=again).trials] == first  # reproducible


WORKER = """
import sys, time
import frem.search
study = frem.search.create_study(sys.argv[1], "s", seed=0)
def slow(trial):
    value = {"value": None}
    setting = frem.search.suggest(trial, 32)
    time.sleep(0.2)
    return -abs(setting["B"] - 8)
study.optimize(slow, n_trials=4)
"""


def test_parallel_workers_never_draw_the_same_setting(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    frem.search.create_study(url, "s", seed=0)  # made once, so both workers load it
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, url], stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read()[-2000:]
    params = [tuple(sorted(t.params.items())) for t in optuna.load_study(study_name="s", storage=url).trials]
    assert len(params) == 8 and len(set(params)) == 8  # both with seed 0, as the documented recipe had them


def test_a_small_space_is_drawn_again_before_a_setting_repeats():
    study = frem.search.create_study(None, "s", seed=0)
    study.optimize(lambda trial: trial.suggest_int("B", 1, 6), n_trials=6)
    assert sorted(t.params["B"] for t in study.trials) == [1, 2, 3, 4, 5, 6]


KILLED = """
import os, signal, sys, time
import frem.search
study = frem.search.create_study(sys.argv[1], "s", seed=0, heartbeat=1)
def dies(trial):
    frem.search.suggest(trial, 32)
    trial.report(0.5, 0)
    # Optuna fails a dead worker's trial by its last heartbeat, which its thread writes as the
    # trial starts; a worker killed before that write leaves no heartbeat, and a running trial
    # without one is never failed. Real training lasts; here, give the thread its moment.
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-trial
study.optimize(dies, n_trials=1)
"""


def test_a_killed_workers_trial_is_retried_with_its_setting_by_the_next_worker(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    killed = subprocess.run([sys.executable, "-c", KILLED, url], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9
    (dead,) = optuna.load_study(study_name="s", storage=url).trials
    assert dead.state == optuna.trial.TrialState.RUNNING  # left running: no one said otherwise
    time.sleep(3.5)  # past the 2 s grace, counted in SQLite's whole seconds
    seen = []
    study = frem.search.create_study(url, "s", seed=0, heartbeat=1)
    study.optimize(lambda trial: seen.append(frem.search.suggest(trial, 32)) or 1.0, n_trials=1)
    first, retried = study.trials[:2]
    assert first.state == optuna.trial.TrialState.FAIL and retried.state == optuna.trial.TrialState.COMPLETE
    assert retried.params == dead.params and seen[0] == {"B": dead.params["B"], "X": dead.params["X"]}
    assert retried.intermediate_values == {0: 0.5}


def test_an_enqueued_setting_wider_than_the_layer_is_refused_at_attach_trial_with_nothing_attached():
    study = optuna.create_study()
    study.enqueue_trial({"middle.B": 4, "middle.X": 10.0, "enc2.B": 64, "enc2.X": 10.0})
    trial = study.ask()
    net = HandUNet()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"trial 0's enc2.B=64 does not fit: B=64 is "
                                                                   r"larger than the 16 channels of layer 'enc2'"):
        frem.search.attach_trial(net, trial, ["middle", "enc2"], example_input=torch.randn(1, 1, 16, 16))
    assert not frem.attached(net)


def test_no_storage_url_is_ever_shown_with_its_password():
    for url, shown in (("postgresql://frem:s3c/ret@127.0.0.1:9/frem", "postgresql://frem:***@127.0.0.1:9/frem"),
                       ("postgresql://frem:p@ss@host/db", "postgresql://frem:***@host/db"),
                       ("postgresql+psycopg://u:x%2Fy@h:5432/d", "postgresql+psycopg://u:***@h:5432/d"),
                       ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
                       ("mysql://nopass@host/db", "mysql://nopass@host/db")):
        assert frem.search.redact(url) == shown
    assert "s3c" not in frem.search.redact("not a url://u:s3c@h")


def test_a_sqlite_url_keeps_a_folder_name_as_it_is(tmp_path):
    from sqlalchemy.engine import make_url
    for name in ("runs %41", "runs ?mode=ro", "a#b"):
        path = tmp_path / name / "study.db"
        assert make_url(frem.search.sqlite_url(path)).database == str(path)


def test_a_channels_last_layers_width_is_its_last_dim():
    """B's bound is the channel count in dim -1 of an (N, H, W, C) map, not its height."""
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.mix = nn.Linear(8, 12)
            self.up = nn.ConvTranspose2d(12, 2, 2, stride=2)

        def forward(self, x):
            return self.up(self.mix(self.down(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    _, trial = a_trial()
    (handle,) = frem.search.attach_trial(ChannelsLast(), trial, "mix", example_input=torch.randn(1, 1, 16, 32))
    assert trial.distributions["B"].high == 12 and handle.dim == -1  # not 8 (H) or 16 (W)
