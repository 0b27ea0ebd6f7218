"""``frem tune``: TPE search (Optuna) over FREM's B and X, or deep supervision's lambda.

Each trial is a training run in ``OUT/trials/trial-NNNN``, reporting its
validation mIoU every validation to Optuna so a pruner can stop hopeless
trials early. Storage is SQLite by default: a killed search resumes. A killed
trial is failed and re-queued with the same parameters, its training resuming
from its last checkpoint: at once on restart when its process (on this host)
is gone, otherwise by Optuna's heartbeat. Concurrent starts on a new study
wait for each other (a file lock) instead of racing to create its tables.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tqdm.auto import tqdm

import frem.search
from frem.extras import install_command
from frem.seg import checkpoint
from frem.seg.config import TrainConfig
from frem.seg.models import bottleneck_channels, build_model
from frem.seg.search_space import LAMBDA_RANGE, SEARCH_SPACE, TUNABLE
from frem.seg.train import train

# Seconds between heartbeats of a running trial; twice that without one and
# the trial counts as dead, is failed and re-queued.
HEARTBEAT_S = int(os.environ.get("FREM_TUNE_HEARTBEAT", "30"))
SUMMARY = "tune_summary.json"
SCHEMA_LOCK = 0x6672656D  # "frem": the PostgreSQL advisory lock key for creating the schema and the study


_stable_despite_label = frem.search._stable_despite_label


def open_storage(url: str | None, out: Path):
    """SQLite file by default; ``journal:PATH`` for Optuna's journal file; any RDB URL (postgresql://...)."""
    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        url = frem.search.sqlite_url(out / "study.db")
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return frem.search.storage(url, HEARTBEAT_S)
    except ImportError as error:
        raise _missing_driver(url, error) from None


def _missing_driver(url: str, error: ImportError) -> ValueError:
    """SQLAlchemy names the driver it wanted (Optuna re-raises, so the name is on the cause);
    the user needs that name and the install line."""
    scheme = url.split("://", 1)[0]
    driver = error.name or getattr(error.__cause__, "name", None) or error
    remedy = install_command("postgres") if url.startswith("postgres") else "install the driver named"
    return ValueError(f"--storage {scheme}://... needs its database driver ({driver}): {remedy}")


@contextmanager
def _schema_lock(url: str):
    """Create the schema and the study one worker at a time, across machines: on PostgreSQL an
    advisory lock (two workers starting together on a new database otherwise both run Optuna's
    CREATE TYPE / CREATE TABLE and one dies); elsewhere nothing (SQLite: the file lock in open_study)."""
    if not url.startswith("postgres"):
        yield
        return
    import sqlalchemy
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    except ImportError as error:
        raise _missing_driver(url, error) from None
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK})
    finally:
        engine.dispose()


def _retry_callback():
    return frem.search.retry_callback()[1]


def open_study(storage: str | None, out: Path, study_name: str, pruner, *, seed: int) -> optuna.Study:
    """Create or load the study, one process at a time: two workers starting on a new study
    would otherwise both try to create its tables (a file lock on one machine, an advisory
    lock in PostgreSQL across machines).

    The first worker's seed becomes the study's training seed (``train_seed``): every trial
    trains with it, whichever worker runs it, so a trial re-queued to another worker resumes
    the same run; a worker's own ``--seed`` seeds only its sampler.
    """
    out.mkdir(parents=True, exist_ok=True)
    url = storage or ""
    try:
        with open(out / ".study.lock", "a") as lock, _schema_lock(url):
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            study = optuna.create_study(study_name=study_name, storage=open_storage(storage, out),
                                        direction="maximize", load_if_exists=True, pruner=pruner)
            if "train_seed" not in study.user_attrs:
                study.set_user_attr("train_seed", seed)
            return study
    except (sqlalchemy_errors(), UnicodeDecodeError, json.JSONDecodeError) as error:
        # a file that is not a database or a journal (the journal's lines are JSON), a server that refuses
        raise StudyError(_unusable_store(storage, out, error)) from None


class StudyError(ValueError):
    """A study store that cannot be opened; the message names it and what to do."""


def sqlalchemy_errors() -> type:
    """SQLAlchemy's base error (Optuna's RDB storage raises it for a damaged or unreachable database)."""
    import sqlalchemy.exc
    return sqlalchemy.exc.SQLAlchemyError


def _store_file(storage: str | None, out: Path) -> Path | None:
    """The file a study lives in (the default SQLite file, sqlite:///PATH, journal:PATH), else None."""
    if storage is None:
        return out / "study.db"
    for prefix in ("journal:", "sqlite:///"):
        if storage.startswith(prefix):
            return Path(storage.removeprefix(prefix))
    return None


def _unusable_store(storage: str | None, out: Path, error: BaseException) -> str:
    reason = (str(getattr(error, "orig", None) or error).splitlines() or [type(error).__name__])[0]
    where = _store_file(storage, out)
    if where is not None and "locked" in reason:  # SQLite's "database is locked": another process holds it
        return (f"the study store {where} is locked by another process (another frem tune on it, or a program "
                "that holds it open): the study is fine; wait for that process to finish, or stop it, then run "
                "the same command again")
    if where is not None:
        return (f"the study store {where} is damaged ({reason}): move it aside to start a new search there "
                "(the trials' runs in --out are kept), or restore it from a copy")
    shown = frem.search.redact(storage)  # never print a password
    reason = reason.replace(storage, shown)
    return f"cannot use the study store {shown} ({reason}): check that the database server is up and the URL right"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_killed_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue the RUNNING trials whose worker process on this host is gone.

    Optuna's heartbeat finds them too, but only after its grace period and only
    inside ``optimize``; a search restarted at once must not lose them.
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        _retry_callback()(study, study._storage.get_trial(trial._trial_id))
        recovered.append(trial.number)
    with _stable_despite_label():
        optuna.storages.fail_stale_trials(study)  # other hosts' dead workers, by heartbeat
    return recovered


def make_pruner(name: str, validations: int):
    return frem.search.pruner(name, validations)  # the library's, as a user's own loop gets it


def suggest(trial: optuna.Trial, variant: str, channels: int) -> dict:
    if variant in ("frem", "frem-fixed"):
        return frem.search.suggest(trial, channels)
    if variant == "supervision":
        return {"lambda_": trial.suggest_float("lambda", *LAMBDA_RANGE)}
    if variant == "dropout":
        return {"B": trial.suggest_int("B", 1, channels)}
    raise ValueError(f"--variant {variant} has nothing to tune: choose one of {', '.join(TUNABLE)}")


def train_command(base: TrainConfig, params: dict) -> str:
    """The ``frem train`` command that trains the best trial's setting in full, under the search's
    protocol (every setting a trial trained with; floats exactly, as Python writes them back)."""
    args = ["frem", "train", "--variant", base.variant]
    for name, value in params.items():
        args += [f"--{name}", str(value)]
    args += ["--epochs", str(base.epochs), "--seed", str(base.seed), "--encoder", base.encoder,
             "--batch-size", str(base.batch_size), "--lr", str(base.lr), "--val-every", str(base.val_every),
             "--normalize", base.normalize]
    if base.crop is not None:
        args += ["--crop", str(base.crop)]
    if base.tiles_per_section is not None:
        args += ["--tiles-per-section", str(base.tiles_per_section)]
    if base.val_fraction is not None:
        args += ["--val-fraction", str(base.val_fraction)]
    if base.split_seed:
        args += ["--split-seed", str(base.split_seed)]
    if base.dataset != "drosophila":  # a folder of one's own is named by its path; the Drosophila data by
        args += ["--dataset", base.dataset, "--data", base.data]  # name: FREM_DATA or the cache finds it
    if base.quick:
        args += ["--quick"]
    return shlex.join(args + ["--out", f"runs/{base.variant}-tuned"])


def tune(base: TrainConfig, *, trials: int, study_name: str, storage: str | None, out,
         pruner: str = "hyperband", data=None, progress: bool = True) -> dict:
    """Run trials until the study holds ``trials`` finished ones; return the summary."""
    if base.variant not in TUNABLE:
        raise ValueError(f"--variant {base.variant} has nothing to tune: choose one of {', '.join(TUNABLE)}")
    out = Path(out)
    data = data or base.load_data()
    data.announce()
    channels = bottleneck_channels(build_model(base.variant, encoder=base.encoder,
                                               in_channels=data.in_channels, classes=len(data.classes),
                                               B=1, X=1.0))
    validations = -(-base.epochs // base.val_every)
    study = open_study(storage, out, study_name, make_pruner(pruner, validations), seed=base.seed)
    sampler_seed = base.seed
    base = base.with_(seed=study.user_attrs["train_seed"])
    recover_killed_trials(study)
    # Seeded per trial by its number, which the storage hands out once: a resumed or a parallel worker draws
    # settings of its own, and no setting twice (frem.search.sampler).
    study.sampler = frem.search.sampler(sampler_seed)
    study.set_user_attr("variant", base.variant)
    study.set_user_attr("epochs", base.epochs)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, base.variant, channels)
        # A re-queued trial inherits user_attrs, so it finds the killed trial's
        # run folder and resumes that training instead of starting over.
        run_dir = Path(trial.user_attrs.get("run_dir") or out / "trials" / f"trial-{trial.number:04d}")
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        config = base.with_(out=str(run_dir), resume=(run_dir / checkpoint.LAST).exists(), progress=False,
                            **params)

        def report(epoch: int, val_miou: float) -> None:
            trial.set_user_attr("epochs_trained", epoch + 1)
            frem.search.report(trial, val_miou, epoch // base.val_every)

        metrics = train(config, data, on_validation=report)
        trial.set_user_attr("epochs_trained", len(metrics["history"]))
        trial.set_user_attr("test_miou", metrics["test"]["miou"])
        return metrics["best_val_miou"]

    target = max(trials, len(study.get_trials(states=FINISHED)) + len(study.get_trials(states=(TrialState.WAITING,))))
    bar = tqdm(total=target, initial=len(study.get_trials(states=FINISHED)), unit="trial", desc="TPE search",
               disable=not progress, file=sys.stderr)
    try:
        with _interrupt_said_once():
            while len(study.get_trials(states=FINISHED)) < target or study.get_trials(states=(TrialState.WAITING,)):
                study.optimize(objective, callbacks=[StopWhenDone(target, bar)], catch=(), gc_after_trial=True)
                if not wait_for_other_workers(study, storage):
                    break
    except KeyboardInterrupt:
        requeue_interrupted(study)  # the same command continues it, resuming its training
        raise
    finally:
        bar.close()
    summary = summarize(study, base)
    checkpoint.save_json(summary, out / SUMMARY)
    return summary


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class _NotTheInterrupt(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C as failed, with the KeyboardInterrupt's traceback: frem's one line
    says what happened and what continues it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, KeyboardInterrupt) and "KeyboardInterrupt" not in record.getMessage()


@contextmanager
def _interrupt_said_once():
    quiet = _NotTheInterrupt()
    handlers = logging.getLogger("optuna").handlers
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again, with their settings, the trials this process was running when it was interrupted (Optuna
    marks them failed): the next run of the same command resumes their training from the last checkpoint."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    retried = {n for t in study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
    queued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.RUNNING)):
        if trial.user_attrs.get("worker") != me or trial.number in retried:
            continue
        if trial.state == TrialState.RUNNING:  # still running in the storage: mark it failed first
            try:
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        _retry_callback()(study, study._storage.get_trial(trial._trial_id))
        queued.append(trial.number)
    return queued


class StopWhenDone:
    """Stop this worker once the study holds ``target`` finished trials and none waits to be retried.

    Like Optuna's MaxTrialsCallback (each extra worker may finish one trial
    more), but a re-queued trial of a killed worker is always run: nothing is lost.
    """

    def __init__(self, target: int, bar):
        self.target, self.bar = target, bar

    def __call__(self, study: optuna.Study, _trial) -> None:
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        self.bar.n = min(finished, self.bar.total)
        self.bar.refresh()
        if finished >= self.target and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.stop()


def wait_for_other_workers(study: optuna.Study, storage: str | None) -> bool:
    """Before this worker leaves: wait while other workers' trials run, until they finish or are
    declared dead (heartbeat) and re-queued. True if re-queued trials wait to be run.

    Journal storage has no heartbeat: a dead journal worker's trial would be waited for forever,
    so there this returns at once.
    """
    if storage is not None and storage.startswith("journal:"):
        return False
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        time.sleep(min(HEARTBEAT_S, 5))
        recover_killed_trials(study)
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def summarize(study: optuna.Study, base: TrainConfig) -> dict:
    """Best value and what the search cost, in epochs, against full trainings."""
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    spent = sum(t.user_attrs.get("epochs_trained", 0) for t in done)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    summary = {
        "study": study.study_name, "variant": base.variant, "search_space": SEARCH_SPACE,
        "trials": len(done), "complete": len(complete), "pruned": len(done) - len(complete),
        "epochs_per_full_trial": base.epochs, "epochs_spent": spent,
        "epochs_if_every_trial_ran_in_full": len(done) * base.epochs,
        "compute_fraction": spent / max(len(done) * base.epochs, 1),
    }
    if complete:
        best = study.best_trial
        params = dict(best.params)
        summary.update(best_value=best.value, best_params=params, best_trial=best.number,
                       best_test_miou=best.user_attrs.get("test_miou"),
                       train_command=train_command(base, params))
    return summary


def trials_table(study: optuna.Study) -> list[dict]:
    return [{"number": t.number, "state": t.state.name, "value": t.value, **t.params,
             "epochs_trained": t.user_attrs.get("epochs_trained")} for t in study.trials]

