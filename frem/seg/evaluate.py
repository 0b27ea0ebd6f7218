"""Evaluating a model on a split: IoU and the paper's feature magnitudes."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

import frem
from frem.diagnostics import Premise
from frem.seg import checkpoint
from frem.seg.data.base import DataError, Split
from frem.seg.data.images import normalize
from frem.seg.distributed import resolve_device
from frem.seg.metrics import ConfusionCounter
from frem.seg.models import build_model


def autocast(device: torch.device):
    """bf16 on CUDA (float16's range would cap large X x features, see FREM); fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class FeatureProbe:
    """Mean activation of the bottleneck and of the skip feature that meets it in the decoder (paper
    Fig. 2), and for FREM of the enhanced and the other bottleneck channels (Fig. 9): the library's
    ``frem.diagnostics.Premise`` on the application's model, under the names its figures read."""

    NAMES = {"bottleneck": "bottleneck_mean", "skip": "skip_mean", "enhanced": "enhanced_mean",
             "other": "other_mean"}

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.premise = Premise(model, example_input)

    def recording(self):
        return self.premise.recording()

    def summary(self) -> dict:
        stats = self.premise.summary()
        names = self.NAMES if self.premise.frem is not None else dict(list(self.NAMES.items())[:2])
        return {name: stats[key] for key, name in names.items()}


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, classes, normalization: dict, *,
             batch_size: int = 32, probe: bool = False) -> dict:
    """Pooled per-class IoU and mIoU of ``model`` on ``split`` (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = ConfusionCounter(len(classes))
    # the probe finds the skip from one recorded pass on the split's first image
    feature_probe = FeatureProbe(model, normalize(split.images[:1].to(device), normalization, split.stats[:1])) \
        if probe else None
    with feature_probe.recording() if probe else nullcontext():
        for start in range(0, len(split), batch_size):
            images = split.images[start:start + batch_size].to(device)
            x = normalize(images, normalization, split.stats[start:start + batch_size])
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                logits = model(x)
            counter.update(logits.argmax(1), split.masks[start:start + batch_size].to(device))
    model.train(was_training)
    result = counter.iou(classes)
    if probe:
        result["features"] = feature_probe.summary()
    return result


def model_from_checkpoint(state: dict, device="cpu") -> nn.Module:
    """Rebuild the run's model and load its weights; FREM holds the channels of the checkpoint's epoch
    (what the probe splits the bottleneck by), not a fresh model's epoch-0 draw."""
    config = state["config"]
    model = build_model(config["variant"], encoder=config["encoder"], in_channels=state["in_channels"],
                        classes=len(state["classes"]), B=config["B"], X=config["X"],
                        lambda_=config["lambda_"], seed=config["seed"])
    model.load_state_dict(state["model"])
    if frem.attached(model) and isinstance(state.get("epoch"), int):
        frem.resample(model, state["epoch"])
    return model.to(device).eval()


SPLITS = ("test", "val")


def evaluate_run(run_dir, data=None, device="auto", data_root=None, split: str = "test") -> dict:
    """Metrics of a run's best checkpoint on ``split`` (``test`` or ``val``): what ``frem evaluate`` prints.

    The data is read from the folder the run was trained on (``data_root`` if
    it moved) and must be the same data: its checksum is compared with the one
    the checkpoint holds.
    """
    from frem.seg.config import TrainConfig
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    state = checkpoint.load(Path(run_dir) / checkpoint.BEST, hint=f"train the run again (frem train --out {run_dir})")
    config = TrainConfig.from_dict(state["config"])
    if data is None:
        try:
            data = config.load_data(data_root)
        except DataError as problem:
            raise DataError(f"{problem} (the data {run_dir} was trained on; if it moved, pass --data DIR)") from None
    if data.differs_from(state.get("data")):
        raise DataError(f"the data at {data.root} is not the data {run_dir} was trained on (trained on "
                        f"{state['data'].get('source')}; found {data.source}): pass --data DIR with that data")
    model = model_from_checkpoint(state, resolve_device(device))
    return evaluate(model, data.splits()[split], state["classes"], state["normalization"],
                    batch_size=2 * config.batch_size)
