"""Searching B and X with Optuna's TPE in your own training loop, as the paper does.

    import optuna, frem.search

    def objective(trial):
        model = build_model()
        frem.search.attach_trial(model, trial, example_input=batch)   # B in [1, C], X in [1, 1e4]
        for epoch in range(epochs):
            frem.resample(model, epoch)
            train_one_epoch(model)
            frem.search.report(trial, validate(model), epoch)        # the pruner may stop it here
        return validate(model)

    study = optuna.create_study(direction="maximize", storage="sqlite:///frem.db", study_name="frem",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=frem.search.pruner("hyperband", epochs))
    study.optimize(objective, n_trials=30)   # a killed search resumes from the database

The space is relative to the layer's width C (read at attach): B an integer in
[1, C], X log-uniform in [1, 10^4] (the paper found B=162, X=632 of C=512 and
B=8, X=250). Several layers get parameters of their own ("middle.B", ...) and
are searched together. Needs Optuna (``pip install optuna``); ``frem tune``
searches with these same functions.
"""

from __future__ import annotations

B_LOW = 1
X_RANGE = (1.0, 10000.0)  # log-uniform: the paper's X values (250, 632) lie inside with room either side
PRUNERS = ("hyperband", "median", "none")


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
    dim) go to every ``frem.attach``."""
    from frem.hooks import attach, site_width
    from frem.wrappers import unwrap
    layers = [layers] if isinstance(layers, str) or not isinstance(layers, (list, tuple)) else list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer (or 'bottleneck')")
    sites = {}
    for layer in layers:
        site, width = site_width(unwrap(model), layer, example_input, **{k: attach_kwargs[k] for k in ("at", "entry", "dim")
                                                                 if k in attach_kwargs})
        sites[site.layer if len(layers) > 1 else None] = (layer, width)
    seed = attach_kwargs.pop("seed", 0)
    handles = []
    for i, (name, (layer, width)) in enumerate(sites.items()):
        setting = suggest(trial, width, "" if name is None else f"{name or '<model>'}.")
        # each site draws with a seed of its own (seed, seed + 1, ...): independent channels at each
        handles.append(attach(model, layer, **setting, seed=seed + i, example_input=example_input, **attach_kwargs))
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
