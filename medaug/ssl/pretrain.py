"""SimCLR and BYOL on an image tensor. Pre-training sees images only: no label reaches this module.

SimCLR (Chen et al., 2020): two views per image, a projection head, and the NT-Xent loss, in which each view must
find its partner among the other 2B - 2 views of the batch, so every other image is a negative, including images
of the same class, which is where class imbalance and hard negatives hurt.

BYOL (Grill et al., 2020), written from the paper's description: an online network (backbone, projector,
predictor) learns to predict a target network's projection of the other view; the target (backbone and
projector) is not trained but follows the online weights as an exponential moving average whose rate rises from
`ema` to 1 on a cosine schedule. The loss is the mean squared distance of the normalised vectors, both ways round.
No negatives are needed.

Both return the `DomainEncoder` whose backbone gives the features the probe reads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medaug.metrics.encoder import DomainEncoder, nt_xent, shuffled_batches, warmup_cosine_rate
from medaug.ssl.policies import Policy, ViewMaker

METHODS = ("simclr", "byol")


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    temperature: float = 0.2  # SimCLR
    ema: float = 0.99  # BYOL's starting target rate
    block_channels: tuple[int, ...] = (32, 64, 128, 256)


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features))


class Byol(nn.Module):
    """Online network (`encoder.backbone`, `projector`, `predictor`) and its moving-average target."""

    def __init__(self, encoder: DomainEncoder, projection_dim: int = 128):
        super().__init__()
        width = encoder.feature_dim
        self.encoder = encoder
        self.projector = _mlp(width, 2 * width, projection_dim)
        self.predictor = _mlp(projection_dim, 2 * width, projection_dim)
        self.target_backbone = copy.deepcopy(encoder.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.backbone.parameters(), *self.projector.parameters(), *self.predictor.parameters()]

    def loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        predictions = [self.predictor(self.projector(self.encoder.features(view))) for view in (first, second)]
        with torch.no_grad():
            targets = [self.target_projector(self.target_backbone(view * 2 - 1)) for view in (second, first)]
        return sum(_normalised_distance(p, t).mean() for p, t in zip(predictions, targets))

    @torch.no_grad()
    def update_target(self, rate: float) -> None:
        """target <- rate * target + (1 - rate) * online, for backbone and projector (buffers copied)."""
        for online, target in ((self.encoder.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for online_parameter, target_parameter in zip(online.parameters(), target.parameters()):
                target_parameter.mul_(rate).add_(online_parameter.detach(), alpha=1.0 - rate)
            for online_buffer, target_buffer in zip(online.buffers(), target.buffers()):
                target_buffer.copy_(online_buffer)


def _normalised_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 2 - 2 * F.cosine_similarity(prediction, target, dim=-1)


def target_rate(step: int, total: int, base: float) -> float:
    """BYOL's schedule: from `base` at step 0 to 1 at the last step."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def initial_encoder(images: torch.Tensor, settings: PretrainSettings, seed: int, method: str = "random"
                    ) -> DomainEncoder:
    """The encoder before any training, seeded: pre-training starts here, and the study probes it as a floor (what
    a probe gets from random convolutional features)."""
    torch.manual_seed(seed)
    return DomainEncoder(in_channels=images.shape[1], resolution=images.shape[-1],
                         block_channels=tuple(settings.block_channels), method=method)


def pretrain(images: torch.Tensor, method: str, policy: Policy, settings: PretrainSettings, seed: int,
             device: str = "cpu", on_step: Callable[[int, float], None] | None = None) -> DomainEncoder:
    """An encoder pre-trained on `images` (N, C, R, R) in [0, 1] by `method` under `policy`."""
    if method not in METHODS:
        raise ValueError(f"--method: unknown method '{method}'; expected one of {', '.join(METHODS)}")
    if images.shape[0] < 2:
        raise ValueError(f"self-supervised pre-training needs at least 2 images, got {images.shape[0]}")
    encoder = initial_encoder(images, settings, seed, method).to(device).train()
    learner = Byol(encoder).to(device).train() if method == "byol" else None
    parameters = learner.online_parameters() if learner else list(encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=1e-4)
    views = ViewMaker(policy, images.shape[-1], seed)
    batches = shuffled_batches(images.shape[0], min(settings.batch_size, images.shape[0]), seed)
    for step in range(settings.steps):
        batch = images[next(batches)]
        first, second = views(batch).to(device), views(batch).to(device)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_rate(step, settings.steps, settings.learning_rate, max(1, settings.steps // 20))
        loss = (learner.loss(first, second) if learner else
                nt_xent(encoder(first), encoder(second), settings.temperature))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if learner:
            learner.update_target(target_rate(step, settings.steps, settings.ema))
        if on_step is not None:
            on_step(step + 1, loss.item())
    return encoder.eval()
