"""Datasets yielding (image, label): image is float32 (3, R, R) RGB in [-1, 1]."""

from rqgen.data.bundled import BundledDigits, BundledPhotos
from rqgen.data.folder import IMAGE_EXTENSIONS, ImageFolder, load_image
from rqgen.data.source import build_dataset, describe

__all__ = [
    "IMAGE_EXTENSIONS",
    "BundledDigits",
    "BundledPhotos",
    "ImageFolder",
    "build_dataset",
    "describe",
    "load_image",
]
