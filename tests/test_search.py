"""The search's own rules: its space, what it reports to the pruner, that pruning prunes, what it maximises.

The trainings are replaced by a stand-in that reports chosen validation scores,
so these run in seconds and test the tuner's bookkeeping, not the network.
"""

import json
import os
import re
import socket
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from frem.extras import install_command
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


def gone_pid() -> int:
    """The pid of a process that has ended."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def instant_training(config, data, on_validation=None):
    return {"best_val_miou": 0.5, "test": {"miou": 0.5}, "history": [{"epoch": 0}]}


class Data:
    in_channels, classes = 1, ("a", "b", "c", "d")

    def announce(self):  # the held-out split's line: nothing held out here
        pass


def run(tmp_path, monkeypatch, scores, pruner, trials=6, epochs=4, val_every=1, validations=None):
    seen = []
    monkeypatch.setattr(tuner, "train", fake_training(scores, seen))

    def make_pruner(name, count):
        if validations is not None:
            validations.append(count)
        return pruner
    monkeypatch.setattr(tuner, "make_pruner", make_pruner)
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
    validations = []
    summary, study, _ = run(tmp_path, monkeypatch, [[0.2, 0.3, 0.4, 0.5, 0.6, 0.7]],
                            optuna.pruners.NopPruner(), trials=1, epochs=6, val_every=2, validations=validations)
    assert validations == [3]  # the pruner is made for the validations a full trial reports
    # validations after epochs 1, 3, 5: steps 0, 1, 2, the unit Hyperband's max_resource counts in
    assert sorted(study.trials[0].intermediate_values) == [0, 1, 2]
    assert study.trials[0].intermediate_values == {0: 0.3, 1: 0.5, 2: 0.7}


def test_the_search_maximises_validation_never_test(tmp_path, monkeypatch):
    summary, study, _ = run(tmp_path, monkeypatch, [[0.2, 0.4], [0.5, 0.3]], optuna.pruners.NopPruner(), trials=2,
                            epochs=2)
    assert [t.value for t in study.trials] == [0.4, 0.5]  # the best validation mIoU of each run
    assert summary["best_value"] == 0.5 and summary["best_test_miou"] == 0.99
    assert json.loads((tmp_path / "tune" / "tune_summary.json").read_text())["best_trial"] == 1
    assert summary["train_command"] == tuner.train_command(TrainConfig.build(quick=True, epochs=2, data=str(tmp_path)),
                                                           study.trials[1].params)


@pytest.mark.parametrize("variant, params", [("frem", {"B": 17, "X": 631.8923743928}), ("supervision", {"lambda": 0.3}),
                                             ("dropout", {"B": 200})])
def test_the_printed_train_command_trains_the_best_setting_under_the_searchs_protocol(variant, params, tmp_path):
    import shlex

    from frem.seg.cli import build_parser, train_config
    base = TrainConfig.build(quick=True, variant=variant, epochs=7, val_every=2, crop=128, tiles_per_section=8,
                             lr=3e-4, seed=5, normalize="dataset", data=str(tmp_path), dataset="folder",
                             val_fraction=0.3, split_seed=2)
    command = shlex.split(tuner.train_command(base, params))
    assert command[:2] == ["frem", "train"]
    args = build_parser().parse_args(command[1:])
    again = train_config(args)
    tuned = base.with_(**{("lambda_" if name == "lambda" else name): value for name, value in params.items()})
    assert again.differences(tuned) == [] and again.out == f"runs/{variant}-tuned"


def test_the_printed_train_command_names_the_drosophila_data_by_name_not_by_this_machines_path(tmp_path):
    """A reproduction's summary ships it: the data is found again by FREM_DATA or the cache, checksum-verified."""
    command = tuner.train_command(TrainConfig.build(quick=True, data=str(tmp_path / "drosophila-vnc")), {"B": 3})
    assert str(tmp_path) not in command and "--data" not in command and "--dataset" not in command


def test_a_damaged_study_store_is_one_line_naming_it(tmp_path, capsys, drosophila_root):
    from frem.seg.cli import main
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "study.db").write_text("not a database\n")
    (tmp_path / "journal.log").write_bytes(b"\xff\xfe\x00 not a journal")
    for storage, name in [(None, tmp_path / "t" / "study.db"), (f"journal:{tmp_path / 'journal.log'}",
                                                                   tmp_path / "journal.log")]:
        with pytest.raises(tuner.StudyError, match=rf"^the study store {name} is damaged \(.*\): move it aside"):
            tuner.open_study(storage, tmp_path / "t", "frem", None, seed=0)
    assert (tmp_path / "t" / "study.db").read_text() == "not a database\n"  # nothing was overwritten
    assert main(["tune", "--quick", "--trials", "1", "--out", str(tmp_path / "t"), "--data", str(drosophila_root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged (file is not a database)" in err


def test_a_database_server_that_does_not_answer_is_one_line_without_the_password(tmp_path):
    if not os.environ.get("CI"):  # CI installs the postgres extra
        pytest.importorskip("psycopg", reason='needs the postgres extra: pip install -e ".[postgres]"')
    with pytest.raises(tuner.StudyError, match=r"^cannot use the study store postgresql://frem:\*\*\*@127.0.0.1:1/x "
                                                r"\(.*refused.*\): check that the database server is up"):
        tuner.open_study("postgresql://frem:secret@127.0.0.1:1/x", tmp_path / "p", "frem", None, seed=0)


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
    assert tuner._alive(os.getpid()) and not tuner._alive(gone_pid())


def test_a_worker_of_another_user_is_alive(monkeypatch):
    def not_allowed(pid, signal):
        raise PermissionError(f"cannot signal {pid}")
    monkeypatch.setattr(tuner.os, "kill", not_allowed)
    assert tuner._alive(1)


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


# ---------------------------------------------------------------- workers, storage and the study's records



def test_a_restarted_search_requeues_the_trials_of_its_dead_workers_and_no_other(tmp_path, monkeypatch):
    study = tuner.open_study(None, tmp_path / "search", "s", optuna.pruners.NopPruner(), seed=0)
    host, gone = socket.gethostname(), gone_pid()
    # A live worker first: a loop that stopped at the first trial it keeps would recover nothing after it.
    workers = {"live here": f"{host}:{os.getpid()}", "other host": f"elsewhere-{host}:{gone}", "unnamed": None,
               "raced": f"{host}:{gone}", "dead": f"{host}:{gone}", "dead too": f"{host}:{gone}"}
    trials = {}
    for name, worker in workers.items():
        trial = trials[name] = study.ask()
        trial.suggest_int("B", 1, 512)
        trial.report(0.25, step=0)
        if worker:
            trial.set_user_attr("worker", worker)
    set_state = study._storage.set_trial_state_values

    def finished_by_another_worker(trial_id, state, values=None):
        if trial_id == trials["raced"]._trial_id:
            raise optuna.exceptions.UpdateFinishedTrialError("finished meanwhile")
        return set_state(trial_id, state, values)
    monkeypatch.setattr(study._storage, "set_trial_state_values", finished_by_another_worker)

    recovered = tuner.recover_killed_trials(study)
    assert recovered == [trials["dead"].number, trials["dead too"].number]
    states = {name: study.trials[trial.number].state for name, trial in trials.items()}
    assert states == {"live here": TrialState.RUNNING, "other host": TrialState.RUNNING, "unnamed": TrialState.RUNNING,
                      "raced": TrialState.RUNNING, "dead": TrialState.FAIL, "dead too": TrialState.FAIL}
    retries = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["failed_trial"] for t in retries] == recovered
    for retry, number in zip(retries, recovered):  # the same setting, its validations and its run folder
        assert retry.params == study.trials[number].params and retry.intermediate_values == {0: 0.25}
        assert retry.user_attrs == study.trials[number].user_attrs
    # The retries carry the dead worker's name; checked again (every 5 s while a worker waits), they are
    # waiting to run, not running, and stay as they are.
    assert tuner.recover_killed_trials(study) == [] and study.get_trials(states=(TrialState.WAITING,)) == retries


def test_a_missing_database_driver_is_named_with_its_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ValueError) as postgres:
        tuner.open_storage("postgresql://frem@127.0.0.1:1/x", None)
    assert str(postgres.value).startswith("--storage postgresql://... needs its database driver (psycopg")
    assert str(postgres.value).endswith(f': {install_command("postgres")}') and "[postgres]" in str(postgres.value)
    monkeypatch.setitem(sys.modules, "MySQLdb", None)
    with pytest.raises(ValueError) as mysql:
        tuner.open_storage("mysql://frem@127.0.0.1:1/x", None)
    assert str(mysql.value) == "--storage mysql://... needs its database driver (MySQLdb): install the driver named"
    unnamed = tuner._missing_driver("oracle://frem@host/x", ImportError("no module for oracle"))  # no name, no cause
    assert str(unnamed) == "--storage oracle://... needs its database driver (no module for oracle): install the driver named"


def test_the_first_workers_seed_is_the_studys_training_seed_in_the_storage_named(tmp_path):
    journal = f"journal:{tmp_path / 'j.log'}"
    out = tmp_path / "a" / "new" / "folder"
    first = tuner.open_study(journal, out, "s", optuna.pruners.NopPruner(), seed=3)
    second = tuner.open_study(journal, out, "s", optuna.pruners.NopPruner(), seed=4)
    assert first.user_attrs["train_seed"] == second.user_attrs["train_seed"] == 3
    assert (tmp_path / "j.log").stat().st_size > 0 and not (out / "study.db").exists()


def test_each_trial_records_its_run_folder_and_worker_and_trains_its_setting_on_the_data_given(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(tuner, "train", lambda config, data, on_validation=None: trained.append((config, data)) or {
        "best_val_miou": 0.5, "test": {"miou": 0.25}, "history": [{"epoch": 0}, {"epoch": 1}]})
    journal, data = f"journal:{tmp_path / 'j.log'}", Data()
    base = TrainConfig.build(quick=True, epochs=2, seed=3, data=str(tmp_path))
    tuner.tune(base, trials=2, study_name="s", storage=journal, out=tmp_path / "tune", data=data, progress=False)
    assert not (tmp_path / "tune" / "study.db").exists()  # the storage named, not the default
    study = optuna.load_study(study_name="s", storage=tuner.open_storage(journal, tmp_path))
    assert study.user_attrs == {"train_seed": 3, "variant": "frem", "epochs": 2}
    for trial, (config, given) in zip(study.trials, trained, strict=True):
        run_dir = str(tmp_path / "tune" / "trials" / f"trial-{trial.number:04d}")
        assert trial.user_attrs == {"run_dir": run_dir, "worker": f"{socket.gethostname()}:{os.getpid()}",
                                    "epochs_trained": 2, "test_miou": 0.25}
        assert given is data and config.out == run_dir and not config.resume and not config.progress
        assert config.differences(base.with_(**trial.params)) == []  # the trial's B and X, the rest as given
    assert tuner.trials_table(study) == [{"number": t.number, "state": "COMPLETE", "value": 0.5, **t.params,
                                          "epochs_trained": 2} for t in study.trials]


def test_the_search_space_is_the_tuned_encoders_width(tmp_path, monkeypatch):
    monkeypatch.setattr(tuner, "train", instant_training)
    base = TrainConfig.build(quick=True, epochs=1, data=str(tmp_path), encoder="mobilenet_v2")
    tuner.tune(base, trials=1, study_name="s", storage=None, out=tmp_path / "tune", data=Data(), progress=False)
    study = optuna.load_study(study_name="s", storage=tuner.open_storage(None, tmp_path / "tune"))
    width = bottleneck_channels(build_model("frem", encoder="mobilenet_v2", B=1, X=1.0))
    assert study.trials[0].distributions["B"].high == width != bottleneck_channels(build_model("frem", B=1, X=1.0))


def test_a_second_worker_does_not_replay_the_first_workers_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(tuner, "train", instant_training)
    base = TrainConfig.build(quick=True, epochs=1, data=str(tmp_path), seed=7)

    def search(out, trials):
        tuner.tune(base, trials=trials, study_name="s", storage=None, out=out, data=Data(), progress=False)
        return [t.params for t in optuna.load_study(study_name="s", storage=tuner.open_storage(None, out)).trials]

    first = search(tmp_path / "one", 2)
    assert search(tmp_path / "two", 2) == first  # seeded: the same search twice
    resumed = search(tmp_path / "one", 4)
    assert resumed[:2] == first and not any(p in first for p in resumed[2:])


def test_a_search_shows_its_progress_counting_the_trials_the_study_already_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tuner, "train", instant_training)
    base = TrainConfig.build(quick=True, epochs=1, data=str(tmp_path))
    search = dict(study_name="s", storage=None, out=tmp_path / "tune", data=Data())
    tuner.tune(base, trials=2, progress=False, **search)
    assert "TPE search" not in capsys.readouterr().err  # (Optuna's own log may be there)
    study = optuna.load_study(study_name="s", storage=tuner.open_storage(None, tmp_path / "tune"))
    study.enqueue_trial({"B": 5, "X": 50.0})  # a trial re-queued from a dead worker: it runs as well
    tuner.tune(base, trials=2, **search)  # progress shown by default, on stderr
    shown = capsys.readouterr()
    bars = re.findall(r"TPE search: +\d+%\|[^|]*\| (\d+)/(\d+) \[[^]]*trial", shown.err)
    assert "TPE search" not in shown.out and bars[0] == ("2", "3") and bars[-1] == ("3", "3")


def test_a_requeued_trial_resumes_in_the_killed_trials_run_folder(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(tuner, "train", lambda config, data, on_validation=None: trained.append(config) or
                        instant_training(config, data))
    killed = tmp_path / "tune" / "trials" / "trial-0000"
    killed.mkdir(parents=True)
    (killed / "last.pt").write_bytes(b"")
    study = tuner.open_study(None, tmp_path / "tune", "s", optuna.pruners.NopPruner(), seed=0)
    study.enqueue_trial({"B": 5, "X": 50.0}, user_attrs={"run_dir": str(killed)})
    study.enqueue_trial({"B": 6, "X": 60.0}, user_attrs={"run_dir": str(killed)})  # taking the next number
    base = TrainConfig.build(quick=True, epochs=1, data=str(tmp_path))
    tuner.tune(base, trials=1, study_name="s", storage=None, out=tmp_path / "tune", data=Data(), progress=False)
    assert [(c.out, c.resume) for c in trained] == [(str(killed), True)] * 2


def test_a_leaving_worker_first_runs_the_trial_a_dead_worker_on_its_machine_left(tmp_path, monkeypatch):
    study = tuner.open_study(None, tmp_path / "tune", "s", optuna.pruners.NopPruner(), seed=0)
    trained = []

    def train_while_a_neighbour_dies(config, data, on_validation=None):
        if not trained:  # another worker on this machine takes a trial and is killed
            orphan = study.ask({"B": optuna.distributions.IntDistribution(1, 512),
                                "X": optuna.distributions.FloatDistribution(1.0, 10000.0, log=True)})
            orphan.set_user_attr("worker", f"{socket.gethostname()}:{gone_pid()}")
        trained.append(config.out)
        return instant_training(config, data)
    monkeypatch.setattr(tuner, "train", train_while_a_neighbour_dies)
    slept = []
    monkeypatch.setattr(tuner.time, "sleep", slept.append)
    base = TrainConfig.build(quick=True, epochs=1, data=str(tmp_path))
    summary = tuner.tune(base, trials=1, study_name="s", storage=None, out=tmp_path / "tune", data=Data(),
                         progress=False)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]  # the orphan failed and rerun
    assert (summary["trials"], summary["complete"], summary["epochs_spent"]) == (2, 2, 2)  # the failed one not counted
    assert study.trials[2].system_attrs["failed_trial"] == 1 and len(trained) == 2
    assert slept and all(0 < seconds <= 5 for seconds in slept)  # it looked again at least every 5 s


def test_a_journal_worker_leaves_without_waiting_for_trials_it_cannot_declare_dead(tmp_path, monkeypatch):
    journal = f"journal:{tmp_path / 'j.log'}"
    study = tuner.open_study(journal, tmp_path / "tune", "s", optuna.pruners.NopPruner(), seed=0)
    study.ask().set_user_attr("worker", f"elsewhere:{os.getpid()}")  # another machine's, still running
    monkeypatch.setattr(tuner, "train", instant_training)
    monkeypatch.setattr(tuner.time, "sleep", lambda seconds: pytest.fail("waited on a journal storage"))
    base = TrainConfig.build(quick=True, epochs=1, data=str(tmp_path))
    tuner.tune(base, trials=1, study_name="s", storage=journal, out=tmp_path / "tune", data=Data(), progress=False)


def test_the_default_study_is_a_sqlite_file_in_the_output_folder_made_for_it(tmp_path):
    out = tmp_path / "new" / "deeper"
    optuna.create_study(study_name="s", storage=tuner.open_storage(None, out))
    assert (out / "study.db").stat().st_size > 0


def test_a_worker_is_declared_dead_after_two_missed_heartbeats_and_its_trial_retried_with_its_validations(tmp_path):
    storage = tuner.open_storage(None, tmp_path)
    assert storage.get_heartbeat_interval() == tuner.HEARTBEAT_S and storage.grace_period == 2 * tuner.HEARTBEAT_S
    retry = storage.get_heartbeat_stale_trial_callback()
    assert isinstance(retry, optuna.storages.RetryHeartbeatStaleTrialCallback) and retry._inherit_intermediate_values


def test_a_trial_that_keeps_killing_its_worker_is_retried_three_times_then_left_failed(tmp_path):
    study = tuner.open_study(None, tmp_path, "s", optuna.pruners.NopPruner(), seed=0)
    dead = f"{socket.gethostname()}:{gone_pid()}"
    trial = study.ask()
    trial.suggest_int("B", 1, 512)
    for _ in range(4):
        trial.set_user_attr("worker", dead)
        tuner.recover_killed_trials(study)
        if not study.get_trials(states=(TrialState.WAITING,)):
            break
        trial = study.ask()  # the retry, taken by the next worker, which dies too
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 4  # the first run and three retries


def test_ctrl_c_in_a_search_is_one_line_and_the_trial_is_queued_again_to_resume(tmp_path, monkeypatch, capsys):
    from frem.seg.cli import main

    def interrupted(config, data, on_validation=None):
        on_validation(0, 0.3)
        raise KeyboardInterrupt
    monkeypatch.setattr(tuner, "train", interrupted)
    monkeypatch.setattr(TrainConfig, "load_data", lambda self: Data())
    assert main(["tune", "--quick", "--trials", "2", "--out", str(tmp_path / "t"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["frem tune: interrupted; run the same command again to continue the search: "
                                        "the interrupted trial is queued again and resumes from its last checkpoint"]
    study = optuna.load_study(study_name="frem", storage=tuner.open_storage(None, tmp_path / "t"))
    failed, queued = study.trials
    assert (failed.state, queued.state) == (TrialState.FAIL, TrialState.WAITING)
    assert queued.params == failed.params and queued.user_attrs["run_dir"] == failed.user_attrs["run_dir"]
    assert queued.intermediate_values == {0: 0.3}
    monkeypatch.setattr(tuner, "train", instant_training)
    assert main(["tune", "--quick", "--trials", "2", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    study = optuna.load_study(study_name="frem", storage=tuner.open_storage(None, tmp_path / "t"))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


@pytest.mark.parametrize("name", ["runs %41", "runs ?mode=ro", "a#b"])
def test_a_study_folder_with_url_characters_in_its_name_holds_the_study(tmp_path, monkeypatch, name):
    monkeypatch.setattr(tuner, "train", instant_training)
    monkeypatch.setattr(TrainConfig, "load_data", lambda self: Data())
    from frem.seg.cli import main
    out = tmp_path / name
    assert main(["tune", "--quick", "--trials", "1", "--out", str(out), "--no-progress"]) == 0
    assert (out / "study.db").stat().st_size > 0 and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_study_store_locked_by_another_process_is_said_to_be_locked_not_damaged(tmp_path):
    import sqlite3
    out = tmp_path / "t"
    tuner.open_study(None, out, "s", None, seed=0)
    holder = sqlite3.connect(out / "study.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the file
    try:
        with pytest.raises(tuner.StudyError, match=r"^the study store .*study.db is locked by another process .*: "
                                                    r"the study is fine; wait"):
            tuner.open_study(None, out, "s", None, seed=0)
    finally:
        holder.rollback()
        holder.close()


def test_an_unreachable_server_with_a_slash_in_its_password_never_prints_it(tmp_path, capsys, monkeypatch):
    if not os.environ.get("CI"):
        pytest.importorskip("psycopg", reason='needs the postgres extra: pip install -e ".[postgres]"')
    monkeypatch.setattr(TrainConfig, "load_data", lambda self: Data())
    from frem.seg.cli import main
    assert main(["tune", "--quick", "--trials", "1", "--out", str(tmp_path / "t"), "--no-progress",
                 "--storage", "postgresql://frem:s3c/ret@127.0.0.1:9/frem"]) == 2
    err = capsys.readouterr().err
    assert "s3c" not in err and "ret@" not in err and "postgresql://frem:***@127.0.0.1:9/frem" in err
    assert err.count("\n") == 1
