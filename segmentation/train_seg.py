"""Train one segmentation network for a fixed number of optimiser steps and score it on the real test split.

Every comparison medaug makes (`bench`, the demo, `study`) trains its arms through `fit_segmenter` with one
`SegRecipe`, so arms differ only in their data and augmentation, never in their updates. The defaults are the
recipe measured best on BUSI (`benchmarks/seg_yardstick.py`, RESULTS.md "A yardstick worth beating"): images
stretched to the square, left-right flips in every arm, MONAI's `DiceCELoss` on two softmax channels, constant
Adam, and the last weights kept. The validation split is scored along the way to draw the learning curve and to say
where it plateaued; with `select="best_val"` the best validation weights are tested instead.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from monai.losses import DiceCELoss

from medaug.segmentation.common import (cached_dataset, endless, evaluation_batches, make_loader,
                                       seed_everything, train_step, validation_interval)
from medaug.segmentation.metrics import nanmean, segmentation_scores
from medaug.segmentation.networks import build_network, check_resolution

SCHEDULES = ("constant", "cosine")
SELECTIONS = ("last", "best_val")
# DiceCE on the two softmax channels; `lesion_dice_ce` leaves the background channel out of the Dice term, where a
# near-perfect background Dice would halve the lesion's share of the gradient.
LOSSES = {"dice_ce": True, "lesion_dice_ce": False}  # name: include_background
PLATEAU_TOLERANCE = 0.01  # validation Dice within this of the run's best counts as the plateau


@dataclass(frozen=True)
class SegRecipe:
    """How every arm of one comparison trains; only the data and the augmentation policy differ between arms."""

    steps: int = 1500
    resolution: int = 128
    network: str = "unet"
    channels: int = 1
    fit: str = "stretch"
    batch_size: int = 16
    learning_rate: float = 1e-3
    schedule: str = "constant"
    select: str = "last"
    loss: str = "dice_ce"
    ema: float = 0.0  # above 0: validate and test an exponential moving average of the weights with this decay
    validations: int = 20

    def check(self) -> None:
        """Refuse a recipe that cannot train, naming the flag."""
        from medaug.data import FIT_MODES

        check_resolution("seg", self.network, self.resolution)
        problems = {"--seg_steps": self.steps < 1, "--batch_size": self.batch_size < 1,
                    "--learning_rate": not self.learning_rate > 0, "--fit": self.fit not in FIT_MODES,
                    "--schedule": self.schedule not in SCHEDULES, "--select": self.select not in SELECTIONS,
                    "--loss": self.loss not in LOSSES, "--ema": not 0.0 <= self.ema < 1.0,
                    "--channels": self.channels not in (1, 3)}
        for flag, bad in problems.items():
            if bad:
                raise ValueError(f"{flag}: cannot train with {asdict(self)}")

    def settings(self) -> dict:
        return asdict(self)


def train_segmentation(train_items: list[dict], val_items: list[dict], test_items: list[dict], recipe: SegRecipe,
                       seed: int = 0, augment: str = "light", device: torch.device | str = "cpu",
                       on_step: Callable[[int, float], None] | None = None,
                       on_model: Callable[[torch.nn.Module], None] | None = None,
                       initial_state: dict | None = None) -> dict:
    """Train on `train_items` and return per-image test scores, their means and the training history;
    `on_model(model)` sees the trained model before it is dropped (the studies save predictions to show)."""
    if not test_items:
        raise ValueError("train_segmentation needs training and test items")
    started = time.perf_counter()
    model, history = fit_segmenter(train_items, val_items, recipe, seed, augment, device, on_step,
                                   initial_state=initial_state)
    if on_model is not None:
        on_model(model)
    per_image = score_segmenter(model, test_items, recipe, device)
    return {"per_image": per_image, "metrics": summarise_segmentation(per_image), "history": history,
            "steps": history["steps"], "seconds": time.perf_counter() - started}


def fit_segmenter(train_items: list[dict], val_items: list[dict], recipe: SegRecipe, seed: int = 0,
                  augment: str = "light", device: torch.device | str = "cpu",
                  on_step: Callable[[int, float], None] | None = None, steps: int | None = None,
                  initial_state: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """The network after exactly `steps` (default `recipe.steps`) optimiser steps, whatever the data's size (arms
    with more images get fewer passes, not more updates), and its history: {steps, val_steps, val_dice, train_loss
    (the mean over each validation interval), best_step, best_val_dice, plateau_step, selected_step}.
    `initial_state` starts from given weights (fine-tuning after pre-training)."""
    if not train_items:
        raise ValueError("fit_segmenter needs training items")
    recipe.check()
    steps = recipe.steps if steps is None else steps
    device = torch.device(device)
    generator = seed_everything(seed)
    train_set = cached_dataset(train_items, recipe.resolution, recipe.channels, recipe.fit, True, augment, seed)
    batches = endless(make_loader(train_set, recipe.batch_size, shuffle=True, generator=generator))
    val_batches = (evaluation_batches(val_items, recipe.resolution, recipe.channels, recipe.fit, True,
                                      recipe.batch_size) if val_items else [])
    model = build_network("seg", recipe.network, recipe.channels, 2).to(device)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    averaged = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema)) if recipe.ema else None)
    scored = model if averaged is None else averaged.module  # what is validated and tested
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                if recipe.schedule == "cosine" else None)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, include_background=LOSSES[recipe.loss])
    every = validation_interval(steps, recipe.validations)
    history = {"steps": steps, "val_steps": [], "val_dice": [], "train_loss": []}
    best_state, best_step, best_dice, losses = None, steps, -math.inf, []
    model.train()
    for step in range(1, steps + 1):
        batch = next(batches)
        losses.append(train_step(model, batch["image"].to(device), batch["mask"].to(device), optimizer,
                                 loss_function))
        if averaged is not None:
            averaged.update_parameters(model)
        if schedule is not None:
            schedule.step()
        if on_step is not None:
            on_step(step, losses[-1])
        if step % every and step != steps:
            continue
        history["train_loss"].append(sum(losses) / len(losses))
        losses = []
        if val_batches:
            dice = nanmean(predict_and_score(scored, val_batches, device)["dice"])
            model.train()
            history["val_steps"].append(step)
            history["val_dice"].append(dice)
            if dice > best_dice:
                best_step, best_dice = step, dice
                if recipe.select == "best_val":
                    best_state = copy.deepcopy(scored.state_dict())
    if best_state is not None:
        scored.load_state_dict(best_state)
    history.update(best_step=best_step, best_val_dice=best_dice if val_batches else math.nan,
                   plateau_step=plateau_step(history["val_steps"], history["val_dice"]),
                   selected_step=best_step if best_state is not None else steps)
    return scored.eval(), history


def plateau_step(val_steps: list[int], val_dice: list[float], tolerance: float = PLATEAU_TOLERANCE) -> int | None:
    """The first validation step whose Dice is within `tolerance` of the best: where the learning curve levelled."""
    if not val_dice:
        return None
    best = max(val_dice)
    return next(step for step, dice in zip(val_steps, val_dice) if dice >= best - tolerance)


def score_segmenter(model, items: list[dict], recipe: SegRecipe, device) -> dict[str, list]:
    """Per-image test scores of `model` on `items`, read and squared as the recipe trains."""
    batches = evaluation_batches(items, recipe.resolution, recipe.channels, recipe.fit, True, recipe.batch_size)
    return predict_and_score(model, batches, torch.device(device))


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
