"""The ADM evaluation suite's file formats (openai/guided-diffusion `evaluations/`), read and
written here so that its evaluator scores rqgen's samples unchanged and rqgen reads its
reference batches (e.g. VIRTUAL_imagenet256_labeled.npz):

    arr_0       uint8 (N, H, W, 3) images (NHWC, RGB)
    arr_1       int64 (N,) class labels (sample batches of class-conditional models)
    mu, sigma   pool_3 statistics (2048, 2048 × 2048), optional in a reference batch
    mu_s, sigma_s  spatial statistics of mixed_6/conv's first 7 channels (17·17·7 = 2023)

Images stream in batches, both ways: a 50,000-image batch at 256 px is 9.8 GB, so neither
side holds it in memory. The resize chains of the protocols live here too: `adm`
(guided-diffusion's center_crop_arr) and `official` (the RQ code's Resize + CenterCrop).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rqgen.errors import DataError
from rqgen.utils.files import atomic_write

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class AdmBatch:
    """What an ADM .npz holds: the image array's shape (read lazily) and any statistics."""

    path: Path
    shape: tuple[int, ...] | None  # arr_0's, or None when the file has statistics only
    labels: np.ndarray | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """arr_0 in (b, H, W, 3) uint8 batches, read from the zip member as a stream."""
        if self.shape is None:
            raise DataError(f"{self.path} holds statistics only (no arr_0 images)")
        with open(self.path, "rb") as f, zipfile.ZipFile(f) as z, z.open("arr_0.npy") as a:
            _header(a)
            row = int(np.prod(self.shape[1:]))
            for start in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - start)
                data = a.read(n * row)
                if len(data) != n * row:
                    raise DataError(f"{self.path}: arr_0 ends early (truncated file?)")
                yield np.frombuffer(data, np.uint8).reshape(n, *self.shape[1:])


def _header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"npy format version {version} (1.0 or 2.0 expected)")


def is_adm_batch(path: str | Path) -> bool:
    """An .npz in ADM's layout (arr_0 images, or mu/sigma + mu_s/sigma_s), not rqgen's own
    statistics file (which names its evaluator)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {Path(n).stem for n in z.namelist()}
    except (OSError, zipfile.BadZipFile):
        return False
    return "evaluator" not in names and ("arr_0" in names or {"mu", "mu_s"} <= names)


def read_batch(path: str | Path) -> AdmBatch:
    """The layout of an ADM batch, its labels and statistics; a file that is not one is a
    one-line error saying what it lacks."""
    path = Path(path)
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            names = {Path(n).stem: n for n in z.namelist()}
            shape = None
            if "arr_0" in names:
                with z.open(names["arr_0"]) as a:
                    shape, fortran, dtype = _header(a)
                if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                    raise DataError(
                        f"{path}: arr_0 is {dtype} {shape}; an ADM batch holds uint8 "
                        "(N, H, W, 3) images"
                    )
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            stats = {k: npz[k] for k in STATS_KEYS if k in npz.files}
            labels = npz["arr_1"] if shape is not None and "arr_1" in npz.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz batch ({e})") from e
    if shape is None and not {"mu", "sigma", "mu_s", "sigma_s"} <= set(stats):
        raise DataError(f"{path} has neither arr_0 images nor mu/sigma/mu_s/sigma_s statistics")
    return AdmBatch(path, tuple(shape) if shape else None, labels, stats)


def write_batch(
    path: str | Path, images: Iterable[np.ndarray], n: int, size: int, labels=None
) -> Path:
    """Stream `n` uint8 (b, size, size, 3) image batches into an ADM sample batch (arr_0,
    plus arr_1 when `labels` are given), written atomically."""
    path, shape = Path(path), (n, size, size, 3)

    def write(tmp) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as a:
                header = {"descr": "|u1", "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(a, header)
                written = 0
                for batch in images:
                    batch = np.ascontiguousarray(batch, dtype=np.uint8)
                    if batch.shape[1:] != shape[1:]:
                        raise DataError(
                            f"image batch of shape {batch.shape}, not (b, *{shape[1:]})"
                        )
                    a.write(batch.tobytes())
                    written += len(batch)
                if written != n:
                    raise DataError(f"{written} images written to {path}, expected {n}")
            if labels is not None:
                with z.open("arr_1.npy", "w") as a:
                    np.lib.format.write_array(a, np.asarray(labels, dtype=np.int64))

    atomic_write(path, write, needed_bytes=n * size * size * 3)
    return path


def from_uint8_nhwc(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1], which utils.images.to_uint8 (the PNG
    writer's rounding) maps back exactly."""
    return torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's reference preprocessing: halve with a box filter while the short
    side is at least 2·size, bicubic to a short side of `size`, centre crop."""
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The official RQ code's Resize(size) + CenterCrop(size) on a PIL image (torchvision:
    bilinear, which PIL antialiases; the centre offset rounded)."""
    img = img.convert("RGB")
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    arr = np.asarray(img.resize(new, Image.Resampling.BILINEAR))
    y = int(round((arr.shape[0] - size) / 2.0))
    x = int(round((arr.shape[1] - size) / 2.0))
    return arr[y : y + size, x : x + size]


RESIZE_CHAINS = {"adm": center_crop_arr, "official": resize_center_crop}
