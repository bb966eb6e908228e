"""Scoring an encoder: a logistic-regression probe on its frozen features, a supervised network of the same shape
trained on the same labels, their scores on the test split, and Grad-CAM maps of what each looks at.

The probe is multinomial logistic regression on standardised features, fitted by L-BFGS, its L2 strength chosen
on the validation split by macro-F1 (torch and numpy only: no new dependency for a few hundred rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medaug.metrics.encoder import DomainEncoder, shuffled_batches, warmup_cosine_rate
from medaug.ssl.policies import Policy, ViewMaker

L2_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def encode(encoder: DomainEncoder, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """(N, feature_dim) backbone features of (N, C, R, R) images in [0, 1]."""
    encoder.eval()
    device = next(encoder.parameters()).device
    return torch.cat([encoder.features(images[start:start + batch_size].to(device)).cpu()
                      for start in range(0, images.shape[0], batch_size)]).numpy()


@dataclass
class Probe:
    """A fitted probe: standardisation, then a linear layer (weight (K, D), bias (K,))."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    l2: float

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = ((features - self.mean) / self.scale) @ self.weight.T + self.bias
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()

    def as_layer(self) -> nn.Linear:
        """The probe as one linear layer on raw features (standardisation folded in), for Grad-CAM."""
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        weight = self.weight / self.scale
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            layer.bias.copy_(torch.from_numpy(self.bias - weight @ self.mean))
        return layer


def _fit_logistic(features: np.ndarray, labels: np.ndarray, classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    x, y = torch.from_numpy(features).double(), torch.from_numpy(labels).long()
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().numpy(), bias.detach().numpy()


def fit_probe(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
              val_labels: np.ndarray, classes: int) -> Probe:
    """The probe whose L2 strength scores the best macro-F1 on the validation rows (the middle one without any)."""
    mean = train_features.mean(axis=0)
    scale = train_features.std(axis=0) + 1e-6
    standard = (train_features - mean) / scale
    fitted = []
    for l2 in L2_STRENGTHS:
        weight, bias = _fit_logistic(standard, train_labels, classes, l2)
        fitted.append(Probe(mean, scale, weight, bias, l2))
    if len(val_labels) == 0:
        return fitted[len(fitted) // 2]
    return max(fitted, key=lambda probe: macro_f1(val_labels, probe.probabilities(val_features).argmax(1), classes))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    """Mean F1 over the classes present in `labels` or `predicted`."""
    present = sorted(set(labels.tolist()) | set(predicted.tolist()))
    scores = []
    for k in present:
        true_positive = np.sum((predicted == k) & (labels == k))
        denominator = np.sum(predicted == k) + np.sum(labels == k)
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U), ties counted half."""
    from scipy.stats import rankdata

    count_positive, count_negative = int(positive.sum()), int((~positive).sum())
    if not count_positive or not count_negative:
        return float("nan")
    rank_sum = rankdata(scores)[positive].sum()
    return float((rank_sum - count_positive * (count_positive + 1) / 2) / (count_positive * count_negative))


def classification_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """AUC (two classes: of the second; more: the mean of one-vs-rest AUCs over the classes in `labels`),
    accuracy and macro-F1."""
    classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    if classes == 2:
        auc = _binary_auc(labels == 1, probabilities[:, 1])
    else:
        aucs = [_binary_auc(labels == k, probabilities[:, k]) for k in sorted(set(labels.tolist()))]
        auc = float(np.nanmean(aucs)) if not all(np.isnan(aucs)) else float("nan")
    return {"auc": auc, "accuracy": float(np.mean(predicted == labels)),
            "macro_f1": macro_f1(labels, predicted, classes)}


class Classifier(nn.Module):
    """An encoder's backbone and a linear head: the supervised baseline, or a probe made differentiable."""

    def __init__(self, encoder: DomainEncoder, head: nn.Linear):
        super().__init__()
        self.backbone = encoder.backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images * 2 - 1))


def train_supervised(images: torch.Tensor, labels: np.ndarray, classes: int, policy: Policy, steps: int,
                     batch_size: int, learning_rate: float, seed: int, block_channels: tuple[int, ...],
                     device: str = "cpu") -> Classifier:
    """The same backbone trained from scratch with cross-entropy on the labelled rows, under `policy`."""
    torch.manual_seed(seed)
    encoder = DomainEncoder(in_channels=images.shape[1], resolution=images.shape[-1],
                            block_channels=tuple(block_channels), method="supervised")
    model = Classifier(encoder, nn.Linear(encoder.feature_dim, classes)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    views = ViewMaker(policy, images.shape[-1], seed)
    targets = torch.from_numpy(labels).long()
    batches = shuffled_batches(images.shape[0], min(batch_size, images.shape[0]), seed)
    for step in range(steps):
        rows = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_rate(step, steps, learning_rate, max(1, steps // 20))
        loss = F.cross_entropy(model(views(images[rows]).to(device)), targets[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    device = next(model.parameters()).device
    return torch.cat([torch.softmax(model(images[start:start + batch_size].to(device)), dim=1).cpu()
                      for start in range(0, images.shape[0], batch_size)]).numpy()


def gradcam_maps(model: Classifier, images: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """MONAI Grad-CAM of each image's predicted class at the backbone's last block: ((N, H, W) in [0, 1],
    predicted classes)."""
    from monai.visualize import GradCAM

    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    with torch.no_grad():
        predicted = model(images).argmax(dim=1).tolist()
    maps = GradCAM(nn_module=model, target_layers="backbone.layer4")(x=images, class_idx=None)
    return maps.detach().cpu().numpy()[:, 0], predicted
