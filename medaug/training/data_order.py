"""A data order that depends only on (seed, epoch), so a resumed run visits the same samples in the same order."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochPermutationSampler(Sampler[int]):
    """A fresh permutation each epoch from `seed` and the epoch number; call `set_epoch` before iterating."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def step_generator(seed: int, step: int, process_index: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """The random stream of one optimisation step (noise, timesteps, condition dropout).

    Seeding per step makes step k's randomness the same whether the run was interrupted or not, without
    saving (pickled) random states in checkpoints.
    """
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003) + step) * 64 + process_index)
