"""Per-image scores with MONAI's metrics: Dice, IoU and HD95 for masks; AUC, accuracy and macro-F1 for labels.

Conventions for empty masks (BUSI's normal cases have none): Dice and IoU are 1 when prediction and ground
truth are both empty and 0 when only one is (MONAI's `ignore_empty=False`). HD95 is undefined when both are
empty (NaN, left out of means) and is set to the image diagonal when only one is, the worst distance
possible, as segmentation challenges do; otherwise a missed lesion would not count against HD95 at all.
Distances are in pixels at the study's resolution.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, MeanIoU, ROCAUCMetric
from monai.networks.utils import one_hot

SEGMENTATION_METRICS = ("dice", "iou", "hd95")
CLASSIFICATION_METRICS = ("auc", "accuracy", "macro_f1")
HIGHER_IS_BETTER = {"dice": True, "iou": True, "hd95": False, "auc": True, "accuracy": True, "macro_f1": True,
                    "dice_lesion": True}


def segmentation_scores(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """Per-image Dice, IoU and HD95 of binary masks shaped (B, 1, H, W) (any non-zero value is foreground)."""
    if prediction.shape != target.shape or prediction.ndim != 4 or prediction.shape[1] != 1:
        raise ValueError(f"expected two (B, 1, H, W) masks, got {tuple(prediction.shape)} and {tuple(target.shape)}")
    predicted = one_hot((prediction > 0).long(), num_classes=2)
    truth = one_hot((target > 0).long(), num_classes=2)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(predicted, truth)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(predicted, truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask; the convention below handles them
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(predicted, truth)
    diagonal = math.hypot(*prediction.shape[2:])
    hd95_values = [_hd95_value(float(value), bool(p.any()), bool(t.any()), diagonal)
                   for value, p, t in zip(hd95.flatten(), prediction > 0, target > 0)]
    return {"dice": dice.flatten().tolist(), "iou": iou.flatten().tolist(), "hd95": hd95_values}


def _hd95_value(value: float, predicted_any: bool, truth_any: bool, diagonal: float) -> float:
    if not predicted_any and not truth_any:
        return math.nan
    if predicted_any != truth_any:
        return diagonal
    return value


def classification_scores(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Macro AUC (one-vs-rest), accuracy and macro-F1 from (N, C) class probabilities and (N,) labels."""
    num_classes = probabilities.shape[1]
    truth = one_hot(labels.long().view(-1, 1), num_classes=num_classes, dim=1)
    predicted = one_hot(probabilities.argmax(dim=1, keepdim=True), num_classes=num_classes, dim=1)
    auc_metric = ROCAUCMetric(average="macro")
    auc_metric(probabilities, truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class absent from the test labels gives NaN, which we report
        auc = float(auc_metric.aggregate())
    f1_metric = ConfusionMatrixMetric(include_background=True, metric_name="f1 score", reduction="mean_batch")
    f1_metric(predicted, truth)
    per_class_f1 = f1_metric.aggregate()[0]
    accuracy = float((probabilities.argmax(dim=1) == labels).float().mean())
    return {"auc": auc, "accuracy": accuracy, "macro_f1": float(per_class_f1.mean())}


def nanmean(values) -> float:
    """Mean of the finite values; NaN when there are none."""
    array = np.asarray(list(values), dtype=float)
    array = array[np.isfinite(array)]
    return float(array.mean()) if array.size else math.nan
