"""The Inception-v3 network that FID is defined with, loaded from a local weights file.

FID's reference network is the TensorFlow Inception graph of 2015-12-05. Ported to PyTorch (the
`pt_inception-2015-12-05-*.pth` file FID tools download) it has torchvision's layer names and shapes, with
1008 output classes, but pools differently from torchvision's forward pass: the average pools beside the
mixed blocks ignore padding, and the last block max-pools. `FIDInception` builds the torchvision layers and
runs its own forward pass with that pooling, returning the 2048 pool3 features.

Weights are read as safetensors or with `torch.load(weights_only=True)`: a checkpoint is never unpickled
beyond plain tensors, so a file can carry no code.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048


class InceptionWeightsError(ValueError):
    """A weights file cannot be used as FID's Inception network; the message names the file."""


def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _chain(block: nn.Module, x: torch.Tensor, *names: str) -> torch.Tensor:
    for name in names:
        x = getattr(block, name)(x)
    return x


def _mixed_a(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([
        block.branch1x1(x),
        _chain(block, x, "branch5x5_1", "branch5x5_2"),
        _chain(block, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
        block.branch_pool(_pool(x, "avg")),
    ], 1)


def _mixed_c(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([
        block.branch1x1(x),
        _chain(block, x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
        _chain(block, x, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
        block.branch_pool(_pool(x, "avg")),
    ], 1)


def _mixed_e(block: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    wide = block.branch3x3_1(x)
    deep = _chain(block, x, "branch3x3dbl_1", "branch3x3dbl_2")
    return torch.cat([
        block.branch1x1(x),
        block.branch3x3_2a(wide), block.branch3x3_2b(wide),
        block.branch3x3dbl_3a(deep), block.branch3x3dbl_3b(deep),
        block.branch_pool(_pool(x, pool)),
    ], 1)


class FIDInception(nn.Module):
    """Inception-v3 up to its 2048-d average pool, with the pooling of FID's reference graph.

    Input: (B, 3, H, W) in [0, 1]; it is resized to 299 px (bilinear) and scaled to [-1, 1], as the
    reference graph expects.
    """

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        from torchvision.models.inception import Inception3

        # init_weights=False: the weights come from a file, and scipy's truncated normal init is slow
        self.net = Inception3(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        net = self.net
        x = _chain(net, x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                   "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2")
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = _mixed_a(getattr(net, name), x)
        x = net.Mixed_6a(x)
        for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = _mixed_c(getattr(net, name), x)
        x = net.Mixed_7a(x)
        x = _mixed_e(net.Mixed_7b, x, "avg")
        x = _mixed_e(net.Mixed_7c, x, "max")
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a plain PyTorch state dict; nothing else is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own types for malformed headers
            raise InceptionWeightsError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code-carrying pickles, RuntimeError for non-archives
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InceptionWeightsError(
            f"{path}: not loadable as plain tensors (safetensors, or a PyTorch state dict that "
            f"torch.load(weights_only=True) accepts): {first_line}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{path}: holds {type(state).__name__}, not a dict of tensors (a state dict)")
    return state


def load_fid_inception(path: str | Path) -> FIDInception:
    """FID's Inception network with the weights of `path`, checked name by name and shape by shape."""
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 1008
    model = FIDInception(num_classes=num_classes)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("net.fc.")}
    given = {f"net.{k}": v for k, v in state.items()}
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    if missing:
        raise InceptionWeightsError(
            f"{path}: not an Inception-v3 checkpoint: {len(missing)} of {len(expected)} expected tensors are "
            f"missing (first: {', '.join(k[4:] for k in missing[:3])}); FID needs the "
            "pt_inception-2015-12-05 weights or torchvision's inception_v3 state dict")
    wrong = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    if wrong:
        name = wrong[0]
        raise InceptionWeightsError(
            f"{path}: not an Inception-v3 checkpoint: tensor {name[4:]} has shape {tuple(given[name].shape)}, "
            f"expected {tuple(expected[name].shape)}")
    model.load_state_dict({k: v for k, v in given.items() if k in expected or k.startswith("net.fc.")},
                          strict=False)
    return model.eval()
