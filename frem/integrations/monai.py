"""FREM in MONAI's training engines: re-draw the channels at the start of every epoch.

    import frem

    frem.attach(network, "bottleneck", B=8, X=250, example_input=batch)
    trainer = monai.engines.SupervisedTrainer(..., network=network,
                                              train_handlers=[frem.integrations.monai.FREMResample(), ...])

A MONAI-style event handler (``attach(engine)``, then called by the engine):
at ``Events.EPOCH_STARTED`` it calls ``frem.resample(engine.network, epoch)``
with frem's 0-based epoch (ignite counts from 1), so a resumed engine
re-draws what an uninterrupted one would. Needs MONAI and pytorch-ignite
(``pip install "frem[monai]"``).

``FREMDiagnostics(example_input)`` records the paper's premise
(``frem.diagnostics.Premise``) over every epoch and puts it into
``engine.state.metrics`` as ``frem_bottleneck``, ``frem_skip``, ... (what
MONAI's ``StatsHandler`` prints and its TensorBoard handler writes).
"""

from __future__ import annotations

import frem
from frem.diagnostics import PerEpoch, numbers
from frem.extras import install_command


class FREMResample:
    """Re-draw every FREM of ``network`` (default: the engine's own) when each epoch starts."""

    def __init__(self, network=None):
        self.network = network

    def attach(self, engine) -> None:
        try:
            from ignite.engine import Events
        except ImportError:
            raise ModuleNotFoundError("frem.integrations.monai needs MONAI's engines and pytorch-ignite: "
                                      + install_command("monai")) from None
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        frem.resample(self.network if self.network is not None else engine.network, engine.state.epoch - 1)


class FREMDiagnostics(PerEpoch):
    """``frem.diagnostics.Premise`` of ``network`` (default: the engine's) over each epoch, into the engine's
    metrics at its end; ``history`` keeps every epoch's row for ``frem.diagnostics.plot``."""

    def attach(self, engine) -> None:
        try:
            from ignite.engine import Events
        except ImportError:
            raise ModuleNotFoundError("frem.integrations.monai needs MONAI's engines and pytorch-ignite: "
                                      + install_command("monai")) from None
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.start(e.network, getattr(e.state, "device", None)))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def completed(self, engine) -> None:
        row = self.end(engine.state.epoch - 1)  # frem's epochs count from 0, ignite's from 1
        if row is not None:
            engine.state.metrics.update({f"frem_{key}": value for key, value in numbers(row).items()})
