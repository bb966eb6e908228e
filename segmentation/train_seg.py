"""Train one segmentation network and score it on the real test split, image by image.

Two output channels (background, lesion) with softmax and MONAI's `DiceCELoss`; Adam with a cosine
schedule; the epoch with the best validation Dice is kept (the last epoch where there is no val split);
that model is scored with Dice, IoU and HD95 per test image (`medaug.segmentation.metrics`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from monai.losses import DiceCELoss

from medaug.segmentation.common import cached_dataset, evaluation_batches, make_loader, seed_everything
from medaug.segmentation.metrics import nanmean, segmentation_scores
from medaug.segmentation.networks import build_network, check_resolution


def train_segmentation(
    train_items: list[dict],
    val_items: list[dict],
    test_items: list[dict],
    network: str = "unet",
    resolution: int = 128,
    channels: int = 1,
    fit: str = "pad",
    epochs: int = 30,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    augment: bool = False,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
    on_model: Callable[[torch.nn.Module], None] | None = None,
) -> dict:
    """Train on `train_items` and return per-image test scores, their means and the training history;
    `on_model(model)` sees the trained model before it is dropped (the study saves predictions to show)."""
    if not test_items:
        raise ValueError("train_segmentation needs training and test items")
    started = time.perf_counter()
    model, fitted = fit_segmenter(train_items, val_items, network, resolution, channels, fit, epochs, batch_size,
                                  learning_rate, seed, augment, device, on_epoch)
    if on_model is not None:
        on_model(model)
    test_batches = evaluation_batches(test_items, resolution, channels, fit, True, batch_size)
    per_image = predict_and_score(model, test_batches, torch.device(device))
    return {"per_image": per_image, "metrics": summarise_segmentation(per_image), **fitted,
            "seconds": time.perf_counter() - started}


def fit_segmenter(
    train_items: list[dict],
    val_items: list[dict],
    network: str = "unet",
    resolution: int = 128,
    channels: int = 1,
    fit: str = "pad",
    epochs: int = 30,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    augment: bool = False,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
    max_steps: int | None = None,
    initial_state: dict | None = None,
    validations: int = 20,
) -> tuple[torch.nn.Module, dict]:
    """The trained network (weights of the epoch with the best validation Dice, or the last without a val split)
    and {best_epoch, best_val_dice, steps, train_loss, val_dice}.

    With `max_steps`, training stops after exactly that many optimiser steps whatever the data's size (so arms with
    more images get fewer epochs, not more updates), and validation runs about `validations` times, not every
    epoch. `initial_state` starts from given weights (fine-tuning after pre-training)."""
    if not train_items:
        raise ValueError("train_segmentation needs training and test items")
    check_resolution("seg", network, resolution)
    generator = seed_everything(seed)
    device = torch.device(device)
    train_set = cached_dataset(train_items, resolution, channels, fit, True, augment, seed)
    loader = make_loader(train_set, batch_size, shuffle=True, generator=generator)
    if max_steps is not None:
        epochs = math.ceil(max_steps / len(loader))
    validate_every = max(1, math.ceil(epochs / validations)) if max_steps is not None else 1
    val_batches = evaluation_batches(val_items, resolution, channels, fit, True, batch_size) if val_items else []
    model = build_network("seg", network, channels, 2).to(device)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    history = {"train_loss": [], "val_dice": [], "val_epochs": []}
    best_state, best_epoch, best_dice, steps = None, epochs, -math.inf, 0
    for epoch in range(1, epochs + 1):
        limit = None if max_steps is None else max_steps - steps
        loss, taken = _train_epoch(model, loader, optimizer, loss_function, device, limit)
        steps += taken
        schedule.step()
        history["train_loss"].append(loss)
        if val_batches and (epoch % validate_every == 0 or epoch == epochs):
            dice = nanmean(predict_and_score(model, val_batches, device)["dice"])
            history["val_dice"].append(dice)
            history["val_epochs"].append(epoch)
            if dice > best_dice:
                best_state, best_epoch, best_dice = copy.deepcopy(model.state_dict()), epoch, dice
        if on_epoch is not None:
            on_epoch(epoch, loss)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "best_val_dice": best_dice if val_batches else math.nan,
                   "steps": steps, "epochs": epochs, **history}


def _train_epoch(model, loader, optimizer, loss_function, device, limit: int | None = None) -> tuple[float, int]:
    """Mean training loss of one pass over `loader` (stopped after `limit` batches) and the batches taken."""
    model.train()
    total, count, taken = 0.0, 0, 0
    for batch in loader:
        if limit is not None and taken >= limit:
            break
        taken += 1
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(model(images), masks)
        loss.backward()
        optimizer.step()
        total += loss.item() * images.shape[0]
        count += images.shape[0]
    return total / max(1, count), taken


@torch.no_grad()
def predict_and_score(model, batches: list[dict], device) -> dict[str, list]:
    """Per-image Dice, IoU, HD95 and whether the ground truth holds a lesion, in the order of `batches`."""
    model.eval()
    scores: dict[str, list] = {"file_name": [], "dice": [], "iou": [], "hd95": [], "has_lesion": []}
    for batch in batches:
        prediction = model(batch["image"].to(device)).argmax(dim=1, keepdim=True).cpu()
        target = (batch["mask"] > 0.5).long()
        for name, values in segmentation_scores(prediction, target).items():
            scores[name].extend(values)
        scores["file_name"].extend(batch["file_name"])
        scores["has_lesion"].extend(bool(m.any()) for m in target)
    return scores


def summarise_segmentation(per_image: dict[str, list]) -> dict[str, float]:
    """Means over test images; `dice_lesion` only over images whose ground truth holds a lesion."""
    lesion_dice = [d for d, lesion in zip(per_image["dice"], per_image["has_lesion"]) if lesion]
    return {
        "dice": nanmean(per_image["dice"]),
        "iou": nanmean(per_image["iou"]),
        "hd95": nanmean(per_image["hd95"]),
        "dice_lesion": nanmean(lesion_dice),
    }
