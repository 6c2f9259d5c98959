"""A folder of image files as a dataset, with class labels taken from subfolder names."""

from __future__ import annotations

import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from rqgen.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Everything PIL raises for a bad file (its plugins raise these, and Image.open the bomb
# error); other exceptions are bugs and should surface.
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    MemoryError,
    IndexError,
    TypeError,
    KeyError,
    Image.DecompressionBombError,
)

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


@dataclass
class Listing:
    """A folder's image files (paths relative to `root`) and class ids, made without opening
    any image: what a training run records (OUT/data_listing.json), so that every rank and
    every resume reads one list instead of walking, or opening, the folder again."""

    root: str
    files: list[str]
    labels: list[int]
    classes: list[str]

    @staticmethod
    def of(root: Path, labels: bool = True, paths: list[Path] | None = None) -> Listing:
        """Class ids from the first-level subfolders that hold images (sorted -> 0..C-1);
        images directly in `root`, or all of them when `labels=False`, get -1."""
        paths = _scan(root) if paths is None else paths
        top = [p.relative_to(root).parts[0] if p.parent != root else None for p in paths]
        classes = sorted({t for t in top if t is not None}) if labels else []
        ids = {name: i for i, name in enumerate(classes)}
        return Listing(
            str(root),
            [str(p.relative_to(root)) for p in paths],
            [ids.get(t, -1) for t in top],
            classes,
        )


class ImageFolder(Dataset):
    """Images found recursively under `root`, returned as `(image, label)`.

    Labels come from the first-level subfolder names (see `Listing`). Training crops are
    random with a random horizontal flip, evaluation crops are centred. With `verify` every
    file is checked first (evaluation: an unreadable file is left out, with one warning);
    without it (training, or a recorded `listing`) nothing is opened until it is loaded,
    and an unreadable file is replaced by the next image when it is: warned once, then
    counted (`failures`).
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        train: bool = True,
        labels: bool = True,
        listing: Listing | None = None,
        verify: bool = True,
    ):
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.train = train
        if listing is None:
            if not self.root.exists():
                raise DataError(
                    f"data folder '{self.root}' does not exist: check the --data path "
                    "(or use bundled:photos / bundled:digits)"
                )
            if not self.root.is_dir():
                raise DataError(f"'{self.root}' is a file, not a folder: point --data at a folder")
            listing = Listing.of(self.root, labels)

        self.skipped: list[tuple[Path, str]] = []  # (file, why)
        if verify:
            kept = []
            for rel in listing.files:
                why = why_unreadable(self.root / rel)
                if why is None:
                    kept.append(self.root / rel)
                else:
                    self.skipped.append((self.root / rel, why))
            listing = Listing.of(self.root, labels, kept)
        if not listing.files:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise DataError(
                f"no readable images in '{self.root}' (looked for {exts} recursively): "
                "point --data at a folder of images"
            )
        self.listing = listing
        self.paths: list[Path] = [self.root / rel for rel in listing.files]
        self.classes: list[str] = list(listing.classes)
        self.labels: list[int] = list(listing.labels)

        # One line that callers can also write to their own log (see `warning`).
        self.warning: str | None = None
        if self.skipped:
            path, why = self.skipped[0]
            self.warning = (
                f"skipped {len(self.skipped)} unreadable image(s) under {self.root} "
                f"(e.g. {path}: {why})"
            )
            warnings.warn(self.warning, UnreadableImageWarning, stacklevel=2)
        # shared with forked DataLoader workers, so the main process can log the count
        self.failures = multiprocessing.Value("i", 0)

    def __getstate__(self):  # a spawned worker cannot share the counter: it keeps its own
        state = dict(self.__dict__)
        state["failures"] = None
        return state

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.paths)
        if not -n <= index < n:  # the fallback below wraps around, so check bounds first
            raise IndexError(f"index {index} out of range for {n} images")
        # A file can fail to decode (truncated, not an image); rather than kill a long
        # training run, fall through to the next image.
        for offset in range(n):
            i = (index + offset) % n
            try:
                return self._load(self.paths[i]), self.labels[i]
            except DECODE_ERRORS as err:
                self._count_failure(self.paths[i], err)
        raise DataError(f"none of the images under '{self.root}' could be decoded")

    def _count_failure(self, path: Path, err: Exception) -> None:
        first = True
        if self.failures is not None:
            with self.failures.get_lock():
                self.failures.value += 1
                first = self.failures.value == 1
        if first:
            warnings.warn(
                f"skipped unreadable image {path} ({err}); using the next image instead "
                "(further ones are counted as skipped_images in metrics.jsonl)",
                UnreadableImageWarning,
                stacklevel=3,
            )

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
    return resize_short_side(img, r)


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """Bicubic resize to the given short side, the aspect kept."""
    r, (w, h) = short_side, img.size
    scale = r / min(w, h)
    size = (max(r, round(w * scale)), max(r, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def crop(
    img: Image.Image,
    resolution: int,
    random_crop: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An RGB image whose short side is `resolution` -> (3, R, R) in [-1, 1]: the centre
    square, or a random one with a random horizontal flip (drawn from `generator`)."""
    r, (w, h) = resolution, img.size
    # default: torch's global RNG (not numpy's): DataLoader seeds it differently per worker
    if random_crop:
        x = int(torch.randint(0, w - r + 1, (), generator=generator).item())
        y = int(torch.randint(0, h - r + 1, (), generator=generator).item())
    else:
        x, y = (w - r) // 2, (h - r) // 2
    img = img.crop((x, y, x + r, y + r))
    if random_crop and torch.rand((), generator=generator).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)
