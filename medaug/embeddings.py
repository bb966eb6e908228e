"""Embedding files keyed by `file_name`: what `--embeddings_file` reads and `medaug embed` writes.

Formats:
- `.safetensors`: one tensor per key (the row's `file_name`), written by `medaug embed`.
- `.npz`: arrays `file_name` (strings) and `embeddings` (N, ...), or one array per key.
- `.parquet`: a key column and a value column holding lists (nested lists for (L, D) matrices, or flat
  lists with `shape` given, as ELIXR exports often are).
Each embedding is (D,) or (L, D): ELIXR's 32x768 and Path Foundation's 384 both fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EMBEDDING_SUFFIXES = (".safetensors", ".npz", ".parquet")


class EmbeddingError(ValueError):
    """An embeddings file or one of its entries is unusable; the message names it."""


def parse_shape(text: str) -> list[int]:
    """"32,768" -> [32, 768]; anything else is refused (an argparse `type=` and the `--shape` of medaug embed)."""
    try:
        shape = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise EmbeddingError(f"shape {text!r}: expected sizes separated by commas, e.g. 32,768") from None
    if any(size < 1 for size in shape):
        raise EmbeddingError(f"shape {text!r}: sizes must be positive")
    return shape


def load_embeddings(
    path: str | Path, key_column: str = "file_name", value_column: str = "embedding",
    shape: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Read an embeddings file into {key: float32 array}."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: embeddings file not found")
    result = {}
    for key, value in _read_table(path, key_column, value_column).items():
        try:
            array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise EmbeddingError(f"{path}: '{key}' is not numbers ({np.asarray(value).dtype} values); embeddings "
                                 "must be numeric vectors or matrices") from None
        if shape is not None:
            if array.size != int(np.prod(shape)):
                raise EmbeddingError(f"{path}: '{key}' has {array.size} values, which cannot be shaped {shape}")
            array = array.reshape(shape)
        result[str(key)] = array
    return result


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        return _read_npz(path)
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        raise EmbeddingError(f"{path}: holds pickled Python objects, which medaug does not load; save keys as a "
                             "string array (np.array(keys, dtype=str))") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        names = set(archive.files)
        if {"file_name", "embeddings"} <= names:
            keys = archive["file_name"].astype(str)
            values = archive["embeddings"]
            if len(keys) != len(values):
                raise EmbeddingError(f"{path}: {len(keys)} file names but {len(values)} embeddings")
            return {key: values[i] for i, key in enumerate(keys)}
        return {name: archive[name] for name in archive.files}


def _read_table(path: Path, key_column: str, value_column: str) -> dict:
    """{key: values} of an embeddings file; a damaged file is refused by name."""
    from safetensors import SafetensorError

    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingError(f"{path}: unsupported embeddings file; expected one of {', '.join(EMBEDDING_SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
        return _load_npz(path) if suffix == ".npz" else _load_parquet(path, key_column, value_column)
    except EmbeddingError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError) as error:  # each reader's own damage reports
        raise EmbeddingError(f"{path}: not a readable {suffix[1:]} file ({type(error).__name__}: {error})") from None


def _load_parquet(path: Path, key_column: str, value_column: str) -> dict[str, np.ndarray]:
    import pandas as pd

    try:
        import pyarrow  # noqa: F401  (pandas reads parquet through it)
    except ImportError:
        raise EmbeddingError(f"{path}: reading parquet needs pyarrow, which is not installed; "
                             "install it with `pip install 'medaug[parquet]'`, or convert the file to "
                             ".safetensors or .npz") from None
    table = pd.read_parquet(path)
    for column in (key_column, value_column):
        if column not in table.columns:
            raise EmbeddingError(f"{path}: column '{column}' not found (columns: {', '.join(map(str, table.columns))})")
    return {str(key): np.stack([np.asarray(v) for v in value]) if _is_nested(value) else np.asarray(value)
            for key, value in zip(table[key_column], table[value_column])}


def _is_nested(value) -> bool:
    return len(value) > 0 and np.ndim(value[0]) > 0


WRITTEN_BY = "medaug embed"  # safetensors metadata: whose file it is


def save_embeddings(path: str | Path, embeddings: dict[str, np.ndarray]) -> Path:
    """Write {file_name: array} as safetensors (the format `--embeddings_file` reads first)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: np.ascontiguousarray(value, dtype=np.float32) for key, value in embeddings.items()}, str(path),
              metadata={"written_by": WRITTEN_BY})
    return path


def written_by_medaug(path: str | Path) -> bool:
    """Whether a file is an embeddings file `save_embeddings` wrote (so `medaug embed` may replace it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return (handle.metadata() or {}).get("written_by") == WRITTEN_BY
    except (SafetensorError, OSError):
        return False


def check_embeddings(
    embeddings: dict[str, np.ndarray], keys: list[str], source: str | Path,
    expected_shape: tuple[int, ...] | None = None,
) -> tuple[int, ...]:
    """Every key has a finite embedding of one shape (and `expected_shape` when given); return that shape."""
    missing = [key for key in keys if key not in embeddings]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EmbeddingError(f"{source}: no embedding for {len(missing)} row(s): {shown}")
    shape = expected_shape or embeddings[keys[0]].shape
    if len(shape) not in (1, 2):
        raise EmbeddingError(f"{source}: '{keys[0]}' has shape {shape}; expected (D,) or (L, D)")
    for key in keys:
        value = embeddings[key]
        if value.shape != tuple(shape):
            raise EmbeddingError(f"{source}: '{key}' has shape {value.shape}, expected {tuple(shape)}")
        if not np.all(np.isfinite(value)):
            raise EmbeddingError(f"{source}: '{key}' contains NaN or infinite values")
    return tuple(shape)


def import_embeddings(
    keys_by_file: dict[str, str], source: str | Path, key_column: str = "file_name", value_column: str = "embedding",
    shape: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Precomputed embeddings (ELIXR, Path Foundation, ...) re-keyed by dataset `file_name` and checked.

    `keys_by_file` maps each row's file_name to its key in the source file (the file_name itself, or another
    metadata column such as an image id).
    """
    table = load_embeddings(source, key_column, value_column, shape)
    by_key = {key: file_name for file_name, key in keys_by_file.items()}
    check_embeddings(table, list(by_key), source)
    return {by_key[key]: table[key] for key in by_key}


def load_vision_model(model_path: str | Path, subfolder: str | None = None):
    """A Hugging Face vision model and its image processor, from a local folder or a Hub name (with
    `subfolder`, e.g. a Stable Diffusion repository's image_encoder). For `medaug init-model`'s image_encoder/,
    the processor is the sibling feature_extractor/."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

    local = Path(model_path) / (subfolder or "")
    is_local = Path(model_path).exists() or str(model_path).startswith(("/", ".", "~"))
    if is_local and not (local / "config.json").is_file():
        raise EmbeddingError(f"{local}: not a Hugging Face model folder (no config.json)")
    source, options = (str(local), {}) if is_local else (str(model_path), {"subfolder": subfolder} if subfolder else {})
    config = AutoConfig.from_pretrained(source, **options)
    model_class = CLIPVisionModelWithProjection if "clip" in config.model_type else AutoModel
    model = model_class.from_pretrained(source, use_safetensors=True, **options).eval()
    if not is_local:
        return model, _hub_processor(model_path, subfolder)
    for candidate in (local, local.parent / "feature_extractor"):
        if (candidate / "preprocessor_config.json").is_file():
            return model, AutoImageProcessor.from_pretrained(candidate)
    return model, _default_processor(model)


def _hub_processor(name: str, subfolder: str | None):
    from transformers import AutoImageProcessor

    for candidate in ([subfolder, "feature_extractor"] if subfolder else [None]):
        try:
            return AutoImageProcessor.from_pretrained(name, **({"subfolder": candidate} if candidate else {}))
        except OSError:
            continue
    raise EmbeddingError(f"{name}: no image processor found")


def _default_processor(model):
    from transformers import CLIPImageProcessor

    size = getattr(model.config, "image_size", 224)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def embed_images(model, processor, images: list[np.ndarray], tokens: bool = False) -> np.ndarray:
    """Embeddings of (H, W, 3) float images in [0, 1]: a vector each, or (L, D) token matrices with `tokens`."""
    import torch

    inputs = processor(images=images, do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        output = model(pixel_values=inputs.pixel_values.to(model.device, model.dtype))
    if tokens:
        return output.last_hidden_state.float().cpu().numpy()
    for name in ("image_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value.float().cpu().numpy()
    return output.last_hidden_state.mean(dim=1).float().cpu().numpy()
