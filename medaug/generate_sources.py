"""Where `medaug generate` takes structure and conditions from: the sources of a run, checked up front.

A source is one row of a dataset folder (or one edge map of a plain folder, or just the prompt): it gives the
ControlNet's edge map, the condition (prompt, reference image or embedding key) and the mask the generated
images carry. Edge maps are made by `medaug.edges.row_control_image`, the function ControlNet training uses,
so generation sees edges exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from medaug.data import DatasetError, DatasetFolder
from medaug.data.folder import is_dataset_folder

EDGE_COLUMN = "conditioning_image_file_name"


@dataclass
class Source:
    file_name: str  # the row's file_name, an edge map's name in a plain folder, or "" (a prompt alone)
    split: str  # the row's split ("" where there are no rows)
    condition: object  # the value the pipeline takes for it (a prompt, a reference image's path, an embedding)
    row: int | None = None
    folder: DatasetFolder | None = None
    text: str = ""
    label: str = ""
    mask_path: Path | None = None
    edge_method: str | None = None  # None: a precomputed edge map (EDGE_COLUMN, or edge_file)
    edge_file: Path | None = None

    @cached_property
    def image_sha256(self) -> str:
        """The hash of the source row's image file ("" where there is no row), so a study can recognise a test
        image by its bytes whatever its name or split are spelled as; read once however many images it gives."""
        from medaug.data.manifest import file_sha256

        if self.folder is None or self.row is None:
            return ""
        path = self.folder.path(self.row, "file_name")
        return file_sha256(path) if path is not None and path.is_file() else ""

    def control_image(self, resolution: int, fit: str) -> np.ndarray:
        """(R, R, 3) float32 edge map in [0, 1]."""
        from medaug.data import load_image
        from medaug.edges import row_control_image, to_control_image

        if self.edge_file is not None:
            return to_control_image(load_image(self.edge_file, 1)[:, :, 0])
        return row_control_image(self.folder, self.row, resolution, fit, self.edge_method, EDGE_COLUMN)

    def fitted_mask(self, resolution: int, fit: str) -> np.ndarray:
        """The row's mask fitted to the square as its image is (nearest neighbour), boolean (R, R)."""
        from medaug.data import fit_square, load_mask

        return fit_square(load_mask(self.mask_path, self.folder.slice_index(self.row)), resolution, fit, nearest=True)


def plan_sources(record, condition, model_dir: Path, flag: str | None, path, split: str, resolution: int,
                 max_sources: int | None, prompt: str | None) -> tuple[list[Source], str | None]:
    """The sources of a run and the edge method used for them ("precomputed" for given edge maps, None
    without a ControlNet); raises ValueError naming the flag, file or column at fault."""
    kind, controlnet = record.conditioning, record.controlnet
    if flag is None:
        if controlnet:
            raise ValueError(f"{model_dir} has a ControlNet: give --edges, --from_masks or --from_images for its "
                             "edge maps")
        if prompt is None:
            raise ValueError(f"give --prompt, or --from_masks/--from_images whose rows hold the {kind} conditions")
        return [Source(file_name="", split="", condition=prompt)], None
    path = Path(path)
    if flag == "--edges" and not controlnet:
        raise ValueError(f"--edges: {model_dir} has no controlnet/, so edge maps cannot steer it; give a "
                         "train_controlnet.py output folder, or --from_masks/--from_images for conditions only")
    if flag == "--edges" and not is_dataset_folder(path):
        return _plain_edge_sources(path, kind, resolution, max_sources, prompt), "precomputed"
    try:
        folder = DatasetFolder(path)
        rows = folder.indices(split)[:max_sources]
    except DatasetError as error:
        raise ValueError(f"{flag} {error}") from error
    method = _edge_method(record.edge_method, flag, controlnet)
    needs = {"--from_masks": "mask_file_name", "--edges": EDGE_COLUMN}.get(flag)
    if method == "fused":
        needs = "mask_file_name"
    if needs:
        _require_column(folder, rows, needs, flag)
    try:
        folder.check(split, rows=rows)
        values = [prompt] * len(rows) if prompt is not None else condition.row_values(folder, rows)
    except ValueError as error:  # DatasetError and EmbeddingError are ValueErrors
        raise ValueError(f"{flag} {error}") from error
    carry_masks = flag == "--from_masks" or folder.has_column("mask_file_name")
    sources = [Source(file_name=folder.value(i, "file_name"), split=folder.split(i), condition=value, row=i,
                      folder=folder, text=folder.value(i, "text"), label=folder.value(i, "label"),
                      mask_path=folder.path(i, "mask_file_name") if carry_masks else None,
                      edge_method=None if method == "precomputed" else method) for i, value in zip(rows, values)]
    return sources, method


def _edge_method(method: str | None, flag: str, controlnet: bool) -> str | None:
    """How a source's edge maps are made: the model's --edge_method where it fits the source."""
    from medaug.edges import MASK_METHODS

    if not controlnet:
        return None
    if flag == "--edges":
        return "precomputed"
    if flag == "--from_masks":
        return method if method in MASK_METHODS else "mask_boundary"
    if method == "mask_boundary":
        raise ValueError("--from_images: the model's edge maps are mask boundaries (edge_method mask_boundary), "
                         "which images do not give; use --from_masks")
    return method or "canny"


def _require_column(folder: DatasetFolder, rows: list[int], column: str, flag: str) -> None:
    try:
        folder.require_filled(column, rows, f"the column is missing; {flag} needs it",
                              f"{flag} needs this row's {column}; it is empty")
    except DatasetError as error:
        raise ValueError(f"{flag} {error}") from error


def _plain_edge_sources(path: Path, kind: str, resolution: int, max_sources: int | None,
                        prompt: str | None) -> list[Source]:
    """A folder of edge images without metadata: each must already be resolution x resolution."""
    from medaug.data.loading import RASTER_SUFFIXES, ImageReadError, image_size

    if not path.is_dir():
        raise ValueError(f"--edges: {path} is not a folder")
    files = sorted(file for file in path.iterdir()
                   if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in RASTER_SUFFIXES)
    if not files:
        raise ValueError(f"--edges: {path} has no metadata.csv and no edge images ({', '.join(RASTER_SUFFIXES)})")
    if prompt is None:
        raise ValueError(f"--prompt: required with --edges {path}, a plain folder of edge maps with no rows to take "
                         f"{kind} conditions from (or give a dataset folder with metadata.csv)")
    files = files[:max_sources]
    for file in files:
        try:
            height, width = image_size(file)
        except ImageReadError as error:
            raise ValueError(f"--edges: {error}") from error
        if (height, width) != (resolution, resolution):
            raise ValueError(f"--edges: {file}: size {width}x{height} differs from the output size "
                             f"{resolution}x{resolution} (--resolution); edge maps of a plain folder must be at "
                             "the output size")
    return [Source(file_name=file.name, split="", condition=prompt, edge_file=file) for file in files]


# ---------------------------------------------------------------------------------------------------------
# GAN and autoencoder runs: images drawn from noise, for a class or a mask where trained so
# ---------------------------------------------------------------------------------------------------------

GENERATOR_FAMILIES = ("gan", "autoencoder")


def own_training_source(record, model_dir: Path) -> dict[str, str]:
    """The source of a GAN or autoencoder run given none: its own training rows (the record's train_data_dir), as
    if named by --from_images; {} for other runs. A mask-conditioned run needs --from_masks, named."""
    if record.generator not in GENERATOR_FAMILIES:
        return {}
    if record.generator_condition == "mask":
        raise ValueError(f"--from_masks: {model_dir} draws each image for a mask (--condition mask); give "
                         "--from_masks DATASET_DIR with the masks to draw for")
    if not record.train_data_dir or not Path(record.train_data_dir).is_dir():
        raise ValueError(f"--from_images: {model_dir} was trained on {record.train_data_dir}, which is not there; "
                         "give --from_images DATASET_DIR, whose rows name the sources")
    return {"--from_images": record.train_data_dir}


def generator_sources(record, model_dir: Path, flag: str | None, sources: list[Source]) -> list[Source]:
    """What a GAN or autoencoder's images carry from their source rows (other runs' sources are returned as they
    are): the mask only where the image was drawn for it (--condition mask); the label where it was drawn for it
    (class) or for the mask; an unconditional image shows nothing of its row, which only names its provenance, so
    it carries no mask, label or text."""
    if record.generator not in GENERATOR_FAMILIES:
        return sources
    condition = record.generator_condition
    if flag == "--from_masks" and condition != "mask":
        raise ValueError(f"--from_masks: {model_dir} (a {record.generator} with --condition {condition}) does not "
                         "draw images for masks, and its images would carry masks they do not show; use "
                         "--from_images")
    if condition == "class":
        _check_labels(record, model_dir, flag, sources)
    for source in sources:
        if condition != "mask":
            source.mask_path = None
        if condition == "none":
            source.label = source.text = ""
    return sources


def _check_labels(record, model_dir: Path, flag: str | None, sources: list[Source]) -> None:
    """Every source row's `label` is one of the classes the run learned."""
    for source in sources:
        if source.label not in record.class_names:
            folder = source.folder
            where = f"{folder.metadata_path} {folder.describe_row(source.row)}" if folder is not None else "a source"
            raise ValueError(f"{flag} {where}, column 'label': '{source.label}' is not a class of {model_dir} "
                             f"({', '.join(record.class_names)}); a class-conditioned {record.generator} draws each "
                             "image for its source row's label")
