"""FREM in nnU-Net v2: a mixin that adds FREM to any nnU-Net trainer class.

    from frem.integrations.nnunet import FREMMixin
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

    class nnUNetTrainerDA5FREM(FREMMixin, nnUNetTrainerDA5):
        frem_B, frem_X = 162 / 512, 632.0          # the defaults: the paper's mouse-cell setting

    nnUNetv2_train DATASET 2d 0 -tr nnUNetTrainerDA5FREM   (the file in nnUNet_extTrainer or nnU-Net's variants)

The mixin wraps the trainer's ``build_network_architecture`` (keeping its
signature, which nnU-Net >= 2.7 inspects, so training and
``nnUNetv2_predict`` both get FREM, before nnU-Net compiles the network or
wraps it in DDP), re-draws the channels at every epoch start, and writes
``frem.status`` into nnU-Net's log at every epoch end, with the paper's
premise (``frem.diagnostics.Premise``: bottleneck and skip activations,
deep/shallow gradients) over the epoch's training steps; the premise's
history goes to ``frem_premise.json`` (and ``frem_premise.png``, where
matplotlib is installed) in the fold's folder (``frem_diagnostics = False``:
off). Whatever else the
trainer changes (loss, schedule, augmentation) stays as it is. Settings are
class attributes: ``frem_layer``, ``frem_B`` (a count or a fraction of the
layer's width), ``frem_X``, ``frem_mode``, ``frem_seed``, ``frem_also`` (more
sites, each a dict of ``frem.attach`` arguments), ``frem_off_epochs`` (epochs
trained with FREM off, ``frem.disabled``) (``FREM_B``, ``FREM_X``,
``FREM_SEED`` in the environment override them: a search driver's trial
setting for one ``nnUNetv2_train``); ``bfloat16``: on a
GPU that has it, nnU-Net's autocast runs in bfloat16 (float16 overflows
after the enhanced features of nnU-Net's decoder; docs/frameworks.md).
Checkpoints hold no FREM state. Importing this module needs no nnU-Net.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys

import torch

import frem

PREMISE = "frem_premise"  # the fold folder's frem_premise.json and .png


WANTED = {"FREM_B": "an integer count of channels (8) or a fraction of them in (0, 1] (0.3)",
          "FREM_X": "a finite number > 0 (250)", "FREM_SEED": "an integer (0)"}


def _from_environment(variable: str, text: str):
    """The value of ``FREM_B``, ``FREM_X`` or ``FREM_SEED``, checked as FREM checks its arguments."""
    from frem.module import FREM
    try:
        if variable == "FREM_SEED":
            return int(text)
        value = float(text) if variable == "FREM_X" or "." in text or "e" in text.lower() else int(text)
        FREM(value if variable == "FREM_B" else 1, value if variable == "FREM_X" else 1.0)  # FREM's own checks
        return value
    except (TypeError, ValueError) as error:
        detail = f" ({error})" if isinstance(error, ValueError) and "invalid literal" not in str(error) \
            and "could not convert" not in str(error) else ""
        raise ValueError(f"{variable}={text!r} in the environment is not {WANTED[variable]}{detail}: set it to "
                         "one, or unset it to use the trainer's own setting") from None


class FREMMixin:
    """Put before an nnU-Net trainer class in the bases: ``class T(FREMMixin, nnUNetTrainerXYZ)``."""

    frem_layer = "bottleneck"  # frem knows nnU-Net's architectures by name: encoder.stages[-1]
    frem_B: int | float = 162 / 512
    frem_X: float = 632.0
    frem_mode = "random"
    frem_seed = 0
    frem_also: tuple = ()  # more sites: ({"layer": "encoder.stages.4", "B": 0.1, "X": 10.0, "seed": 1}, ...)
    frem_off_epochs: tuple = ()  # epochs trained with FREM off (frem.disabled), e.g. range(5) for a warm-up
    frem_diagnostics = True
    bfloat16 = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        found = inspect.getattr_static(cls, "build_network_architecture", None)
        if found is None:
            return  # not an nnU-Net trainer (yet): nothing to wrap
        build = found.__func__ if isinstance(found, staticmethod) else found
        build = getattr(build, "frem_builds", build)  # a parent's wrapper: wrap what it wraps, for this class

        @functools.wraps(build)
        def build_network_architecture(*args, **kwargs):
            try:
                setting = cls.frem_setting()
            except ValueError as error:
                if os.path.basename(sys.argv[0]).startswith("nnUNetv2_"):  # nnU-Net's command: one line, no trace
                    raise SystemExit(f"{os.path.basename(sys.argv[0])}: {error}") from None
                raise
            network = build(*args, **kwargs)
            frem.attach(network, cls.frem_layer, mode=cls.frem_mode, **setting)
            for site in cls.frem_also:  # more sites, each with its own setting
                frem.attach(network, **{"mode": cls.frem_mode, **site})
            return network

        build_network_architecture.frem_builds = build
        cls.build_network_architecture = staticmethod(build_network_architecture)

    @classmethod
    def frem_setting(cls) -> dict:
        """B, X and seed: the class's, or ``FREM_B``, ``FREM_X``, ``FREM_SEED`` from the environment where set
        (what a search driver sets for each ``nnUNetv2_train`` it runs; docs/study.md). A value that is not one
        is refused here, naming the variable, before nnU-Net builds anything."""
        setting = {"B": cls.frem_B, "X": cls.frem_X, "seed": cls.frem_seed}
        for name in ("B", "X", "seed"):
            variable = f"FREM_{name.upper()}"
            text = os.environ.get(variable)
            if text is not None:
                setting[name] = _from_environment(variable, text.strip())
        return setting

    def on_train_start(self):
        if self.bfloat16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            torch.set_autocast_dtype("cuda", torch.bfloat16)  # nnU-Net's train_step: autocast("cuda")
            self.print_to_log_file("FREM: nnU-Net's autocast runs in bfloat16 (float16 would overflow after the "
                                   "enhanced features)")
        super().on_train_start()

    def on_train_epoch_start(self):
        frem.resample(self.network, self.current_epoch)  # sees through compile and DDP
        super().on_train_epoch_start()
        if self.current_epoch in self.frem_off_epochs:  # a warm-up: FREM off in train mode until epoch end
            self._frem_off = frem.disabled(self.network)
            self._frem_off.__enter__()
        if self.frem_diagnostics:
            self._frem_premise_start()

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if getattr(self, "_frem_off", None) is not None:
            self._frem_off.__exit__(None, None, None)
            self._frem_off = None
        for row in frem.status(self.network):
            self.print_to_log_file(f"FREM at {row.layer}: B={row.B} of {row.channels}, X={row.X:g}, "
                                   f"epoch {row.epoch}'s draw, {row.calls} training calls, {row.capped} capped")
        row = self._frem_premise.end(self.current_epoch) if getattr(self, "_frem_premise", None) else None
        if row is not None:
            self.print_to_log_file(f"FREM premise (FREM {row['frem']} this epoch): "
                                   + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "frem")))
            path = os.path.join(self.output_folder, PREMISE + ".json")
            with open(path + ".part", "w") as f:  # whole or not at all: renamed over the last epoch's
                json.dump(self._frem_premise.history, f, indent=1)
            os.replace(path + ".part", path)

    def on_train_end(self):
        premise = getattr(self, "_frem_premise", None)
        if premise is not None and premise.history:
            try:
                frem.diagnostics.plot(premise.history, os.path.join(self.output_folder, PREMISE + ".png"),
                                      title=f"{type(self).__name__}: the premise over training")
            except ModuleNotFoundError:
                pass  # no matplotlib: the JSON has the numbers
        super().on_train_end()

    def _frem_premise_start(self):
        import frem.diagnostics
        if getattr(self, "_frem_premise", None) is None:
            # one recorded pass on a patch-sized input finds the skip and the stages (noise, not zeros, which
            # instance norms turn into all-zero maps; a generator of its own leaves nnU-Net's random state alone)
            example = torch.randn(1, self.num_input_channels, *self.configuration_manager.patch_size,
                                  generator=torch.Generator().manual_seed(0))
            self._frem_premise = frem.diagnostics.PerEpoch(example)
        first = self._frem_premise.premise is None
        try:
            self._frem_premise.start(self.network, self.device)
        except frem.diagnostics.PremiseNotFound as error:  # a network without a skip: train on, say so
            self.print_to_log_file(f"FREM premise not measured: {error}")
            self.frem_diagnostics, self._frem_premise = False, None
            return
        if first:
            self.print_to_log_file(f"FREM premise: {self._frem_premise.premise!r}")
