"""Quality metrics for synthetic images: features, distances, diversity, memorisation, PCA (`medaug evaluate`)."""

from medaug.metrics.distances import (
    feature_statistics,
    frechet_distance,
    frechet_from_statistics,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
    prdc,
)
from medaug.metrics.features import EXTRACTORS, Extractor, ExtractorError, build_extractor, extract_features
from medaug.metrics.imagesets import ImageSet, ImageSetError, open_image_set
from medaug.metrics.memorisation import memorisation_audit, thumbnail_vectors

__all__ = [
    "EXTRACTORS",
    "Extractor",
    "ExtractorError",
    "ImageSet",
    "ImageSetError",
    "build_extractor",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_from_statistics",
    "kernel_inception_distance",
    "memorisation_audit",
    "mmd2_unbiased",
    "open_image_set",
    "polynomial_kernel",
    "prdc",
    "thumbnail_vectors",
]
