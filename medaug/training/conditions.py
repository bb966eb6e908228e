"""A training step's conditions: frozen features (cached across runs), a batch's hidden states with condition
dropout, and the embeddings validation images are sampled from."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from medaug.training.cache import TensorCache, folder_identity


def compute_features(condition, inputs: list, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(inputs), batch_size), desc="encoding conditions", leave=False,
                      disable=not progress):
        with torch.no_grad():
            chunks.append(condition.features(inputs[start:start + batch_size]).float().cpu())
    return torch.cat(chunks)


def cached_features(condition, inputs: list, cache: TensorCache, accelerator) -> torch.Tensor:
    """Frozen condition features per row, from the cache (keyed by the encoder's files and the inputs) or
    computed once; kinds with nothing to cache (precomputed embeddings) are read directly."""
    if condition.cache_sources is None:
        return compute_features(condition, inputs)
    key = {"kind": f"{condition.kind}-features-v1",
           "sources": [folder_identity(path) for path in condition.cache_sources],
           "inputs": condition.input_identity(inputs)}
    with accelerator.main_process_first():
        return cache.load_or_compute(f"{condition.kind}-features", key,
                                     lambda: {"features": compute_features(condition, inputs)},
                                     write=accelerator.is_main_process)["features"]


def batch_hidden_states(condition, features, inputs: list, indices: torch.Tensor, generator, device, dtype,
                        dropout: float, encode_with_grad: bool = False) -> torch.Tensor:
    """Hidden states of a batch: from cached `features`, or (features None) encoded now (with gradients when
    the encoder trains); each condition replaced by the unconditional embedding with probability `dropout`."""
    if features is not None:
        batch_features = features[indices].to(device)
    elif encode_with_grad:
        batch_features = condition.features([inputs[i] for i in indices.tolist()])
    else:
        batch_features = compute_features(condition, [inputs[i] for i in indices.tolist()], progress=False).to(device)
    hidden = condition.hidden_states(batch_features.to(dtype) if condition.projection is None else batch_features)
    if dropout > 0:
        drop = (torch.rand(hidden.shape[0], generator=generator) < dropout).to(device)
        unconditional = condition.unconditional_embedding(hidden.shape[0]).to(hidden.dtype)
        hidden = torch.where(drop[:, None, None], unconditional, hidden)
    return hidden


def validation_rows(folder, split: str, count: int) -> list[int]:
    """The first `count` rows of the val split, or of `split` where the folder has no val rows."""
    has_val = any(folder.split(i) == "val" for i in range(len(folder)))
    return folder.indices("val" if has_val else split)[:count]


def validation_embeddings(condition, folder, rows: list[int], device, prompt: str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, negative) for validation images: `prompt` for every image where given and the kind takes prompts,
    else the conditions of `rows`."""
    use_prompt = prompt and condition.argument == "prompt"
    inputs = [prompt] * len(rows) if use_prompt else condition.inputs(folder, rows)
    features = compute_features(condition, inputs).to(device)
    with torch.no_grad():
        hidden = condition.hidden_states(features)
        negative = condition.unconditional_embedding(hidden.shape[0]).to(hidden.dtype)
    return hidden, negative
