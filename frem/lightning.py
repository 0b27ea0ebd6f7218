"""FREM in PyTorch Lightning: re-draw the channels at the start of every training epoch.

    import frem

    frem.attach(lit_module.net, "bottleneck", B=8, X=250, example_input=batch)
    trainer = lightning.Trainer(callbacks=[frem.lightning.FREMResample()])

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
        raise ModuleNotFoundError(f"frem.lightning needs Lightning: {install_command('lightning')} "
                                  "(or pip install lightning)") from None

import frem


class FREMResample(Callback):
    """Calls ``frem.resample(pl_module, trainer.current_epoch)`` before each training epoch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        frem.resample(pl_module, trainer.current_epoch)


class FREMDiagnostics(Callback):
    """Logs ``frem.diagnostics.Premise`` of ``network`` (default: the LightningModule) once a training epoch;
    ``history`` keeps every epoch's row for ``frem.diagnostics.plot``."""

    def __init__(self, example_input, network=None):
        self.example_input, self.network = example_input, network
        self.premise, self._recording = None, None

    @property
    def history(self) -> list:
        return self.premise.history if self.premise is not None else []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        from frem.diagnostics import Premise
        if self.premise is None:
            example = self.example_input.to(pl_module.device) if hasattr(self.example_input, "to") else \
                self.example_input
            self.premise = Premise(self.network if self.network is not None else pl_module, example)
        self._recording = self.premise.recording()
        self._recording.__enter__()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._recording is None:
            return
        self._recording.__exit__(None, None, None)
        self._recording = None
        row = self.premise.epoch_end(trainer.current_epoch)
        pl_module.log_dict({f"frem/{key}": value for key, value in row.items() if key != "epoch"},
                           on_step=False, on_epoch=True)
