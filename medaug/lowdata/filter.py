"""Keep a synthetic pair only if a segmenter trained on the real subset finds its mask in its image.

The rule is a Dice threshold (`0.5`: keep pairs scoring at least 0.5) or a quantile (`q0.25`: drop the lowest
quarter of lesion pairs). A pair whose mask is empty is kept when the segmenter finds no lesion in its image either.
The scorer is `medaug.metrics.fidelity`'s, the one `medaug evaluate` reports label fidelity with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FilterRule:
    threshold: float | None = None
    quantile: float | None = None

    @classmethod
    def parse(cls, text: str) -> FilterRule:
        """`0.5` (a Dice threshold) or `q0.25` (the share of lesion pairs to drop); the error names --filter."""
        try:
            if text.startswith("q"):
                quantile = float(text[1:])
                if 0.0 <= quantile < 1.0:
                    return cls(quantile=quantile)
            else:
                threshold = float(text)
                if 0.0 <= threshold <= 1.0:
                    return cls(threshold=threshold)
        except ValueError:
            pass
        raise ValueError(f"--filter: a Dice threshold in [0, 1] (0.5) or a quantile to drop as q0.25, got '{text}'")

    def __str__(self) -> str:
        return f"q{self.quantile:g}" if self.quantile is not None else f"{self.threshold:g}"


def keep_pairs(per_pair: list[dict], rule: FilterRule) -> tuple[set[str], dict]:
    """(file names kept, {rule, threshold, kept, total, acceptance}) for scored pairs (`lesion_dice`'s output)."""
    scores = np.array([pair["dice"] for pair in per_pair if pair["lesion"]], dtype=float)
    if rule.quantile is not None:
        threshold = float(np.quantile(scores, rule.quantile)) if scores.size else 0.0
    else:
        threshold = rule.threshold
    kept = {pair["file_name"] for pair in per_pair
            if (pair["lesion"] and pair["dice"] >= threshold) or (not pair["lesion"] and not pair["predicted_pixels"])}
    total = len(per_pair)
    return kept, {"rule": str(rule), "threshold": threshold, "kept": len(kept), "total": total,
                  "acceptance": len(kept) / total if total else float("nan")}
