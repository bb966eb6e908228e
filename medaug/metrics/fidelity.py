"""Label fidelity: does a generated image show what its mask says?

A segmenter trained on the real training split finds the lesion in real test images with some Dice; applied to a
synthetic image, it should find the lesion where the image's mask puts it about as well. The ratio of the two
(synthetic Dice over real Dice, the same network on both) is the label fidelity: near 1 when a generated pair is as
readable as a real one, near 0 when the image does not show its mask, which teaches a downstream segmenter a wrong
label. Only pairs whose mask holds a lesion count: an empty mask says nothing about where a lesion is.

The same scorer serves `medaug evaluate` (label_fidelity in metrics.json and report.html, each pair's Dice in its
manifest line) and the study's filter.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from medaug.data import MANIFEST_NAME, DatasetFolder, read_manifest
from medaug.files import write_json_atomic, write_text_atomic
from medaug.outputs import output_lock

SEGMENTER_CONFIG = "fidelity_segmenter.json"
SEGMENTER_WEIGHTS = "fidelity_segmenter.safetensors"
GOOD_PAIR = 0.5  # a pair whose Dice exceeds this shows its lesion roughly where the mask says


@dataclass
class SegmenterInfo:
    network: str
    resolution: int
    channels: int
    fit: str
    real_dice: float  # mean Dice on the real test images whose mask holds a lesion
    real_pairs: int
    trained_on: str = ""
    epochs: int = 0
    seed: int = 0
    selected_on: str = ""  # the validation rows its weights were chosen on (medaug.data.validation)
    per_real_image: list = field(default_factory=list)


class FidelitySegmenter:
    """A trained segmentation network and what it scored on real test images."""

    def __init__(self, model: torch.nn.Module, info: SegmenterInfo, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.info = info
        self.device = torch.device(device)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous().cpu() for key, value in self.model.state_dict().items()},
                  str(directory / SEGMENTER_WEIGHTS))
        write_json_atomic(directory / SEGMENTER_CONFIG, asdict(self.info), indent=2)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> FidelitySegmenter:
        from safetensors.torch import load_file

        from medaug.segmentation.networks import build_network

        directory = Path(directory)
        if not (directory / SEGMENTER_CONFIG).is_file() or not (directory / SEGMENTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"--fidelity_segmenter: {directory} holds no {SEGMENTER_CONFIG} and "
                                    f"{SEGMENTER_WEIGHTS} (medaug evaluate writes them to OUT/fidelity_segmenter)")
        info = SegmenterInfo(**json.loads((directory / SEGMENTER_CONFIG).read_text()))
        model = build_network("seg", info.network, info.channels, 2)
        model.load_state_dict(load_file(str(directory / SEGMENTER_WEIGHTS)))
        return cls(model, info, device)

    @torch.no_grad()
    def predict(self, items: list[dict], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(predicted masks, fitted masks), each (N, R, R) bool, for data items with `image` and `mask` paths."""
        from medaug.segmentation.common import evaluation_batches

        info = self.info
        predictions, masks = [], []
        for batch in evaluation_batches(items, info.resolution, info.channels, info.fit, True, batch_size):
            logits = self.model(batch["image"].to(self.device))
            predictions.append(logits.argmax(dim=1).cpu().numpy().astype(bool))
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
        return np.concatenate(predictions), np.concatenate(masks)


def dice(prediction: np.ndarray, mask: np.ndarray) -> float:
    """Dice of two boolean masks (a mask with a lesion and an empty prediction scores 0)."""
    overlap = np.logical_and(prediction, mask).sum()
    total = prediction.sum() + mask.sum()
    return float(2.0 * overlap / total) if total else 1.0


def lesion_dice(segmenter: FidelitySegmenter, items: list[dict]) -> list[dict]:
    """Per item: file_name, whether its fitted mask holds a lesion, and (if so) the segmenter's Dice on it."""
    predictions, masks = segmenter.predict(items)
    return [{"file_name": item["file_name"], "lesion": bool(mask.any()),
             "dice": dice(prediction, mask) if mask.any() else None, "predicted_pixels": int(prediction.sum())}
            for item, prediction, mask in zip(items, predictions, masks)]


def train_fidelity_segmenter(real_dir: str | Path, resolution: int = 64, epochs: int = 30, seed: int = 0,
                             network: str = "unet", channels: int = 1, fit: str = "pad", batch_size: int = 16,
                             device: str = "cpu") -> FidelitySegmenter:
    """A segmenter trained on the real train split for `epochs` passes (the best of about 20 validations on val,
    cosine schedule, no augmentation: the label-fidelity scorer as first measured), scored on the real test split."""
    from medaug.segmentation.inputs import load_study_data
    from medaug.segmentation.train_seg import SegRecipe, fit_segmenter

    data = load_study_data("seg", real_dir)
    steps = epochs * max(1, len(data.train) // batch_size)
    recipe = SegRecipe(steps=steps, resolution=resolution, network=network, channels=channels, fit=fit,
                       batch_size=batch_size, schedule="cosine", select="best_val")
    model, _ = fit_segmenter(data.train, data.val, recipe, seed, augment="none", device=device)
    info = SegmenterInfo(network, resolution, channels, fit, math.nan, 0, str(Path(real_dir).resolve()), epochs, seed,
                         selected_on=data.validation.origin())
    segmenter = FidelitySegmenter(model, info, device)
    scores = lesion_dice(segmenter, data.test)
    lesions = [score["dice"] for score in scores if score["lesion"]]
    if not lesions:
        raise ValueError(f"--real {real_dir}: no test image has a lesion in its mask, so the segmenter's real Dice "
                         "(the fidelity's reference) cannot be measured")
    info.real_dice, info.real_pairs = float(np.mean(lesions)), len(lesions)
    info.per_real_image = scores
    return segmenter


def synthetic_items(folder: DatasetFolder, rows: list[int] | None = None) -> list[dict]:
    """The rows (default: all) that have a mask file, as data items for the segmenter."""
    items = []
    for index in folder.indices() if rows is None else rows:
        mask = folder.path(index, "mask_file_name")
        if mask is None:
            continue
        slice_index = folder.slice_index(index)
        items.append({"image": str(folder.path(index, "file_name")), "mask": str(mask),
                      "slice_index": -1 if slice_index is None else slice_index,
                      "file_name": folder.value(index, "file_name")})
    return items


def label_fidelity(segmenter: FidelitySegmenter, synthetic_dir: str | Path, rows: list[int] | None = None) -> dict:
    """{synthetic_dice, real_dice, ratio, share_above_0_5, pairs, ...} of a synthetic folder's (image, mask) pairs,
    with each pair's score under `per_pair`; pairs with an empty mask are counted apart and not scored."""
    folder = DatasetFolder(synthetic_dir)
    items = synthetic_items(folder, rows)
    if not items:
        raise ValueError(f"{folder.metadata_path}: no row has a mask, so label fidelity cannot be scored")
    scores = lesion_dice(segmenter, items)
    values = np.array([score["dice"] for score in scores if score["lesion"]], dtype=float)
    synthetic = float(values.mean()) if values.size else math.nan
    real = segmenter.info.real_dice
    return {
        "synthetic_dice": synthetic,
        "real_dice": real,
        "ratio": synthetic / real if values.size and real > 0 else math.nan,
        "share_above_0_5": float((values > GOOD_PAIR).mean()) if values.size else math.nan,
        "pairs": int(values.size),
        "empty_mask_pairs": int(len(scores) - values.size),
        "real_pairs": segmenter.info.real_pairs,
        "segmenter": {key: value for key, value in asdict(segmenter.info).items() if key != "per_real_image"},
        "description": (f"Dice of a {segmenter.info.network} segmenter trained on the real train split, on each "
                        "synthetic image against its own mask, over its Dice on real test images (pairs whose mask "
                        f"holds a lesion, at {segmenter.info.resolution} px)"
                        + (f"; its weights selected on {segmenter.info.selected_on}" if segmenter.info.selected_on
                           else "")),
        "per_pair": scores,
    }


def record_in_manifest(synthetic_dir: str | Path, per_pair: list[dict]) -> int:
    """Write each scored pair's Dice into its manifest line (`extra.label_fidelity_dice`); returns how many lines
    were updated. The manifest is rewritten whole under a temporary name, so a reader never sees half of it."""
    scores = {score["file_name"]: score["dice"] for score in per_pair}
    with output_lock(synthetic_dir, "--synthetic"):  # no generate run appends while the file is rewritten
        entries = read_manifest(synthetic_dir)
        updated = 0
        for entry in entries:
            if entry.file_name in scores:
                entry.extra["label_fidelity_dice"] = scores[entry.file_name]
                updated += 1
        if updated:
            lines = "".join(json.dumps(asdict(entry), ensure_ascii=False) + "\n" for entry in entries)
            write_text_atomic(Path(synthetic_dir) / MANIFEST_NAME, lines)
    return updated


def plot_fidelity(path: str | Path, fidelity: dict, per_real_image: list[dict]) -> Path:
    """Histogram of per-pair Dice of the synthetic pairs beside that of the real test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synthetic = [pair["dice"] for pair in fidelity["per_pair"] if pair["lesion"]]
    real = [image["dice"] for image in per_real_image if image["lesion"]]
    figure, axis = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    bins = np.linspace(0.0, 1.0, 21)
    axis.hist(real, bins=bins, density=True, alpha=0.55, label=f"real test images (n={len(real)})")
    axis.hist(synthetic, bins=bins, density=True, alpha=0.55, label=f"synthetic pairs (n={len(synthetic)})")
    axis.axvline(GOOD_PAIR, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("Dice of the segmenter's lesion against the mask")
    axis.set_ylabel("density")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def worst_pair_views(segmenter: FidelitySegmenter, synthetic_dir: str | Path, per_pair: list[dict],
                     count: int = 8, size: int = 128) -> list[tuple[str, np.ndarray]]:
    """(caption, thumbnail) of the `count` lesion pairs with the lowest Dice: the image with its mask (red) and
    the segmenter's prediction (cyan) outlined."""
    from medaug.data import fit_square, load_image
    from medaug.report import outlined

    folder = DatasetFolder(synthetic_dir)
    worst = sorted((pair for pair in per_pair if pair["lesion"]), key=lambda pair: pair["dice"])[:count]
    by_name = {item["file_name"]: item for item in synthetic_items(folder)}
    items = [by_name[pair["file_name"]] for pair in worst]
    if not items:
        return []
    predictions, masks = segmenter.predict(items)
    views = []
    for pair, item, prediction, mask in zip(worst, items, predictions, masks):
        square = fit_square(load_image(item["image"], 1), segmenter.info.resolution, segmenter.info.fit)
        views.append((f"{Path(pair['file_name']).name}: Dice {pair['dice']:.2f}",
                      outlined(square, mask, size, prediction)))
    return views
