"""What `medaug inspect` reports about a dataset folder, as plain data."""

from __future__ import annotations

from collections import Counter

import numpy as np

from medaug.data.folder import SPLITS, DatasetFolder, ScanResult, mask_notices


def summarize(folder: DatasetFolder, scan: ScanResult) -> dict:
    """Counts per split, labels, image sizes and mask coverage from a completed scan."""
    indices = range(len(folder))
    splits = Counter(folder.split(i) for i in indices)
    labels: dict[str, Counter] = {}
    for i in indices:
        label = folder.value(i, "label")
        if label:
            labels.setdefault(label, Counter())[folder.split(i)] += 1
    stats = list(scan.stats.values())
    coverages = [s.mask_coverage for s in stats if s.mask_coverage is not None]
    return {
        "dataset": str(folder.root),
        "metadata": folder.metadata_path.name,
        "rows": len(folder),
        "columns": list(folder.table.columns),
        "splits": {split: splits[split] for split in SPLITS if splits[split]}
        | {split: count for split, count in splits.items() if split not in SPLITS},
        "labels": {label: dict(counts) for label, counts in sorted(labels.items())},
        "with_text": sum(bool(folder.value(i, "text")) for i in indices),
        "with_mask": sum(bool(folder.value(i, "mask_file_name")) for i in indices),
        "with_conditioning_image": sum(bool(folder.value(i, "conditioning_image_file_name")) for i in indices),
        "images_read": len(stats),
        "image_sizes": _size_summary(stats),
        "pixel_types": dict(Counter(f"{s.dtype}, {s.channels} channel(s)" for s in stats)),
        "mask_coverage": _coverage_summary(coverages),
        "notices": list(mask_notices(folder, scan).values()),
        "problems": [str(problem) for problem in scan.problems],
    }


def _size_summary(stats: list) -> dict:
    if not stats:
        return {}
    heights = np.array([s.height for s in stats])
    widths = np.array([s.width for s in stats])
    common = Counter(f"{s.width}x{s.height}" for s in stats).most_common(3)
    return {
        "width": [int(widths.min()), int(widths.max())],
        "height": [int(heights.min()), int(heights.max())],
        "most_common": [f"{size} ({count})" for size, count in common],
    }


def _coverage_summary(coverages: list[float]) -> dict:
    if not coverages:
        return {}
    values = np.array(coverages)
    return {
        "masks_read": len(values),
        "empty": int(np.sum(values == 0)),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }
