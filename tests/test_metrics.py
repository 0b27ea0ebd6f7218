"""IoU and mIoU against confusion counts worked out by hand."""

import math

import torch

from frem.seg.metrics import ConfusionCounter

CLASSES = ("a", "b", "c", "absent")
TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, 0, 1]]])
PREDICTION = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
# a: TP 2 (0,0)(1,2), FP 1 (1,1), FN 1 (0,1)  -> 2/4
# b: TP 3, FP 1 (0,1), FN 0                    -> 3/4
# c: TP 1 (1,0), FP 0, FN 1 (1,1)              -> 1/2
# absent: in neither prediction nor truth      -> NaN, left out of the mean
EXPECTED = {"a": 0.5, "b": 0.75, "c": 0.5}


def test_iou_is_tp_over_tp_fp_fn_and_an_absent_class_is_nan_and_left_out():
    counter = ConfusionCounter(len(CLASSES))
    counter.update(PREDICTION, TARGET)
    result = counter.iou(CLASSES)
    assert {k: v for k, v in result["iou"].items() if k != "absent"} == EXPECTED
    assert math.isnan(result["iou"]["absent"])
    assert result["miou"] == (0.5 + 0.75 + 0.5) / 3


def test_counts_are_pooled_over_batches_not_averaged_per_image():
    counter = ConfusionCounter(len(CLASSES))
    counter.update(PREDICTION[:, :1], TARGET[:, :1])  # first row: a 1/2, b 2/3
    counter.update(PREDICTION[:, 1:], TARGET[:, 1:])  # second row
    assert {k: v for k, v in counter.iou(CLASSES)["iou"].items() if k != "absent"} == EXPECTED


def test_a_class_predicted_but_never_true_scores_zero_not_nan():
    counter = ConfusionCounter(2)
    counter.update(torch.tensor([[1, 0]]), torch.tensor([[0, 0]]))
    result = counter.iou(("x", "y"))
    assert result["iou"] == {"x": 0.5, "y": 0.0} and result["miou"] == 0.25


def test_a_split_with_no_class_present_has_a_nan_miou():
    counter = ConfusionCounter(2)
    counter.update(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long))
    result = counter.iou(("x", "y"))
    assert math.isnan(result["miou"]) and all(math.isnan(v) for v in result["iou"].values())
