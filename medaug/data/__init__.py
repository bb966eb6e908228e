"""Reading, checking and serving dataset folders (see DESIGN.md, "Dataset folder")."""

from medaug.data.dataset import FIT_MODES, MedicalImageDataset, fit_square
from medaug.data.folder import SPLITS, DatasetError, DatasetFolder, Problem, ScanResult, read_metadata
from medaug.data.manifest import MANIFEST_NAME, ManifestEntry, append_manifest, read_manifest
from medaug.data.loading import ImageReadError, load_image, load_mask, read_array, rescale_to_unit, to_channels
from medaug.data.phantom import make_phantom_dataset
from medaug.data.summary import summarize

__all__ = [
    "FIT_MODES",
    "MANIFEST_NAME",
    "ManifestEntry",
    "append_manifest",
    "read_manifest",
    "SPLITS",
    "DatasetError",
    "DatasetFolder",
    "ImageReadError",
    "MedicalImageDataset",
    "Problem",
    "ScanResult",
    "fit_square",
    "load_image",
    "load_mask",
    "make_phantom_dataset",
    "read_array",
    "read_metadata",
    "rescale_to_unit",
    "summarize",
    "to_channels",
]
