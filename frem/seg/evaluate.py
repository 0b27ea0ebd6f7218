"""Evaluating a model on a split: IoU and the paper's feature magnitudes."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

import frem
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
    """Mean activation of the bottleneck and of the skip feature that meets it
    in the decoder (paper Fig. 2), and for FREM of the enhanced and the other
    bottleneck channels (Fig. 9), measured on the encoder's own output."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.bottleneck_sum = None
        self.skip_sum = 0.0
        self.count = self.skip_count = 0

    @contextmanager
    def recording(self):
        handle = self.model.encoder.register_forward_hook(self._record)
        try:
            yield self
        finally:
            handle.remove()

    def _record(self, _module, _inputs, features):
        deep, skip = features[-1].float(), features[-2].float()
        per_channel = deep.sum(dim=(0, 2, 3))
        self.bottleneck_sum = per_channel if self.bottleneck_sum is None else self.bottleneck_sum + per_channel
        self.count += deep.numel() // deep.shape[1]
        self.skip_sum = self.skip_sum + skip.sum()
        self.skip_count += skip.numel()

    def summary(self) -> dict:
        channel_means = (self.bottleneck_sum / self.count).cpu()
        stats = {"bottleneck_mean": float(channel_means.mean()),
                 "skip_mean": float(self.skip_sum / self.skip_count)}
        enhanced = frem.attached(self.model)
        if enhanced:
            chosen = torch.zeros(channel_means.numel(), dtype=torch.bool)
            chosen[enhanced[0].channels.cpu()] = True
            stats["enhanced_mean"] = float(channel_means[chosen].mean())
            stats["other_mean"] = float(channel_means[~chosen].mean()) if (~chosen).any() else math.nan
        return stats


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, classes, normalization: dict, *,
             batch_size: int = 32, probe: bool = False) -> dict:
    """Pooled per-class IoU and mIoU of ``model`` on ``split`` (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = ConfusionCounter(len(classes))
    feature_probe = FeatureProbe(model)
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
