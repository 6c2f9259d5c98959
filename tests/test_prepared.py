"""Prepared data: decoded once, the same crops as the folder, used on first sight of a
folder of large images, refreshed when the folder changes, and read by training."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_vae import TINY, metrics, rqgen

from rqgen.data import ImageFolder, build_dataset
from rqgen.data.prepared import PreparedImages, is_prepared, prepare
from rqgen.utils.files import umask_mode


def _photos(root, n=6, size=(320, 200), classes=("cats", "dogs")):
    """Smooth colour images (JPEG and PNG) in class subfolders, 10x the 32 px we train at."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(2, 9, 3)
        arr = np.stack([np.sin(a * xx), np.cos(b * yy), np.sin(c * (xx + yy))], -1)
        img = Image.fromarray(((arr + 1) * 127.5).astype(np.uint8))
        img.save(folder / f"img{i}.{'jpg' if i % 2 else 'png'}", quality=95)
        (folder / f"img{i}.txt").write_text(f"picture number {i}")
    return root


def test_prepared_data_gives_the_folders_images_labels_and_captions(tmp_path):
    from rqgen.data.captions import captions_for

    src = _photos(tmp_path / "src")
    out = prepare(src, tmp_path / "prep", 32, workers=1, quiet=True)
    folder, prepared = ImageFolder(src, 32, train=False), PreparedImages(out, 32, train=False)
    assert is_prepared(out) and len(prepared) == len(folder) == 6
    assert prepared.classes == folder.classes == ["cats", "dogs"]
    for i in range(len(folder)):  # centre crops: the very same pixels
        (a, la), (b, lb) = folder[i], prepared[i]
        assert la == lb and torch.equal(a, b)
    assert captions_for(prepared) == captions_for(folder)
    # training crops: random and flipped, always of the prepared image
    torch.manual_seed(0)
    crops = torch.stack([PreparedImages(out, 32, train=True)[0][0] for _ in range(8)])
    assert crops.shape == (8, 3, 32, 32) and crops.std(0).mean() > 0.01
    # prepared at 32 px, asked for 64: one line, not an upscaled blur
    with pytest.raises(Exception, match="prepared at 32 px and this model needs 64"):
        PreparedImages(out, 64)
    # smaller than prepared: resized down, the same as the folder at 16 px up to resampling
    small, ref = PreparedImages(out, 16, train=False)[0][0], ImageFolder(src, 16, False)[0][0]
    assert (small - ref).abs().mean() < 0.05


def test_large_images_are_prepared_once_and_again_when_the_folder_changes(tmp_path, monkeypatch):
    import rqgen.data.prepared as prepared

    monkeypatch.setenv("RQGEN_CACHE", str(tmp_path / "cache"))
    src = _photos(tmp_path / "src")
    calls = []
    real = prepared.prepare
    monkeypatch.setattr(prepared, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    data = build_dataset(str(src), 32)
    assert isinstance(data, PreparedImages) and len(calls) == 1
    build_dataset(str(src), 32, split="val")  # the same folder again: the cache is used
    assert len(calls) == 1
    _photos(tmp_path / "src", n=7)  # a new image: prepared again, with it
    assert len(build_dataset(str(src), 32)) == 7 and len(calls) == 2
    # small images are read as they are, and so are large ones when the user says so
    small = _photos(tmp_path / "small", size=(40, 40))
    assert isinstance(build_dataset(str(small), 32), ImageFolder)
    monkeypatch.setenv("RQGEN_AUTO_PREPARE", "0")
    assert isinstance(build_dataset(str(src), 32), ImageFolder)


def test_prepare_cli_then_training_reads_the_prepared_data(tmp_path):
    src = _photos(tmp_path / "src")
    (src / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "prep"
    r = rqgen("prepare", "--data", src, "--out", out, "--resolution", 32, "--workers", 1)
    assert "prepared 6 images (1 skipped, 2 classes" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and os.stat(out / "pixels.u8").st_mode & 0o777 == umask_mode()
    run = tmp_path / "run"
    rqgen("train-vae", "--data", out, "--out", run, "--steps", 2, *TINY, "train.batch_size=4")
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2]
    # prepared again into the same directory: replaced whole, never half-written
    rqgen("prepare", "--data", src, "--out", out, "--resolution", 48, "--workers", 1)
    assert json.loads((out / "manifest.json").read_text())["resolution"] == 48
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prep")]
