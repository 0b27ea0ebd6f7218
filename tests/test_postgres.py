"""A search across machines: frem tune workers on one study in a real PostgreSQL server.

The server is PostgreSQL's own initdb/pg_ctl, started on loopback for the
session (as the ``postgres`` user when the tests run as root: PostgreSQL
refuses root). Needs the PostgreSQL binaries and the ``postgres`` extra
(psycopg 3); CI has both and fails rather than skips without them.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from frem.extras import ROOT

pytestmark = pytest.mark.slow


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _require(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url():
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    _require(initdb is not None and pg_ctl is not None, "no PostgreSQL server binaries (initdb, pg_ctl)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _require(False, 'no PostgreSQL driver: pip install -e ".[postgres]"')
    as_postgres = []
    folder = Path(tempfile.mkdtemp(prefix="frem-postgres-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_postgres, initdb, "-D", str(data), "-U", "frem", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "start", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"], check=True, capture_output=True)
    try:
        yield f"postgresql://frem@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def new_database(server: str, name: str) -> str:
    import sqlalchemy
    engine = sqlalchemy.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{server}/{name}"


def tune_command(url, out, data, seed, trials=4):
    return [sys.executable, "-m", "frem", "tune", "--quick", "--storage", url, "--study", "frem", "--trials",
            str(trials), "--out", str(out), "--data", str(data), "--epochs", "3", "--tiles-per-section", "4",
            "--batch-size", "4", "--seed", str(seed), "--no-progress", "--pruner", "none"]


def test_without_the_driver_one_line_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['psycopg'] = None; sys.modules['psycopg2'] = None\n"
            "from frem.seg.tune import open_storage\n"
            "try:\n    open_storage('postgresql://frem@127.0.0.1:1/x', None)\n"
            "except ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("--storage postgresql://... needs ") and f'pip install -e "{ROOT}[postgres]"' in done.stdout


def test_three_workers_on_a_new_database_one_killed_mid_trial_lose_nothing(postgres_url, drosophila_root, tmp_path):
    import optuna
    from optuna.trial import TrialState
    url = new_database(postgres_url, "search")
    env = {**os.environ, "FREM_TUNE_HEARTBEAT": "2", "OMP_NUM_THREADS": "1"}
    # A folder each, as on machines that share no file lock: only the database can keep them apart.
    workers = [subprocess.Popen(tune_command(url, tmp_path / f"machine{seed}", drosophila_root, seed), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(3)]
    victim = workers[2]
    deadline, killed = time.time() + 600, None
    while killed is None and time.time() < deadline:  # wait until the victim runs a trial, then kill it
        time.sleep(0.2)
        assert victim.poll() is None, f"the third worker ended before it could be killed: {victim.stderr.read()}"
        try:
            study = optuna.load_study(study_name="frem", storage=url)
        except (KeyError, Exception):  # the schema or the study is not there yet
            continue
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
        if running and running[0].user_attrs.get("epochs_trained"):  # mid-trial: an epoch is done
            victim.send_signal(signal.SIGKILL)
            victim.wait()  # reaped: a zombie would still look alive to a pid check
            killed = running[0].number
    assert killed is not None, "the third worker never started a trial"
    for worker in workers[:2]:
        out, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-3000:]  # no DuplicateObject from racing schema creation
    study = optuna.load_study(study_name="frem", storage=url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert 4 <= len(finished) <= 4 + 2  # at most one more than asked per extra worker
    assert study.trials[killed].state == TrialState.FAIL
    retries = [t for t in finished if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1, "the killed trial was not retried"
    assert retries[0].user_attrs["run_dir"] == study.trials[killed].user_attrs["run_dir"]  # resumed its own run
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def _start_together(url, out, barrier, results):
    import optuna

    from frem.seg.tune import open_study
    barrier.wait()  # all at once: the moment Optuna creates its schema
    try:
        study = open_study(url, Path(out), "together", optuna.pruners.NopPruner(), seed=0)
        results.put(("ok", study.user_attrs["train_seed"]))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put(("error", f"{type(error).__name__}: {str(error).splitlines()[0]}"))


def test_workers_starting_together_on_a_new_database_all_get_the_study(postgres_url, tmp_path):
    import multiprocessing
    url = new_database(postgres_url, "together")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_start_together, args=(url, tmp_path / f"machine{i}", barrier, results))
                 for i in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == [("ok", 0)] * 4, outcomes


OWN_LOOP_WORKER = """
import os, signal, sys, time
import frem.search
study = frem.search.create_study(sys.argv[1], "own", seed=0, heartbeat=1)
def objective(trial):
    setting = frem.search.suggest(trial, 32)
    if sys.argv[2] == "die":
        trial.report(0.25, 0)
        time.sleep(1.5)  # let the heartbeat thread write once: a trial without a heartbeat is never failed
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-trial, as a lost machine would be
    time.sleep(0.3)
    return -abs(setting["B"] - 8)
study.optimize(objective, n_trials=int(sys.argv[3]))
"""


def test_a_users_own_search_on_postgresql_retries_a_killed_workers_trial_and_never_repeats(postgres_url, tmp_path):
    """frem.search.create_study in a user's own loop, on a PostgreSQL server: a worker killed mid-trial leaves its
    trial running; the next workers fail it and run it again with its setting; two workers at once draw settings
    of their own."""
    import optuna
    from optuna.trial import TrialState
    url = new_database(postgres_url, "own")
    killed = subprocess.run([sys.executable, "-c", OWN_LOOP_WORKER, url, "die", "1"], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (dead,) = optuna.load_study(study_name="own", storage=url).trials
    assert dead.state == TrialState.RUNNING
    time.sleep(2.5)  # two missed heartbeats
    workers = [subprocess.Popen([sys.executable, "-c", OWN_LOOP_WORKER, url, "live", "3"], stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()[-2000:]
    trials = optuna.load_study(study_name="own", storage=url).trials
    assert trials[0].state == TrialState.FAIL
    retried = [t for t in trials[1:] if t.params == dead.params]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].intermediate_values == {0: 0.25}
    settings = [tuple(sorted(t.params.items())) for t in trials[1:]]
    assert len(trials) == 7 and len(set(settings)) == 6  # the retry and five new settings, none twice
