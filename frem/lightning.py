"""FREM in PyTorch Lightning: re-draw the channels at the start of every training epoch.

    import frem

    frem.attach(lit_module.net, "bottleneck", B=8, X=250, example_input=batch)
    trainer = lightning.Trainer(callbacks=[frem.lightning.FREMResample()])

Works with ``lightning`` or ``pytorch_lightning`` (``pip install "frem[lightning]"``).
The draw is a pure function of (seed, epoch), so a resumed fit and every DDP
rank enhance the same channels without communicating.
"""

from __future__ import annotations

from frem.extras import install_command

try:
    from lightning.pytorch import Callback
except ImportError:
    try:  # the older package name
        from pytorch_lightning import Callback
    except ImportError:
        raise ModuleNotFoundError(f"frem.lightning needs Lightning: {install_command('lightning')} "
                                  "(or pip install lightning)") from None

import frem


class FREMResample(Callback):
    """Calls ``frem.resample(pl_module, trainer.current_epoch)`` before each training epoch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        frem.resample(pl_module, trainer.current_epoch)
