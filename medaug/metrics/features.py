"""Feature extractors for distribution metrics, chosen by name; each says what it is and how it preprocesses.

- `inception`: FID's Inception-v3 from a local weights file (2048-d pool3 features).
- `hf`: any local Hugging Face vision model folder (CLIP vision, DINOv2, a radiology encoder), or a Stable
  Diffusion folder with `image_encoder/` and `feature_extractor/`.
- `encoder`: medaug's own self-supervised domain encoder (`medaug train-encoder`).

Numbers from different extractors live on different scales and are never compared or mixed; every result
carries the `describe()` of the extractor that produced it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medaug.metrics.imagesets import ImageSet, iterate_batches

EXTRACTORS = ("inception", "hf", "encoder")


class ExtractorError(ValueError):
    """An extractor cannot be built; the message names the flag and the file or folder."""


@dataclass
class Extractor:
    name: str  # one of EXTRACTORS
    source: str  # the weights file or model folder
    resolution: int  # images are squared to this size before `forward`
    channels: int  # channels `forward` expects
    preprocessing: str
    forward: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)  # (B, C, R, R) in [0, 1] -> (B, D)
    fit: str = "pad"  # how images become square (medaug.data.fit_square)
    device: str = "cpu"

    def describe(self) -> dict:
        return {"extractor": self.name, "source": self.source, "preprocessing": self.preprocessing}


def build_extractor(name: str, inception_weights: str | Path | None = None, model_path: str | Path | None = None,
                    encoder_dir: str | Path | None = None, fit: str = "pad", device: str = "cpu") -> Extractor:
    """The extractor `name`, from the path its flag names."""
    paths = {"inception": (inception_weights, "--inception_weights"), "hf": (model_path, "--model_path"),
             "encoder": (encoder_dir, "--encoder_dir")}
    if name not in paths:
        raise ExtractorError(f"--features: unknown extractor '{name}'; expected one of {', '.join(EXTRACTORS)}")
    path, flag = paths[name]
    if path is None:
        raise ExtractorError(f"--features {name} needs {flag}")
    if name == "inception":
        return inception_extractor(path, fit, device)
    if name == "hf":
        return hf_extractor(path, fit, device)
    return encoder_extractor(path, device)


def inception_extractor(weights: str | Path, fit: str = "pad", device: str = "cpu") -> Extractor:
    from medaug.metrics.inception import INCEPTION_SIZE, InceptionWeightsError, load_fid_inception

    try:
        network = load_fid_inception(weights).to(device)
    except InceptionWeightsError as error:
        raise ExtractorError(f"--inception_weights {error}") from error
    return Extractor(
        name="inception", source=str(weights), resolution=INCEPTION_SIZE, channels=3, fit=fit, device=device,
        preprocessing=f"RGB (grey repeated), {fit} to {INCEPTION_SIZE}x{INCEPTION_SIZE} px, scaled to [-1, 1]; "
                      "2048-d pool3 features",
        forward=network,
    )


def _hf_folders(model_path: Path) -> tuple[Path, Path]:
    """(model folder, image processor folder): a Stable Diffusion folder keeps them in two subfolders."""
    if (model_path / "image_encoder" / "config.json").is_file():
        return model_path / "image_encoder", model_path / "feature_extractor"
    if not (model_path / "config.json").is_file():
        raise ExtractorError(f"--model_path {model_path}: not a Hugging Face model folder (no config.json)")
    sibling = model_path.parent / "feature_extractor"  # image_encoder/ of a Stable Diffusion folder, named directly
    if not (model_path / "preprocessor_config.json").is_file() and (sibling / "preprocessor_config.json").is_file():
        return model_path, sibling
    return model_path, model_path


def _hf_model(model_dir: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or transformers.AutoModel
    return model_class.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)


def _pooled(output) -> tuple[torch.Tensor, str]:
    """One vector per image from whatever a vision model returns, and the name of the output used."""
    if isinstance(output, torch.Tensor):
        return output.flatten(1), "image features"
    for key in ("image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if value is not None:
            return value.flatten(1), key
    hidden = output.last_hidden_state
    return (hidden.mean(dim=1) if hidden.ndim == 3 else hidden.mean(dim=(2, 3))), "mean of last_hidden_state"


def hf_extractor(model_path: str | Path, fit: str = "pad", device: str = "cpu") -> Extractor:
    import transformers

    model_dir, processor_dir = _hf_folders(Path(model_path))
    transformers.utils.logging.disable_progress_bar()  # a bar per weight file would bury the command's output
    try:
        model = _hf_model(model_dir).to(device).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(processor_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ExtractorError(f"--model_path {model_path}: cannot load a vision model and its image processor "
                             f"({str(error).splitlines()[0]})") from error
    size = _processor_size(processor)
    mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device)[None, :, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.float32, device=device)[None, :, None, None]
    # A two-tower model (CLIP, SigLIP) needs text in forward(); its image tower is reached by this method.
    two_tower = hasattr(model, "get_image_features") and "input_ids" in inspect.signature(model.forward).parameters

    def pooled(images: torch.Tensor) -> tuple[torch.Tensor, str]:
        pixels = (images - mean) / std
        return _pooled(model.get_image_features(pixel_values=pixels) if two_tower else model(pixel_values=pixels))

    with torch.no_grad():
        _, output_name = pooled(torch.zeros(1, 3, size, size, device=device))
    return Extractor(
        name="hf", source=str(model_dir), resolution=size, channels=3, fit=fit, device=device,
        preprocessing=f"RGB (grey repeated), {fit} to {size}x{size} px, normalised with the image processor's "
                      f"mean/std; {type(model).__name__} {output_name}",
        forward=lambda images: pooled(images)[0],
    )


def _processor_size(processor) -> int:
    """The square side the model sees: the processor's crop size when it crops, else its resize size."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    raise ExtractorError(f"cannot tell the input size from the image processor's size {size!r}")


def encoder_extractor(encoder_dir: str | Path, device: str = "cpu") -> Extractor:
    from medaug.metrics.encoder import load_encoder

    try:
        encoder = load_encoder(encoder_dir).to(device)
    except (OSError, ValueError) as error:
        raise ExtractorError(f"--encoder_dir {error}") from error
    return Extractor(
        name="encoder", source=str(encoder_dir), resolution=encoder.config.resolution,
        channels=encoder.config.in_channels, fit=encoder.config.fit, device=device,
        preprocessing=f"{encoder.preprocessing()}; {encoder.feature_dim}-d {encoder.config.method} backbone features",
        forward=encoder.features,
    )


@torch.no_grad()
def extract_features(extractor: Extractor, image_set: ImageSet, batch_size: int = 32,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D) float64 features of every image of a set."""
    chunks = []
    for batch in iterate_batches(image_set, extractor.channels, extractor.resolution, extractor.fit, batch_size):
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(extractor.device, torch.float32)
        chunks.append(extractor.forward(pixels).double().cpu().numpy())
        if progress is not None:
            progress(len(batch))
    return np.concatenate(chunks)
