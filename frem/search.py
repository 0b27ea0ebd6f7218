"""Searching B and X with Optuna's TPE in your own training loop, as the paper does.

    import frem.search

    def objective(trial):
        model = build_model()
        frem.search.attach_trial(model, trial, example_input=batch)   # B in [1, C], X in [1, 1e4]
        for epoch in range(epochs):
            frem.resample(model, epoch)
            train_one_epoch(model)
            frem.search.report(trial, validate(model), epoch)        # the pruner may stop it here
        return validate(model)

    study = frem.search.create_study("sqlite:///frem.db", "frem", seed=0,
                                     pruner=frem.search.pruner("hyperband", epochs))
    study.optimize(objective, n_trials=30)   # run it again, or in parallel: the search goes on

The space is relative to the layer's width C (read at attach): B an integer in
[1, C], X log-uniform in [1, 10^4] (the paper found B=162, X=632 of C=512 and
B=8, X=250). Several layers get parameters of their own ("middle.B", ...) and
are searched together. Needs Optuna (``pip install optuna``); ``frem tune``
searches with these same functions.

A search never repeats itself: ``sampler(seed)`` (what ``create_study`` uses)
seeds TPE afresh for each trial from (seed, the trial's number), which the
storage hands out once, so a resumed run and parallel workers draw their own
settings (``TPESampler(seed=0)`` in each process would replay the same ones);
a setting a finished or running trial already has is drawn again. On a
database storage, a worker that dies mid-trial stops its heartbeat, and the
next worker to start a trial fails it and queues it again with the same
setting (Optuna's heartbeat and retry callback).
"""

from __future__ import annotations

B_LOW = 1
X_RANGE = (1.0, 10000.0)  # log-uniform: the paper's X values (250, 632) lie inside with room either side
PRUNERS = ("hyperband", "median", "none")
HEARTBEAT_S = 60  # a running trial's heartbeat; after twice that without one its worker counts as dead
RETRIES = 3       # a dead worker's trial is queued again at most this often
REDRAWS = 32      # fresh draws before a setting that some trial already has is accepted (a small, spent space)


def _optuna():
    try:
        import optuna
    except ImportError:
        from frem.extras import install_command
        raise ModuleNotFoundError(f"frem.search needs Optuna: pip install optuna (or {install_command('seg')})") \
            from None
    return optuna


def suggest(trial, channels: int, prefix: str = "") -> dict:
    """B and X for a layer of ``channels`` channels, as ``frem.attach``'s keyword arguments."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels is the layer's width, an integer >= 1, got {channels!r}")
    return {"B": trial.suggest_int(f"{prefix}B", B_LOW, channels),
            "X": trial.suggest_float(f"{prefix}X", *X_RANGE, log=True)}


def attach_trial(model, trial, layers="bottleneck", *, example_input=None, **attach_kwargs) -> list:
    """Attach FREM at each of ``layers`` (a name, a module, ``"bottleneck"``, or a list of them) with the
    trial's B and X for it; return the FREMs. One layer: parameters ``B``, ``X``; several: ``LAYER.B``,
    ``LAYER.X`` each, and seeds ``seed``, ``seed + 1``, ... in that order. ``attach_kwargs`` (mode, at, entry,
    dim, redraw) go to every ``frem.attach``. All or nothing: a setting a layer cannot take (an enqueued B
    wider than the layer) is refused here, naming the trial's B, with no FREM left attached."""
    from frem.hooks import attach, site_width
    from frem.selection import resolve_count
    from frem.wrappers import unwrap
    layers = [layers] if isinstance(layers, str) or not isinstance(layers, (list, tuple)) else list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer (or 'bottleneck')")
    sites = {}
    for layer in layers:
        site, width = site_width(unwrap(model), layer, example_input,
                                 **{k: attach_kwargs[k] for k in ("at", "entry", "dim") if k in attach_kwargs})
        sites[site.layer if len(layers) > 1 else None] = (layer, width)
    seed = attach_kwargs.pop("seed", 0)
    settings = []
    for name, (layer, width) in sites.items():
        prefix = "" if name is None else f"{name or '<model>'}."
        setting = suggest(trial, width, prefix)
        try:
            resolve_count(setting["B"], width, name or layer if isinstance(layer, str) else name)
        except ValueError as error:  # a fixed (enqueued) parameter outside the space: Optuna only warns
            raise ValueError(f"trial {trial.number}'s {prefix}B={setting['B']} does not fit: {error}; enqueue a B "
                             f"in [{B_LOW}, {width}]") from None
        settings.append((layer, setting))
    handles = []
    try:
        for i, (layer, setting) in enumerate(settings):
            # each site draws with a seed of its own (seed, seed + 1, ...): independent channels at each
            handles.append(attach(model, layer, **setting, seed=seed + i, example_input=example_input,
                                  **attach_kwargs))
    except Exception:
        for handle in handles:
            handle.remove()
        raise
    return handles


def report(trial, value: float, step: int) -> None:
    """Report a validation score to the trial; raise ``optuna.TrialPruned`` when the pruner says stop."""
    trial.report(value, step=step)
    if trial.should_prune():
        raise _optuna().TrialPruned()


def pruner(name: str, steps: int):
    """Optuna's pruner ``name`` (hyperband, median, none) for trials that report ``steps`` times."""
    optuna = _optuna()
    if name == "hyperband":  # the trials that report least often still get a full rung
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1), reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, steps // 5))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}: {', '.join(PRUNERS[:-1])} or {PRUNERS[-1]}")


def sampler(seed: int = 0, **tpe_kwargs):
    """TPE that never replays a search: each trial gets ``TPESampler(seed=f(seed, trial.number))`` (TPE keeps
    no state between trials but its random generator, and the storage hands each trial number out once), so
    resumed runs and parallel workers draw settings of their own, reproducibly for a given seed; a setting that
    a finished or running trial already has is drawn again (up to ``REDRAWS`` times). ``tpe_kwargs`` go to
    ``optuna.samplers.TPESampler``."""
    optuna = _optuna()

    class DistinctSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self._cache: dict = {}

        def _tpe(self, trial, attempt: int = 0):
            key = (trial.number, attempt)
            if key not in self._cache:
                self._cache = {k: v for k, v in self._cache.items() if k[0] == trial.number}  # one trial's
                self._cache[key] = optuna.samplers.TPESampler(
                    seed=(int(seed) * 1_000_003 + trial.number * 101 + attempt) % 2**32, **tpe_kwargs)
            return self._cache[key]

        def infer_relative_search_space(self, study, trial):
            return self._tpe(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            params = self._tpe(trial).sample_relative(study, trial, search_space)
            for attempt in range(1, REDRAWS):
                if not params or not _taken(study, trial, params):
                    break
                params = self._tpe(trial, attempt).sample_relative(study, trial, search_space)
            return params

        def sample_independent(self, study, trial, name, distribution):
            value = self._tpe(trial).sample_independent(study, trial, name, distribution)
            for attempt in range(1, REDRAWS):  # the last parameter completes a setting: is it taken?
                if not _taken(study, trial, {**trial.params, name: value}):
                    break
                value = self._tpe(trial, attempt).sample_independent(study, trial, name, distribution)
            return value

        def before_trial(self, study, trial):
            self._tpe(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self._tpe(trial).after_trial(study, trial, state, values)

        def reseed_rng(self):
            pass  # the seed comes from each trial's number

    return DistinctSampler()


def _taken(study, trial, params: dict) -> bool:
    """A finished or running trial (other than ``trial``) has exactly ``params``."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return any(t.params == params for t in study.get_trials(deepcopy=False, states=states) if t.number != trial.number)


def storage(url: str, heartbeat: int = HEARTBEAT_S):
    """An Optuna storage for ``url``. A database (``sqlite:///``, ``postgresql://`` ...): with a heartbeat,
    so a trial whose worker died (killed, its machine gone) is failed and queued again with the same setting
    (up to ``RETRIES`` times) when the next trial starts. Anything else (``journal:PATH`` ...) as Optuna
    takes it. Never prints the URL's password."""
    optuna = _optuna()
    if "://" not in url or url.startswith("journal"):
        return url
    from optuna.storages import RDBStorage
    with _stable_despite_label():
        name, callback = retry_callback()
        return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat, **{name: callback})


def _stable_despite_label():
    """Heartbeats and retries have worked since Optuna 2.9 but are still labelled experimental."""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def quiet():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _optuna().exceptions.ExperimentalWarning)
            yield
    return quiet()


def retry_callback() -> tuple[str, object]:
    """(RDBStorage's keyword, the callback) that queues a dead worker's trial again with its setting and its
    reported validations, at most ``RETRIES`` times: Optuna 5's stale-trial callback, Optuna 4's failed-trial
    one."""
    with _stable_despite_label():
        try:
            from optuna.storages import RetryHeartbeatStaleTrialCallback
            return "heartbeat_stale_trial_callback", RetryHeartbeatStaleTrialCallback(
                max_retry=RETRIES, inherit_intermediate_values=True)
        except ImportError:  # Optuna 4
            from optuna.storages import RetryFailedTrialCallback
            return "failed_trial_callback", RetryFailedTrialCallback(max_retry=RETRIES,
                                                                     inherit_intermediate_values=True)


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: everything between ``user:`` and the last
    ``@`` (a password may hold ``/`` or ``@``, which URL parsers split on; masking too much is the safe side)."""
    import re
    return re.sub(r"^([^:/]*://[^:/@]*:).*@", r"\1***@", url, flags=re.DOTALL)


def sqlite_url(path) -> str:
    """The ``sqlite:///`` URL of a file, its path quoted: a folder named "runs %41" or "runs ?mode=ro" is that
    folder, not a percent escape or a query string."""
    from pathlib import Path

    from sqlalchemy.engine import URL
    return URL.create("sqlite", database=str(Path(path).resolve())).render_as_string(hide_password=False)


def create_study(storage_url: str | None = None, study_name: str = "frem", *, seed: int = 0, pruner=None,
                 direction: str = "maximize", heartbeat: int = HEARTBEAT_S):
    """``optuna.create_study`` for a search that can be resumed and run in parallel: loads the study if it
    exists, samples with ``sampler(seed)`` (no setting twice), and on a database ``storage(url)`` (a dead
    worker's trial is retried). In memory when ``storage_url`` is None."""
    optuna = _optuna()
    return optuna.create_study(study_name=study_name, direction=direction, load_if_exists=True,
                               storage=storage(storage_url, heartbeat) if storage_url is not None else None,
                               sampler=sampler(seed), pruner=pruner)
