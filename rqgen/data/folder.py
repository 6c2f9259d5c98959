"""A folder of image files as a dataset, with class labels taken from subfolder names."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from rqgen.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Everything PIL raises for a bad file (its plugins raise these, and Image.open the bomb
# error); other exceptions are bugs and should surface.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError,
                  TypeError, KeyError, Image.DecompressionBombError)  # fmt: skip

# Larger images are skipped before they are decoded (a 12000×10000 PNG would take a minute
# per load and gigabytes of memory): RQGEN_MAX_PIXELS raises or lowers the cap.
DEFAULT_MAX_PIXELS = 64_000_000


def max_pixels() -> int:
    value = os.environ.get("RQGEN_MAX_PIXELS", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_PIXELS


class UnreadableImageWarning(UserWarning):
    """Some image files could not be read and were skipped."""


class TooLargeImage(ValueError):
    """An image above the pixel cap, refused from its header alone."""


def open_image(path: str | Path) -> Image.Image:
    """Image.open with the pixel cap checked from the header, before any decoding; PIL's own
    bomb warning is ours to report."""
    limit = max_pixels()
    cap = f"the {limit / 1e6:.0f} MP cap (resize it, or raise RQGEN_MAX_PIXELS)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:  # PIL's own limit, far above ours
            pil_limit = 2 * Image.MAX_IMAGE_PIXELS / 1e6
            raise TooLargeImage(f"its header claims over {pil_limit:.0f} MP, above {cap}") from None
    w, h = img.size
    if w * h > limit:
        img.close()
        raise TooLargeImage(f"{w}×{h} = {w * h / 1e6:.0f} MP is above {cap}")
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey (I;16*, I) and float (F) images -> 8-bit L, scaled: PIL's own
    conversion clips every value above 255 to white."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0  # [0, 1] or [0, 255] data
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        top = 65535.0  # 16-bit samples (PNG stores grey 16-bit, opened as I;16 or I)
    else:
        top = 255.0
    arr = np.nan_to_num(arr / top * 255.0, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: high bit depths scaled to 8 bits, CMYK / palette / 1-bit
    through PIL, and transparent pixels white rather than their hidden (often black) colour."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_bit_depth_to_l(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def why_unreadable(path: Path) -> str | None:
    """None when the header and the file structure check out, else the reason."""
    try:
        with open_image(path) as img:
            img.verify()
        return None
    except DECODE_ERRORS as err:
        return str(err) or type(err).__name__


def _scan(root: Path) -> list[Path]:
    """All image files under root, sorted; hidden files and folders (e.g. macOS `._x.jpg`
    resource forks) are ignored because they are never real images."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return sorted(found)


class ImageFolder(Dataset):
    """Images found recursively under `root`, returned as `(image, label)`.

    Labels come from the first-level subfolder names (sorted -> 0..C-1); images directly in
    `root`, or every image when `labels=False`, get label -1. Training crops are random with
    a random horizontal flip, evaluation crops are centred.
    """

    def __init__(self, root: str | Path, resolution: int, train: bool = True, labels: bool = True):
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.train = train
        if not self.root.exists():
            raise DataError(
                f"data folder '{self.root}' does not exist: check the --data path "
                "(or use bundled:photos / bundled:digits)"
            )
        if not self.root.is_dir():
            raise DataError(f"'{self.root}' is a file, not a folder: point --data at a folder")

        self.paths: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []  # (file, why)
        for path in _scan(self.root):
            why = why_unreadable(path)
            if why is None:
                self.paths.append(path)
            else:
                self.skipped.append((path, why))
        if not self.paths:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise DataError(
                f"no readable images in '{self.root}' (looked for {exts} recursively): "
                "point --data at a folder of images"
            )

        # Only subfolders that actually hold images become classes, so no id is empty.
        subdirs = sorted(
            {p.relative_to(self.root).parts[0] for p in self.paths if p.parent != self.root}
        )
        self.classes: list[str] = subdirs if labels else []
        class_id = {name: i for i, name in enumerate(self.classes)}
        self.labels: list[int] = [
            class_id.get(p.relative_to(self.root).parts[0], -1) if p.parent != self.root else -1
            for p in self.paths
        ]

        # One line that callers can also write to their own log (see `warning`).
        self.warning: str | None = None
        if self.skipped:
            path, why = self.skipped[0]
            self.warning = (
                f"skipped {len(self.skipped)} unreadable image(s) under {self.root} "
                f"(e.g. {path}: {why})"
            )
            warnings.warn(self.warning, UnreadableImageWarning, stacklevel=2)
        self._warned_decode = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.paths)
        if not -n <= index < n:  # the fallback below wraps around, so check bounds first
            raise IndexError(f"index {index} out of range for {n} images")
        # A file can pass the header check and still fail to decode (e.g. truncated);
        # rather than kill a long training run, fall through to the next image.
        for offset in range(n):
            i = (index + offset) % n
            try:
                return self._load(self.paths[i]), self.labels[i]
            except DECODE_ERRORS as err:
                if not self._warned_decode:
                    self._warned_decode = True
                    warnings.warn(
                        f"could not decode {self.paths[i]} ({err}); using the next image "
                        "instead (further decode errors are not reported)",
                        UnreadableImageWarning,
                        stacklevel=2,
                    )
        raise DataError(f"none of the images under '{self.root}' could be decoded")

    def _load(self, path: Path) -> torch.Tensor:
        return load_image(path, self.resolution, random_crop=self.train)


def load_image(path: str | Path, resolution: int, random_crop: bool = False) -> torch.Tensor:
    """One image file -> (3, R, R) in [-1, 1]: short side resized to R, then cropped
    (centred, or random with a random flip)."""
    return crop(decode_resized(path, resolution), resolution, random_crop)


def decode_resized(path: str | Path, short_side: int) -> Image.Image:
    """Decode an image file to RGB with its short side resized to `short_side` (bicubic),
    its aspect kept: what `rqgen prepare` stores and every crop starts from."""
    r = short_side
    with open_image(path) as img:
        # Let the JPEG decoder downscale by 2/4/8 when that still leaves >= r pixels:
        # it makes big photos several times cheaper to load.
        short = min(img.size)
        if short > r:
            img.draft("RGB", (img.size[0] * r // short + 1, img.size[1] * r // short + 1))
        img = to_rgb(ImageOps.exif_transpose(img))
    w, h = img.size
    scale = r / min(w, h)
    size = (max(r, round(w * scale)), max(r, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def crop(img: Image.Image, resolution: int, random_crop: bool = False) -> torch.Tensor:
    """An RGB image whose short side is `resolution` -> (3, R, R) in [-1, 1]: the centre
    square, or a random one with a random horizontal flip."""
    r, (w, h) = resolution, img.size
    # torch's global RNG (not numpy's): DataLoader seeds it differently in every worker.
    if random_crop:
        x = int(torch.randint(0, w - r + 1, ()).item())
        y = int(torch.randint(0, h - r + 1, ()).item())
    else:
        x, y = (w - r) // 2, (h - r) // 2
    img = img.crop((x, y, x + r, y + r))
    if random_crop and torch.rand(()).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)
