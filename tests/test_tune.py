"""frem tune: TPE with pruning, a killed search resumes, two workers share a study."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from frem.seg.tune import open_storage

pytestmark = pytest.mark.slow  # minutes in all: left out of `-m "not slow"`

TINY = ["--quick", "--tiles-per-section", "2", "--batch-size", "2", "--no-progress"]


def tune_cmd(data, out, *extra):
    return [sys.executable, "-m", "frem", "tune", "--data", str(data), "--out", str(out), *TINY, *extra]


def test_tune_finds_a_best_setting_and_prints_the_train_command(drosophila_root, tmp_path):
    result = subprocess.run(tune_cmd(drosophila_root, tmp_path / "t", "--trials", "3", "--epochs", "2"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "t" / "tune_summary.json").read_text())
    assert summary["trials"] == 3 and 1 <= summary["best_params"]["B"] <= 512
    assert 1.0 <= summary["best_params"]["X"] <= 10000.0
    assert summary["epochs_spent"] <= summary["epochs_if_every_trial_ran_in_full"] == 6
    assert "frem train --variant frem --B" in result.stdout
    study = optuna.load_study(study_name="frem", storage=open_storage(None, tmp_path / "t"))
    assert all(t.user_attrs["run_dir"].endswith(f"trial-{t.number:04d}") for t in study.trials)


def kill_during_the_first_trial(cmd, env, out):
    """Start a search and SIGKILL it once its first trial has written a checkpoint."""
    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "trials" / "trial-0000" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert last.exists(), "the first trial never wrote a checkpoint"
    worker.send_signal(signal.SIGKILL)  # mid-trial: no cleanup, like a lost machine
    worker.wait()


def test_a_killed_search_resumes_and_its_trial_continues(drosophila_root, tmp_path):
    out = tmp_path / "t"
    env = {**os.environ, "FREM_TUNE_HEARTBEAT": "1"}
    cmd = tune_cmd(drosophila_root, out, "--trials", "2", "--epochs", "6", "--pruner", "none")
    kill_during_the_first_trial(cmd, env, out)
    time.sleep(3)  # past the 2 s grace period: the trial's heartbeat is stale
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name="frem", storage=open_storage(None, out))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 2
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params == study.trials[0].params
    assert retried[0].user_attrs["run_dir"].endswith("trial-0000")  # resumed in place
    history = json.loads((out / "trials" / "trial-0000" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(6))  # every epoch once: nothing retrained


def test_a_search_restarted_at_once_recovers_its_killed_trial(drosophila_root, tmp_path):
    out = tmp_path / "t"
    env = {**os.environ, "FREM_TUNE_HEARTBEAT": "600"}  # the heartbeat alone would wait 20 minutes
    cmd = tune_cmd(drosophila_root, out, "--trials", "2", "--epochs", "6", "--pruner", "none")
    kill_during_the_first_trial(cmd, env, out)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # at once
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name="frem", storage=open_storage(None, out))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.RUNNING) == 0 and states.count(TrialState.FAIL) == 1
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == study.trials[0].params
    history = json.loads((out / "trials" / "trial-0000" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(6))


def test_two_workers_share_one_journal_study(drosophila_root, tmp_path):
    journal = tmp_path / "study.journal"
    cmd = tune_cmd(drosophila_root, tmp_path / "t", "--trials", "2", "--epochs", "1",
                   "--storage", f"journal:{journal}")
    workers = [subprocess.Popen(cmd + ["--seed", str(seed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-2000:]
    study = optuna.load_study(study_name="frem", storage=open_storage(f"journal:{journal}", tmp_path))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) >= 2
    assert len({t.user_attrs["worker"] for t in finished}) == 2


@pytest.mark.parametrize("variant, name", [("supervision", "lambda"), ("dropout", "B")])
def test_other_variants_search_their_own_parameter(drosophila_root, tmp_path, variant, name):
    from frem.seg.config import TrainConfig
    from frem.seg.tune import tune
    base = TrainConfig.build(quick=True, variant=variant, data=str(drosophila_root), epochs=1,
                             tiles_per_section=2, batch_size=2, progress=False,
                             sections={"train": (0,), "val": (12,), "test": (15,)})
    summary = tune(base, trials=1, study_name=variant, storage=None, out=tmp_path / "t")
    assert list(summary["best_params"]) == [name]


def test_nothing_to_tune_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "frem", "tune", "--variant", "baseline"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'baseline'" in result.stderr
