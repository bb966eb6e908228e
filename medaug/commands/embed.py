"""`medaug embed`: write the embeddings file that finetune.py's `--embeddings_file` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, fail, progress_bar
from medaug.outputs import writable_folder


def embed_command(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder whose rows get embeddings.")],
    output: Annotated[Path, typer.Option("--output", help="Embeddings file to write (.safetensors).")],
    model_path: Annotated[Optional[Path], typer.Option(
        "--model_path", help="Local vision model folder to compute embeddings with: a base's image_encoder/, "
        "CLIP, DINOv2, a radiology encoder...")] = None,
    import_file: Annotated[Optional[Path], typer.Option(
        "--import_file", help="Precomputed embeddings (ELIXR, Path Foundation) as .parquet, .npz or .safetensors.")
    ] = None,
    key_column: Annotated[str, typer.Option(
        "--key_column", help="Key column of a parquet --import_file.")] = "file_name",
    value_column: Annotated[str, typer.Option("--value_column", help="Value column of a parquet file.")] = "embedding",
    match_column: Annotated[str, typer.Option(
        "--match_column", help="Metadata column whose values are the keys in --import_file.")] = "file_name",
    shape: Annotated[Optional[str], typer.Option(
        "--shape", help="Reshape flat imported embeddings, e.g. 32,768 for ELIXR.")] = None,
    tokens: Annotated[bool, typer.Option(
        "--tokens", help="Keep the model's token matrix (L, D) instead of one vector per image.")] = False,
    split: Annotated[Optional[str], typer.Option("--split", help="Only rows of this split.")] = None,
    batch_size: Annotated[int, typer.Option("--batch_size", min=1)] = 16,
) -> None:
    """Compute image embeddings with a local vision model, or import precomputed ones, keyed by file_name."""
    from medaug.data import DatasetError, DatasetFolder
    from medaug.embeddings import (EmbeddingError, import_embeddings, parse_shape, save_embeddings,
                                   written_by_medaug)

    if (model_path is None) == (import_file is None):
        fail("give exactly one of --model_path (compute) or --import_file (import)")
    if output.suffix != ".safetensors":
        fail(f"--output: {output} must end in .safetensors")
    writable_folder(output.parent, "--output")
    if output.exists() and not written_by_medaug(output):
        fail(f"--output: {output} exists and was not written by medaug embed; medaug replaces only its own output, "
             "so choose a new file name")
    try:
        folder = DatasetFolder(dataset_dir)
        rows = folder.indices(split)
        if import_file is not None:
            if not folder.has_column(match_column):
                fail(f"--match_column: column '{match_column}' not in {folder.metadata_path}")
            parsed_shape = tuple(parse_shape(shape)) if shape else None
            keys = {folder.value(i, "file_name"): folder.value(i, match_column) for i in rows}
            embeddings = import_embeddings(keys, import_file, key_column, value_column, parsed_shape)
        else:
            embeddings = _compute(folder, rows, model_path, tokens, batch_size)
    except (DatasetError, EmbeddingError) as error:
        fail(str(error))
    save_embeddings(output, embeddings)
    first = next(iter(embeddings.values()))
    console.print(f"wrote {len(embeddings)} embeddings of shape {tuple(first.shape)} to {output}")


def _compute(folder, rows, model_path, tokens, batch_size):
    from medaug.data import load_image
    from medaug.embeddings import embed_images, load_vision_model

    model, processor = load_vision_model(model_path)
    embeddings = {}
    with progress_bar("embedding") as progress:
        task = progress.add_task("rows", total=len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = [load_image(folder.path(i, "file_name"), 3, folder.slice_index(i)) for i in chunk]
            for i, vector in zip(chunk, embed_images(model, processor, images, tokens)):
                embeddings[folder.value(i, "file_name")] = vector
            progress.advance(task, len(chunk))
    return embeddings
