"""FREM in MONAI's training engines: re-draw the channels at the start of every epoch.

    import frem
from frem.extras import install_command

    frem.attach(network, "bottleneck", B=8, X=250, example_input=batch)
    trainer = monai.engines.SupervisedTrainer(..., network=network,
                                              train_handlers=[frem.monai.FREMResample(), ...])

A MONAI-style event handler (``attach(engine)``, then called by the engine):
at ``Events.EPOCH_STARTED`` it calls ``frem.resample(engine.network, epoch)``
with frem's 0-based epoch (ignite counts from 1), so a resumed engine
re-draws what an uninterrupted one would. Needs MONAI and pytorch-ignite
(``pip install "frem[monai]"``).
"""

from __future__ import annotations

import frem


class FREMResample:
    """Re-draw every FREM of ``network`` (default: the engine's own) when each epoch starts."""

    def __init__(self, network=None):
        self.network = network

    def attach(self, engine) -> None:
        try:
            from ignite.engine import Events
        except ImportError:
            raise ModuleNotFoundError("frem.monai needs MONAI's engines and pytorch-ignite: "
                                      + install_command("monai")) from None
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        frem.resample(self.network if self.network is not None else engine.network, engine.state.epoch - 1)
