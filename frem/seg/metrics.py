"""Per-class IoU and mIoU with smp.metrics, pooled over a whole split.

The confusion counts of every image are summed first, then IoU = TP / (TP +
FP + FN) per class: one number per class for the whole split, as the paper
reports. A class absent from both prediction and ground truth in the whole
split scores NaN and is left out of the mean (smp's default zero_division
would call it a perfect 1.0).
"""

from __future__ import annotations

import math

import segmentation_models_pytorch as smp
import torch


class ConfusionCounter:
    """Accumulates smp confusion counts over batches of predictions."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = None

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        stats = smp.metrics.get_stats(prediction.long(), target.long(), mode="multiclass",
                                      num_classes=self.num_classes)
        summed = torch.stack([s.sum(0) for s in stats]).cpu()
        self.counts = summed if self.counts is None else self.counts + summed

    def iou(self, classes) -> dict:
        tp, fp, fn, tn = self.counts
        per_class = smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=math.nan)
        iou = {name: float(v) for name, v in zip(classes, per_class)}
        present = [v for v in iou.values() if not math.isnan(v)]
        return {"iou": iou, "miou": sum(present) / len(present) if present else math.nan}
