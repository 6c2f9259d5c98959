"""Prepared data: a folder of images decoded once, resized, and stored as one memory-mapped
uint8 array, so that a training step never decodes a 5120×2880 JPEG to use 32×32 of it.

Layout of a prepared directory (written by `rqgen prepare`, or by training on first use of a
folder of large images):

    manifest.json   format, version, the short side, counts, class names, source, and the
                    source files with their sizes and mtimes (which also key the cache)
    pixels.u8       every image's pixels, (h, w, 3) uint8 row-major, back to back
    index.npy       (N, 3) int64: byte offset, height, width of each image
    labels.npy      (N,) int64 class ids (-1: none)
    captions.json   sidecar captions (`IMAGE.txt`), null where an image has none

Images keep their aspect with the short side at the prepared resolution; crops (random with
a flip for training, centred for evaluation) are taken at load time, as from the folder.
The manifest is written last and the directory renamed into place, so a half-written
preparation is never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from rqgen.data.folder import (
    DECODE_ERRORS,
    ImageFolder,
    UnreadableImageWarning,
    _scan,
    crop,
    decode_resized,
    open_image,
    resize_short_side,
)
from rqgen.errors import DataError
from rqgen.utils.device import available_cores
from rqgen.utils.files import umask_mode
from rqgen.utils.paths import cache_dir

FORMAT, VERSION, MANIFEST = "rqgen-prepared", 1, "manifest.json"
# a folder whose images have a short side this many times the resolution or more is
# prepared on first use: decoding it at every step costs seconds per step
LARGE_FACTOR = 4


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _decode(job: tuple[str, int]) -> np.ndarray | str:
    path, short_side = job
    try:
        return np.asarray(decode_resized(path, short_side), dtype=np.uint8)
    except DECODE_ERRORS as e:
        return str(e) or type(e).__name__


def _file_list(paths: list[Path], root: Path) -> list[list]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def prepare(
    src: str | Path,
    out: str | Path,
    resolution: int,
    workers: int | None = None,
    quiet: bool = False,
) -> Path:
    """Decode every image under `src` once, short side resized to `resolution`, into the
    prepared directory `out` (replaced atomically if it exists). Returns `out`."""
    folder = ImageFolder(src, resolution, train=False, labels=True)
    out = Path(out)
    if out.exists() and not is_prepared(out) and any(out.iterdir()):
        raise DataError(f"--out {out} exists and is not prepared data: choose a new directory")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(folder, tmp, resolution, workers, quiet)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(
    folder: ImageFolder, tmp: Path, resolution: int, workers: int | None, quiet: bool
) -> None:

    jobs = [(str(p), resolution) for p in folder.paths]
    workers = workers or max(1, available_cores())
    index, kept, skipped = [], [], []
    offset = 0
    with open(tmp / "pixels.u8", "wb") as pixels, ProcessPoolExecutor(workers) as pool:
        results = pool.map(_decode, jobs, chunksize=8) if workers > 1 else map(_decode, jobs)
        bar = tqdm(results, total=len(jobs), desc="prepare", disable=quiet, dynamic_ncols=True)
        for i, arr in enumerate(bar):
            if isinstance(arr, str):
                skipped.append((folder.paths[i], arr))
                continue
            pixels.write(arr.tobytes())
            index.append((offset, arr.shape[0], arr.shape[1]))
            offset += arr.nbytes
            kept.append(i)
    if not kept:
        raise DataError(f"none of the images under '{folder.root}' could be decoded")
    if skipped:
        first, why = skipped[0]
        warnings.warn(
            f"skipped {len(skipped)} image(s) that failed to decode (e.g. {first}: {why})",
            UnreadableImageWarning,
            stacklevel=3,
        )
    paths = [folder.paths[i] for i in kept]
    np.save(tmp / "index.npy", np.asarray(index, dtype=np.int64))
    np.save(tmp / "labels.npy", np.asarray([folder.labels[i] for i in kept], dtype=np.int64))
    captions = [
        p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else None
        for p in paths
    ]
    (tmp / "captions.json").write_text(json.dumps(captions))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "resolution": resolution,
        "count": len(kept),
        "classes": folder.classes,
        "source": str(folder.root.resolve()),
        "files": _file_list(paths, folder.root),
        "skipped": len(folder.skipped) + len(skipped),
        "bytes": offset,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    for f in tmp.iterdir():
        f.chmod(umask_mode())


class PreparedImages(Dataset):
    """A prepared directory as `(image, label)`, the same crops as `ImageFolder`. The pixel
    file is memory-mapped in each process on first use (DataLoader workers included), so
    memory does not grow with the dataset."""

    def __init__(self, root: str | Path, resolution: int, train: bool = True, labels: bool = True):
        self.root = Path(root)
        try:
            m = json.loads((self.root / MANIFEST).read_text())
            if m.get("format") != FORMAT:
                raise ValueError(f"format {m.get('format')!r}")
            self.index = np.load(self.root / "index.npy")
            label_ids = np.load(self.root / "labels.npy")
            captions = json.loads((self.root / "captions.json").read_text())
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"'{self.root}' is not readable prepared data ({e}): run rqgen prepare again"
            ) from e
        if m["resolution"] < resolution:
            raise DataError(
                f"'{self.root}' was prepared at {m['resolution']} px and this model needs "
                f"{resolution}: run rqgen prepare again with --resolution {resolution}"
            )
        self.resolution, self.stored, self.train = int(resolution), m["resolution"], train
        self.classes: list[str] = list(m["classes"]) if labels else []
        self.labels = label_ids.tolist() if labels else [-1] * len(label_ids)
        self.source_root = Path(m["source"])
        self.paths = [self.source_root / f[0] for f in m["files"]]  # for caption manifests
        self.sidecar_captions: list[str | None] = captions
        self.manifest = m
        self._pixels: np.memmap | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> Image.Image:
        if self._pixels is None:
            self._pixels = np.memmap(self.root / "pixels.u8", dtype=np.uint8, mode="r")
        offset, h, w = (int(v) for v in self.index[i])
        img = Image.fromarray(
            np.asarray(self._pixels[offset : offset + h * w * 3]).reshape(h, w, 3)
        )
        if self.stored != self.resolution:  # prepared larger than needed: resize once more
            img = resize_short_side(img, self.resolution)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return crop(self.image(i), self.resolution, random_crop=self.train), self.labels[i]


def large_images(root: Path, resolution: int, look: int = 16) -> int | None:
    """The median short side of up to `look` images spread over the folder (headers only),
    when it is LARGE_FACTOR or more times `resolution`; else None."""
    files = _scan(root)
    if not files:
        return None
    sample = files[:: max(1, len(files) // look)][:look]
    sides = []
    for p in sample:
        try:
            with open_image(p) as img:
                sides.append(min(img.size))
        except DECODE_ERRORS:
            continue
    if not sides:
        return None
    median = int(np.median(sides))
    return median if median >= LARGE_FACTOR * resolution else None


def prepared_copy(root: Path, resolution: int) -> Path | None:
    """The cached prepared copy of a folder of large images (made on first use), or None:
    not a folder, images small enough to decode at every step, or RQGEN_AUTO_PREPARE=0."""
    if os.environ.get("RQGEN_AUTO_PREPARE", "1") == "0" or not root.is_dir():
        return None
    return cached_preparation(root, resolution) if large_images(root, resolution) else None


def cached_preparation(root: Path, resolution: int, quiet: bool = False) -> Path:
    """The prepared copy of `root` at `resolution` in the cache, made on first use; keyed by
    the folder, its files' sizes and mtimes, and the resolution, so a changed folder is
    prepared again. Concurrent processes (torchrun ranks) wait on a lock for the first."""

    root = root.resolve()
    files = _file_list(_scan(root), root)
    key = hashlib.sha256(json.dumps([str(root), resolution, files]).encode()).hexdigest()[:16]
    out = cache_dir() / "prepared" / f"{root.name}-{resolution}px-{key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks wait here for the first
        if not is_prepared(out):
            side = large_images(root, resolution)
            print(
                f"rqgen: the images under {root} have a short side of ~{side} px for "
                f"{resolution} px training: decoding them once into {out} (rqgen prepare "
                "does this ahead of time)",
                file=sys.stderr,
            )
            prepare(root, out, resolution, quiet=quiet)
    return out
