"""Turn a `--data` string into a dataset: `bundled:NAME[:SPLIT]`, a folder path, prepared data
or WebDataset tar shards (`shards/train-{000..009}.tar`)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from rqgen.data.bundled import (
    TRAIN_COLOUR_PHOTOS,
    TRAIN_GRAY_PHOTOS,
    VAL_PHOTOS,
    BundledDigits,
    BundledPhotos,
)
from rqgen.data.folder import ImageFolder
from rqgen.data.prepared import PreparedImages, is_prepared, prepared_copy
from rqgen.data.shards import Shards, is_shards, shard_urls
from rqgen.errors import DataError

BUNDLED_NAMES = ("photos", "digits")
_PREFIX = "bundled:"


def _parse_bundled(src: str, split: str) -> tuple[str, str]:
    """'bundled:photos:val' -> ('photos', 'val'); an explicit suffix overrides `split`."""
    name, _, suffix = src[len(_PREFIX) :].partition(":")
    if name not in BUNDLED_NAMES:
        valid = ", ".join(_PREFIX + n for n in BUNDLED_NAMES)
        raise DataError(f"unknown bundled dataset '{src}': use one of {valid} (or a folder path)")
    return name, suffix or split


def build_dataset(
    src: str, resolution: int, split: str = "train", seed: int = 0, labels: bool = True
) -> Dataset:
    """Dataset of `(image, label)` for `src`; images are float32 (3, R, R) in [-1, 1]."""
    if not str(src).strip():  # Path("") is the working directory: never train on that by accident
        raise DataError("the data source is empty: give a folder of images or bundled:NAME")
    if is_shards(src):  # evaluation and extraction: every sample once, centre crops
        return Shards(src, resolution, seed=seed)
    if src.startswith(_PREFIX):
        name, split = _parse_bundled(src, split)
        if name == "photos":
            return BundledPhotos(resolution, split=split, seed=seed)
        return BundledDigits(resolution, split=split, seed=seed, labels=labels)
    # Any split other than "train" is evaluation: centre crops, no flips.
    train = split == "train"
    if is_prepared(src):
        return PreparedImages(src, resolution, train=train, labels=labels)
    prepared = prepared_copy(Path(src).expanduser(), resolution)  # decoded once, not per step
    if prepared is not None:
        return PreparedImages(prepared, resolution, train, labels)
    return ImageFolder(src, resolution, train=train, labels=labels)


def describe(src: str, split: str = "train") -> str:
    """Short human description of `src` for logs (does not scan or load anything)."""
    if is_shards(src):
        return f"{len(shard_urls(src))} WebDataset tar shard(s) {src}"
    if src.startswith(_PREFIX):
        name, split = _parse_bundled(src, split)
        if name == "digits":
            return f"bundled sklearn 8x8 digits ({split} split, 10 classes, white on black)"
        if split == "train":
            n_c, n_g = len(TRAIN_COLOUR_PHOTOS), len(TRAIN_GRAY_PHOTOS)
            return f"bundled photos (train: random crops of {n_c} colour + {n_g} gray photos)"
        return f"bundled photos (val: fixed crops of held-out {', '.join(VAL_PHOTOS)})"
    if is_prepared(src):
        return f"prepared data '{src}'"
    return f"image folder '{src}'"
