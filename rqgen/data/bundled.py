"""Real images that ship inside scikit-image and scikit-learn, so rqgen can train and be
tested with no download: a few photos (random crops) and the 8x8 handwritten digits."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from rqgen.data.folder import to_tensor
from rqgen.errors import DataError

# Photos split by PHOTO, so validation crops come from scenes never seen in training.
# Every file here is inside the scikit-image / scikit-learn wheels; skimage photos that
# need `pooch` to download (eagle, lily, skin, kidney, brain, ...) are deliberately absent,
# as is skimage's `cat` (the same picture as `chelsea`).
TRAIN_COLOUR_PHOTOS = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "china",
)
TRAIN_GRAY_PHOTOS = ("camera", "coins", "moon", "grass", "gravel", "brick")
VAL_PHOTOS = ("chelsea", "coffee", "flower")  # all colour

# Share of training samples drawn from colour photos; within each group photos are picked
# uniformly (not by area), so a big grayscale texture cannot dominate.
COLOUR_FRACTION = 0.85
DEFAULT_TRAIN_LENGTH = 10_000
DEFAULT_VAL_LENGTH = 256
_VAL_SEED = 20240917  # fixed: the validation crops never change, whatever `seed` is
_SPLITS = ("train", "val")


@functools.cache
def _sklearn_photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    return {Path(path).stem: img for path, img in zip(sample.filenames, sample.images)}


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """One bundled photo as a read-only uint8 (H, W, 3) array, loaded once per process."""
    import skimage.data

    if name in ("china", "flower"):
        arr = _sklearn_photos()[name]
    elif name == "motorcycle":
        arr = skimage.data.stereo_motorcycle()[0]  # left view; the right one is near-identical
    else:
        arr = getattr(skimage.data, name)()
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = np.ascontiguousarray(arr[:, :, :3])
    arr.flags.writeable = False  # shared by every dataset in the process
    return arr


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise DataError(f"unknown split '{split}': use one of {', '.join(_SPLITS)}")


@dataclass(frozen=True)
class CropPlan:
    """Where one sample comes from: a square box (in photo pixels) and a flip."""

    photo: str
    box: tuple[float, float, float, float]
    flip: bool


class BundledPhotos(Dataset):
    """Random square crops, at random scale, of the photos bundled with skimage/sklearn.

    Each item's crop depends only on (seed, epoch, index), so runs are reproducible and
    `set_epoch` gives fresh crops. With persistent DataLoader workers, call `set_epoch`
    before the workers start or they keep the old epoch. The val split is a fixed set of
    crops of held-out photos. Labels are -1.
    """

    def __init__(
        self, resolution: int, split: str = "train", length: int | None = None, seed: int = 0
    ):
        _check_split(split)
        self.resolution = int(resolution)
        self.split = split
        self.seed = seed
        self.epoch = 0
        default = DEFAULT_TRAIN_LENGTH if split == "train" else DEFAULT_VAL_LENGTH
        self.length = default if length is None else int(length)
        if split == "train":
            self.colour_photos, self.gray_photos = TRAIN_COLOUR_PHOTOS, TRAIN_GRAY_PHOTOS
        else:
            self.colour_photos, self.gray_photos = VAL_PHOTOS, ()
        self.photos = self.colour_photos + self.gray_photos
        self.classes: list[str] = []
        for name in self.photos:  # load now so a broken install fails here, not in a worker
            load_photo(name)

    @property
    def num_classes(self) -> int:
        return 0

    def set_epoch(self, epoch: int) -> None:
        """Use a new set of training crops (no effect on the fixed val crops)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def plan(self, index: int) -> CropPlan:
        """The crop for `index`, without decoding anything (cheap; used by tests)."""
        if self.split == "train":
            rng = np.random.default_rng([self.seed, self.epoch, index])
            use_colour = rng.random() < COLOUR_FRACTION or not self.gray_photos
            group = self.colour_photos if use_colour else self.gray_photos
            name = group[rng.integers(len(group))]
        else:
            rng = np.random.default_rng([_VAL_SEED, index])
            name = self.photos[index % len(self.photos)]  # round-robin: balanced photos
        h, w = load_photo(name).shape[:2]
        r, short = self.resolution, min(h, w)
        # Target short side uniform in [2r, 8r], clamped to the photo (never upsample a
        # photo beyond its own size unless it is smaller than r itself).
        target = rng.uniform(min(2 * r, short), min(8 * r, short))
        side = short * r / max(target, r)  # crop side in photo pixels
        x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
        flip = self.split == "train" and bool(rng.random() < 0.5)
        return CropPlan(name, (x, y, x + side, y + side), flip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} crops")
        p = self.plan(index)
        r = self.resolution
        img = Image.fromarray(load_photo(p.photo))
        # Resizing just the box keeps PIL's antialiasing while skipping the rest of the photo.
        img = img.resize((r, r), Image.Resampling.BICUBIC, box=p.box)
        if p.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img), -1


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@functools.cache
def digit_split(seed: int = 0, val_fraction: float = 0.15) -> dict[str, np.ndarray]:
    """Sorted sklearn indices of each split; stratified, so every digit is ~15% val."""
    _, target = _digits()
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(target == c))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


class BundledDigits(Dataset):
    """scikit-learn's 1,797 handwritten 8x8 digits, smoothly upsampled to `resolution`.

    Drawn as a white digit on a black background (like MNIST): sklearn's value 16 (ink)
    maps to +1. Returns (image, digit 0..9), or label -1 when `labels=False`.
    """

    def __init__(
        self, resolution: int = 32, split: str = "train", seed: int = 0, labels: bool = True
    ):
        _check_split(split)
        self.resolution = int(resolution)
        self.split = split
        self.labels = labels
        self.indices = digit_split(seed)[split]
        self.classes: list[str] = [str(i) for i in range(10)] if labels else []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, target = _digits()
        i = int(self.indices[index])
        x = torch.from_numpy(images[i])[None, None]
        r = self.resolution
        # Bicubic overshoots a little at stroke edges, hence the clamp.
        x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False).clamp_(0, 1)
        image = x[0].expand(3, r, r).mul(2).sub(1).contiguous()
        return image, int(target[i]) if self.labels else -1
