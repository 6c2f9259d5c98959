"""Behaviour of the datasets: image folders, bundled photos and digits, and the dispatcher."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rqgen.data import (
    IMAGE_EXTENSIONS,
    BundledDigits,
    BundledPhotos,
    ImageFolder,
    build_dataset,
    bundled,
    describe,
)
from rqgen.data.folder import UnreadableImageWarning
from rqgen.errors import DataError


def _save(path, size=(40, 24), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = (rng.random((size[1], size[0], 3)) * 60 + np.array(colour) * 0.7).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _check_image(x, r):
    assert x.shape == (3, r, r)
    assert x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.fixture
def tree(tmp_path):
    """root/{cats,dogs}/..., a nested subfolder, a root-level image and a non-image file."""
    _save(tmp_path / "dogs" / "d1.png", size=(30, 50))
    _save(tmp_path / "dogs" / "deeper" / "d2.JPG")  # nested + upper-case extension
    _save(tmp_path / "cats" / "c1.jpeg", mode="L")  # grayscale must come out RGB
    _save(tmp_path / "cats" / "c2.webp")
    _save(tmp_path / "cats" / "c3.bmp")
    _save(tmp_path / "loose.png", mode="RGBA")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    return tmp_path


def test_folder_recursive_scan_and_labels(tree):
    ds = ImageFolder(tree, 16)
    names = [p.name for p in ds.paths]
    assert names == ["c1.jpeg", "c2.webp", "c3.bmp", "d1.png", "d2.JPG", "loose.png"]
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert ds.labels == [0, 0, 0, 1, 1, -1]
    assert ds.skipped == []
    for i in range(len(ds)):
        x, y = ds[i]
        _check_image(x, 16)
        assert y == ds.labels[i]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_folder_without_labels_and_eval_crops_are_deterministic(tree):
    ds = ImageFolder(tree, 12, train=False, labels=False)
    assert ds.num_classes == 0 and all(ds[i][1] == -1 for i in range(len(ds)))
    assert torch.equal(ds[0][0], ds[0][0])
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def test_folder_corrupt_file_is_skipped_with_one_warning(tree):
    bad = tree / "dogs" / "broken.jpg"
    bad.write_bytes(os.urandom(300))
    with pytest.warns(UnreadableImageWarning, match=r"skipped 1 unreadable image\(s\)") as rec:
        ds = ImageFolder(tree, 16)
    assert len(rec) == 1 and "broken.jpg" in str(rec[0].message)
    assert [p for p, _ in ds.skipped] == [bad] and "\n" not in ds.warning
    assert len(ds) == 6
    _check_image(ds[0][0], 16)


def test_folder_decode_failure_falls_back_to_next_image(tree):
    ds = ImageFolder(tree, 16, train=False)
    ds.paths[0].write_bytes(b"\x89PNG garbage")  # breaks after the scan-time check
    with pytest.warns(UnreadableImageWarning, match="skipped unreadable image"):
        x, y = ds[0]
    expected, _ = ds[1]
    assert torch.equal(x, expected) and y == ds.labels[1]
    assert ds.failures.value == 1  # counted, for the training log (skipped_images)


def test_a_listing_opens_no_image_and_training_skips_unreadable_ones_when_loaded(tree):
    from unittest import mock

    from rqgen.data.folder import Listing

    (tree / "dogs" / "broken.jpg").write_bytes(b"not a jpeg")
    with mock.patch("PIL.Image.open", side_effect=AssertionError("opened")):
        listing = Listing.of(tree)
        ds = ImageFolder(tree, 16, listing=listing, verify=False)  # nothing opened
    assert len(ds) == 7 and ds.classes == ["cats", "dogs"]
    with pytest.warns(UnreadableImageWarning, match="broken.jpg"):
        images = [ds[i][0] for i in range(len(ds))]  # the broken one replaced by the next
    assert len(images) == 7 and ds.failures.value == 1


@pytest.mark.parametrize("case", ["empty", "missing", "all_bad"])
def test_folder_without_images_raises_one_line(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "all_bad":
        (root / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError) as err:
        ImageFolder(root, 16)
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg
    assert ("does not exist" if case == "missing" else "no readable images") in msg


def test_bundled_photos_shapes_and_split_disjoint():
    train, val = BundledPhotos(24, length=6), BundledPhotos(24, split="val", length=6)
    assert not set(train.photos) & set(val.photos)
    assert len(val.photos) == 3 and len(BundledPhotos(24, split="val")) == 256
    for ds in (train, val):
        for i in range(3):
            x, y = ds[i]
            _check_image(x, 24)
            assert y == -1
    with pytest.raises(IndexError):
        train[6]


def test_bundled_photos_load_offline(monkeypatch):
    # An import of pooch means skimage wanted to download: every photo must be in the wheel.
    monkeypatch.setitem(sys.modules, "pooch", None)
    bundled.load_photo.cache_clear()
    for name in bundled.TRAIN_COLOUR_PHOTOS + bundled.TRAIN_GRAY_PHOTOS + bundled.VAL_PHOTOS:
        arr = bundled.load_photo(name)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    for name in bundled.TRAIN_COLOUR_PHOTOS + bundled.VAL_PHOTOS:
        arr = bundled.load_photo(name).astype(int)
        assert np.abs(arr[..., 0] - arr[..., 1]).mean() > 1, f"{name} should be in colour"


def test_bundled_photos_val_is_fixed_and_train_follows_epoch():
    a, b = BundledPhotos(16, split="val", seed=0), BundledPhotos(16, split="val", seed=5)
    b.set_epoch(3)
    for i in (0, 1, 100):
        assert torch.equal(a[i][0], b[i][0])

    t1, t2 = BundledPhotos(16, seed=1), BundledPhotos(16, seed=1)
    t1.set_epoch(2)
    t2.set_epoch(2)
    assert all(torch.equal(t1[i][0], t2[i][0]) for i in range(3))
    first = [t1[i][0] for i in range(3)]
    t1.set_epoch(3)
    assert not all(torch.equal(first[i], t1[i][0]) for i in range(3))
    other_seed = BundledPhotos(16, seed=2)
    other_seed.set_epoch(2)
    assert not all(torch.equal(first[i], other_seed[i][0]) for i in range(3))


def test_bundled_photos_mostly_colour():
    ds = BundledPhotos(32, length=4000)
    picks = [ds.plan(i).photo for i in range(len(ds))]
    colour = sum(p in ds.colour_photos for p in picks) / len(picks)
    assert colour >= 0.8
    assert set(picks) == set(ds.photos)  # every photo gets used


def test_bundled_digits():
    from sklearn.datasets import load_digits

    sk = load_digits()
    train, val = BundledDigits(), BundledDigits(split="val")
    assert train.num_classes == 10 and train.classes == [str(i) for i in range(10)]
    assert not set(train.indices) & set(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(1797))
    assert 0.12 < len(val) / 1797 < 0.18
    for ds in (train, val):
        for i in (0, 7, len(ds) - 1):
            x, y = ds[i]
            _check_image(x, 32)
            assert y == sk.target[ds.indices[i]]
    # White digit on black: mostly dark background, with bright ink.
    x, _ = train[0]
    assert x.mean() < -0.2 and x[:, 0, 0].max() < -0.9 and x.max() > 0.5
    assert BundledDigits(split="val", labels=False)[0][1] == -1


def test_build_dataset_dispatch(tree):
    ds = build_dataset("bundled:photos", 16)
    assert isinstance(ds, BundledPhotos) and ds.split == "train"
    assert build_dataset("bundled:photos:val", 16).split == "val"
    assert build_dataset("bundled:photos", 16, split="val").split == "val"
    dig = build_dataset("bundled:digits:val", 8, split="train")
    assert isinstance(dig, BundledDigits) and dig.split == "val"
    folder = build_dataset(str(tree), 16, split="val", labels=False)
    assert isinstance(folder, ImageFolder) and not folder.train and folder.num_classes == 0
    assert "photos" in describe("bundled:photos") and str(tree) in describe(str(tree))


def test_build_dataset_unknown_bundled_name():
    with pytest.raises(DataError, match="bundled:photos, bundled:digits") as err:
        build_dataset("bundled:imagenet", 16)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="unknown split"):
        build_dataset("bundled:digits:test", 16)


# ------------------------------------------------------------------ image modes and sizes


def _load_png(img, tmp_path, name="x.png"):
    from rqgen.data import load_image

    path = tmp_path / name
    img.save(path)
    return load_image(path, 8)


def _pixels(x: torch.Tensor) -> np.ndarray:
    """(3, R, R) in [-1, 1] -> uint8 (R, R, 3) as saved."""
    return np.rint((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode):
    ramp = np.linspace(0, 1, 64).reshape(8, 8)  # a full-range gradient
    if mode == "F":
        img = Image.fromarray(ramp.astype(np.float32), "F")
        name = "x.tiff"
    else:
        img = Image.fromarray((ramp * 65535).astype(np.uint16 if mode == "I;16" else np.int32))
        name = "x.png" if mode == "I;16" else "x.tiff"
    x = _load_png(img, tmp_path, name)
    got = _pixels(x)[..., 0].astype(int)
    expected = np.rint(ramp * 255).astype(int)
    assert np.abs(got - expected).max() <= 1  # 16-bit PIL would clip 97% of this to 255
    assert (got == 255).mean() < 0.05


@pytest.mark.parametrize("mode,colour,expected", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # no cyan, full magenta + yellow: red
    ("LA", (0, 0), (255, 255, 255)),  # fully transparent: white, not black
    ("LA", (100, 255), (100, 100, 100)),
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
])  # fmt: skip
def test_other_modes_convert_to_the_expected_rgb(tmp_path, mode, colour, expected):
    name = "x.jpg" if mode == "CMYK" else "x.png"
    got = _pixels(_load_png(Image.new(mode, (8, 8), colour), tmp_path, name))
    tol = 3 if mode == "CMYK" else 0  # JPEG rounding
    assert np.abs(got.reshape(-1, 3) - np.array(expected)).max() <= tol


def test_a_palette_image_with_transparency_gets_a_white_background(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    img.info["transparency"] = 0
    got = _pixels(_load_png(img, tmp_path))
    assert (got[:, :4] == [200, 30, 30]).all() and (got[:, 4:] == 255).all()


def _png_header_claiming(tmp_path, width: int, height: int):
    """A small valid PNG whose header claims width × height pixels (no pixels stored for
    them): what a decompression bomb looks like before decoding."""
    import struct
    import zlib

    path = tmp_path / "bomb.png"
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def test_images_above_the_pixel_cap_are_skipped_before_decoding(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(root / "good.png")
    bomb = _png_header_claiming(tmp_path, 12000, 10000)
    bomb.rename(root / "bomb.png")
    with pytest.warns(UnreadableImageWarning, match=r"120 MP is above the 64 MP cap"):
        ds = ImageFolder(root, 16)
    assert [p.name for p in ds.paths] == ["good.png"]
    monkeypatch.setenv("RQGEN_MAX_PIXELS", "1000")  # configurable: now good.png is too big
    with pytest.raises(DataError, match="no readable images"):
        ImageFolder(root, 16)


def test_reconstruct_on_a_bomb_header_is_one_line(vae, tmp_path):
    from test_train_vae import rqgen

    bomb = _png_header_claiming(tmp_path, 30000, 30000)  # PIL itself raises above 179 MP
    r = rqgen("reconstruct", "--vae", vae, "--input", bomb, "--out", tmp_path / "o", check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr
    assert "cannot read image" in lines[0] and "above the 64 MP cap" in lines[0]
