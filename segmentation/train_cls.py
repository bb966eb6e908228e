"""Train one classifier and score it on the real test split; save MONAI Grad-CAM maps for a few test images.

Cross-entropy, Adam with a cosine schedule over a fixed number of optimiser steps (as every segmentation arm:
`medaug.segmentation.train_seg`); of about 20 validations, the weights with the lowest validation loss are kept
(the last where there is no val split). Scores: macro one-vs-rest AUC, accuracy and macro-F1 over the test
split, and per test image the probability given to its true class (what the paired test compares).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from medaug.segmentation.common import (cached_dataset, endless, evaluation_batches, make_loader,
                                       seed_everything, train_step, validation_interval)
from medaug.segmentation.metrics import classification_scores
from medaug.segmentation.networks import build_network, check_resolution, network_spec


def train_classification(
    train_items: list[dict],
    val_items: list[dict],
    test_items: list[dict],
    classes: list[str],
    network: str = "densenet121",
    resolution: int = 128,
    channels: int = 1,
    fit: str = "stretch",
    steps: int = 1500,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    seed: int = 0,
    augment: str = "light",
    device: torch.device | str = "cpu",
    gradcam_dir: str | Path | None = None,
    gradcam_images: int = 4,
    on_step: Callable[[int, float], None] | None = None,
    validations: int = 20,
) -> dict:
    """Train on `train_items` (whose `label` indexes `classes`) and return test scores and history."""
    if not train_items or not test_items:
        raise ValueError("train_classification needs training and test items")
    check_resolution("cls", network, resolution)
    started = time.perf_counter()
    generator = seed_everything(seed)
    device = torch.device(device)
    train_set = cached_dataset(train_items, resolution, channels, fit, False, augment, seed)
    batches = endless(make_loader(train_set, batch_size, shuffle=True, generator=generator))
    val_batches = evaluation_batches(val_items, resolution, channels, fit, False, batch_size) if val_items else []
    model = build_network("cls", network, channels, len(classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    loss_function = nn.CrossEntropyLoss()
    every = validation_interval(steps, validations)
    history = {"val_steps": [], "train_loss": [], "val_loss": []}
    best_state, best_step, best_loss, losses = None, steps, math.inf, []
    model.train()
    for step in range(1, steps + 1):
        batch = next(batches)
        losses.append(train_step(model, batch["image"].to(device), batch["label"].long().to(device), optimizer,
                                 loss_function))
        schedule.step()
        if on_step is not None:
            on_step(step, losses[-1])
        if step % every and step != steps:
            continue
        history["train_loss"].append(sum(losses) / len(losses))
        losses = []
        if val_batches:
            probabilities, labels, _ = predict(model, val_batches, device)
            model.train()
            val_loss = float(nn.functional.nll_loss(torch.log(probabilities.clamp_min(1e-8)), labels))
            history["val_steps"].append(step)
            history["val_loss"].append(val_loss)
            if val_loss < best_loss:
                best_state, best_step, best_loss = copy.deepcopy(model.state_dict()), step, val_loss
    if best_state is not None:
        model.load_state_dict(best_state)
    test_batches = evaluation_batches(test_items, resolution, channels, fit, False, batch_size)
    probabilities, labels, names = predict(model, test_batches, device)
    if gradcam_dir is not None and gradcam_images > 0:
        save_gradcam(model, network, test_batches, classes, Path(gradcam_dir), gradcam_images, device)
    return {
        "per_image": per_image_scores(probabilities, labels, names),
        "metrics": classification_scores(probabilities, labels),
        "best_step": best_step,
        "best_val_loss": best_loss if val_batches else math.nan,
        "steps": steps,
        "seconds": time.perf_counter() - started,
        **history,
    }


@torch.no_grad()
def predict(model, batches: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Class probabilities (N, C), labels (N,) and file names of every image in `batches`."""
    model.eval()
    probabilities, labels, names = [], [], []
    for batch in batches:
        probabilities.append(torch.softmax(model(batch["image"].to(device)), dim=1).cpu())
        labels.append(batch["label"].long())
        names.extend(batch["file_name"])
    return torch.cat(probabilities), torch.cat(labels), names


def per_image_scores(probabilities: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, list]:
    predicted = probabilities.argmax(dim=1)
    return {
        "file_name": list(names),
        "label": labels.tolist(),
        "predicted": predicted.tolist(),
        "prob_true": probabilities.gather(1, labels.view(-1, 1)).flatten().tolist(),
        "correct": (predicted == labels).float().tolist(),
    }


def save_gradcam(model, network: str, batches: list[dict], classes: list[str], output_dir: Path,
                 count: int, device) -> list[Path]:
    """Grad-CAM (MONAI) of the predicted class for the first `count` test images, drawn over each image."""
    from monai.visualize import GradCAM

    layer = network_spec("cls", network).gradcam_layer
    images = torch.cat([batch["image"] for batch in batches])[:count].to(device)
    labels = torch.cat([batch["label"] for batch in batches])[:count].tolist()
    names = [name for batch in batches for name in batch["file_name"]][:count]
    model.eval()
    cam = GradCAM(nn_module=model, target_layers=layer)
    with torch.no_grad():
        predicted = model(images).argmax(dim=1).tolist()
    maps = cam(x=images, class_idx=None).detach().cpu().numpy()
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for number, (image, heat, name) in enumerate(zip(images.cpu().numpy(), maps, names)):
        stem = Path(name).stem
        path = output_dir / f"{number:02d}_{stem}_true-{classes[labels[number]]}_pred-{classes[predicted[number]]}.png"
        cv2.imwrite(str(path), overlay(image, heat[0]))
        written.append(path)
    return written


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A BGR uint8 picture: the (C, H, W) image in grey with the [0, 1] heat map in the jet colour map."""
    grey = np.clip(image.mean(axis=0), 0.0, 1.0)
    grey = np.repeat((grey * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    colour = cv2.applyColorMap((np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(grey, 1.0 - alpha, colour, alpha, 0.0)
