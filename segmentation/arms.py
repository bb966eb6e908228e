"""The arm registry: what each arm of a comparison trains on, and the one function that trains any of them.

`medaug bench`, the demo and `medaug study` all train their arms here, each for the recipe's optimiser steps, so
the same arm with the same data, recipe and seed gives the same scores through each of them. Light augmentation
(left-right flips) belongs to every arm, as it belongs to any practitioner's baseline; the `classical` policy is
the heavier one on top (medaug.segmentation.transforms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from medaug.segmentation.train_seg import SegRecipe, fit_segmenter, train_segmentation


@dataclass(frozen=True)
class ArmSpec:
    real: bool  # trains on the real (sub)set
    synthetic: bool  # adds synthetic pairs
    augment: str  # the augmentation policy: light or classical
    description: str
    pretrain: bool = False  # synthetic pairs for the first half of the steps, then the real images


ARMS: dict[str, ArmSpec] = {
    "real": ArmSpec(True, False, "light", "the real images with flips: the yardstick"),
    "real+classical": ArmSpec(True, False, "classical", "the real images with classical augmentation"),
    "real+synthetic": ArmSpec(True, True, "light", "the real images and synthetic pairs"),
    "real+classical+synthetic": ArmSpec(True, True, "classical", "both"),
    "synthetic_pretrain": ArmSpec(True, True, "light", "half the steps on synthetic pairs, then half on real",
                                  pretrain=True),
    "synthetic": ArmSpec(False, True, "light", "synthetic pairs only (train on synthetic, test on real)"),
}
SYNTHETIC_ARMS = tuple(name for name, spec in ARMS.items() if spec.synthetic)
BASELINES = ("real", "real+classical")  # every other arm is compared with these


def arm_spec(name: str) -> ArmSpec:
    if name not in ARMS:
        raise ValueError(f"--arms: unknown arm '{name}'; expected some of {', '.join(ARMS)}")
    return ARMS[name]


def arm_items(name: str, real: list[dict], synthetic: list[dict]) -> list[dict]:
    """The training items of arm `name` (for a pre-training arm, those of its second half)."""
    spec = arm_spec(name)
    return (real if spec.real else []) + (synthetic if spec.synthetic and not spec.pretrain else [])


def train_seg_arm(name: str, real: list[dict], synthetic: list[dict], val: list[dict], test: list[dict],
                  recipe: SegRecipe, seed: int, device="cpu", on_step: Callable[[int, float], None] | None = None,
                  on_model=None) -> dict:
    """Train segmentation arm `name` for `recipe.steps` optimiser steps in all and score it on `test`."""
    spec = arm_spec(name)
    initial, pretrain_history, steps = None, None, recipe.steps
    if spec.pretrain:
        if not synthetic:
            raise ValueError(f"arm {name}: no synthetic pairs to pre-train on")
        first = recipe.steps // 2
        model, pretrain_history = fit_segmenter(synthetic, val, recipe, seed, spec.augment, device, steps=first)
        initial, steps = model.state_dict(), recipe.steps - first
    outcome = train_segmentation(arm_items(name, real, synthetic), val, test, replace(recipe, steps=steps), seed,
                                 spec.augment, device, on_step, on_model, initial_state=initial)
    if pretrain_history is not None:
        outcome["history"]["pretrain"] = pretrain_history
        outcome["steps"] = recipe.steps
    return outcome
