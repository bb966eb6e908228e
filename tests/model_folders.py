"""Output folders of short training runs, for the generation tests: finetune.py for two steps on the tiny
base, and the same folder with a ControlNet added as train_controlnet.py would save it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medaug.scripts import finetune

EMBEDDING_SHAPE = (8, 16)  # an (L, D) embedding, as ELIXR's 32x768 but small


def write_embeddings(data: Path, path: Path, shape=EMBEDDING_SHAPE, seed: int = 0) -> Path:
    from medaug.embeddings import save_embeddings

    names = pd.read_csv(data / "metadata.csv", dtype=str)["file_name"]
    rng = np.random.default_rng(seed)
    return save_embeddings(path, {name: rng.normal(size=shape).astype(np.float32) for name in names})


def finetuned_folder(base: Path, data: Path, output_dir: Path, kind: str = "text") -> Path:
    """finetune.py for two steps with conditioning `kind` (embedding: an (8, 16) embeddings file beside it)."""
    flags = ["--conditioning", kind]
    if kind == "embedding":
        embeddings = write_embeddings(data, output_dir.parent / f"{output_dir.name}.safetensors")
        flags += ["--embeddings_file", str(embeddings)]
    args = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir",
            str(output_dir), "--latent_cache_dir", str(output_dir.parent / "cache"), "--max_train_steps", "2",
            "--train_batch_size", "2", "--max_train_samples", "4", "--report_to", "none", "--learning_rate", "1e-3",
            "--seed", "0", *flags]
    finetune.main(finetune.parse_args(args))
    return output_dir


def random_controlnet(unet, seed: int = 0):
    """A ControlNet copied from `unet` with its zero layers made small and random, so the control image changes
    the output (as training would make them)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    zero_layers = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                   controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for layer in zero_layers:
            layer.weight.normal_(0.0, 0.3)
            layer.bias.normal_(0.0, 0.3)
    return controlnet


def add_controlnet(model_dir: Path, edge_method: str = "mask_boundary", seed: int = 0) -> Path:
    """`random_controlnet` of the run's UNet, saved as train_controlnet.py saves one."""
    from medaug.pipelines import MedaugPipeline
    from medaug.run_record import read_run_record, write_run_record

    unet = MedaugPipeline.from_medaug(model_dir).unet  # the LoRA fused in, as train_controlnet.py copies the UNet
    random_controlnet(unet, seed).save_pretrained(model_dir / "controlnet", safe_serialization=True)
    record = read_run_record(model_dir)
    record.controlnet, record.edge_method, record.script = True, edge_method, "train_controlnet"
    write_run_record(model_dir, record)
    return model_dir


@pytest.fixture(scope="session")
def model_folder(tiny_model_dir, phantom_dir, tmp_path_factory):
    """`model_folder(kind, controlnet=False)`: an output folder trained on the phantom set, made once per session
    (import this fixture into a test module to use it)."""
    import shutil

    made: dict[tuple[str, bool], Path] = {}
    root = tmp_path_factory.mktemp("model_folders")

    def make(kind: str = "text", controlnet: bool = False) -> Path:
        key = (kind, controlnet)
        if key not in made:
            if controlnet:
                made[key] = root / f"{kind}-controlnet"
                shutil.copytree(make(kind), made[key])
                add_controlnet(made[key])
            else:
                made[key] = finetuned_folder(tiny_model_dir, phantom_dir, root / kind, kind)
        return made[key]

    return make
