"""FREM in PyTorch Lightning: re-draw the channels at the start of every training epoch.

    import frem

    frem.attach(lit_module.net, "bottleneck", B=8, X=250, example_input=batch)
    trainer = lightning.Trainer(callbacks=[frem.integrations.lightning.FREMResample()])

Works with ``lightning`` or ``pytorch_lightning`` (``pip install "frem[lightning]"``).
The draw is a pure function of (seed, epoch), so a resumed fit and every DDP
rank enhance the same channels without communicating.

``FREMDiagnostics(example_input)`` records the paper's premise
(``frem.diagnostics.Premise``) over every training epoch and logs it to the
trainer's logger as ``frem/bottleneck``, ``frem/skip``, ``frem/gradient_ratio``, ...
"""

from __future__ import annotations

from frem.extras import install_command

try:
    from lightning.pytorch import Callback
except ImportError:
    try:  # the older package name
        from pytorch_lightning import Callback
    except ImportError:
        raise ModuleNotFoundError(f"frem.integrations.lightning needs Lightning: {install_command('lightning')} "
                                  "(or pip install lightning)") from None

import frem
from frem.diagnostics import PerEpoch, numbers


class FREMResample(Callback):
    """Calls ``frem.resample(pl_module, trainer.current_epoch)`` before each training epoch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        frem.resample(pl_module, trainer.current_epoch)


class FREMDiagnostics(PerEpoch, Callback):
    """Logs ``frem.diagnostics.Premise`` of ``network`` (default: the LightningModule) once a training epoch;
    ``history`` keeps every epoch's row for ``frem.diagnostics.plot``."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start(pl_module, pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        row = self.end(trainer.current_epoch)
        if row is not None:
            pl_module.log_dict({f"frem/{key}": value for key, value in numbers(row).items()},
                               on_step=False, on_epoch=True)
