"""WebDataset tar shards as --data: expansion, order, splitting, both stages under torchrun."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_vae import ENV, TINY, rqgen

from rqgen.data.bundled import BundledDigits
from rqgen.data.shards import Shards, is_shards
from rqgen.errors import DataError

N_SHARDS, PER_SHARD = 4, 10


def _png(x: torch.Tensor) -> bytes:
    img = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, broken: bool = False) -> str:
    """N_SHARDS shards of PER_SHARD digits (KEY.png, KEY.cls, KEY.txt); with `broken`, the
    second sample of shard 1 is not an image."""
    import webdataset as wds

    digits = BundledDigits(32)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(N_SHARDS):
        with wds.TarWriter(str(root / f"train-{s:03d}.tar")) as tar:
            for j in range(PER_SHARD):
                x, label = digits[s * PER_SHARD + j]
                image = b"junk" if broken and (s, j) == (1, 1) else _png(x)
                tar.write({"__key__": f"{s:03d}_{j:03d}", "png": image, "cls": str(label),
                           "txt": f"a handwritten digit {label}"})  # fmt: skip
    return str(root / f"train-{{000..{N_SHARDS - 1:03d}}}.tar")


def test_a_brace_pattern_reads_every_sample_in_order_and_skips_unreadable_ones(tmp_path):
    src = write_shards(tmp_path, broken=True)
    assert is_shards(src) and not is_shards(str(tmp_path)) and not is_shards("bundled:digits")
    shards = Shards(src, 32)
    assert len(shards.urls) == N_SHARDS
    got = list(shards.samples())
    assert len(got) == N_SHARDS * PER_SHARD - 1 and shards.skipped == 1
    assert [s for s, _ in got] == sorted(s for s, _ in got)  # shard after shard
    x, label, caption = got[0][1]
    digits = BundledDigits(32)
    assert torch.allclose(x, digits[0][0], atol=1 / 127) and label == int(digits[0][1])
    assert caption == f"a handwritten digit {label}"
    with pytest.raises(DataError, match="2 of the 6 shards"):
        Shards(str(tmp_path / "train-{000..004}.tar") + "::" + str(tmp_path / "x.tar"), 32)


def test_the_training_stream_splits_shards_over_ranks_and_is_reproducible(tmp_path):
    shards = Shards(write_shards(tmp_path), 32, seed=3)

    def first_epoch(rank: int) -> list:
        stream = iter(shards.stream(rank, 2, start_step=0))
        return [next(stream)[0] for _ in range(2 * PER_SHARD)]  # 2 shards per rank

    a, b = first_epoch(0), first_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, first_epoch(0)))  # seeded
    # the ranks read different shards: no image in common
    assert not any(torch.equal(x, y) for x in a for y in b)
    later = next(iter(shards.stream(0, 2, start_step=7)))[0]  # a resume: a new order
    assert later.shape == a[0].shape


@pytest.mark.slow
def test_both_stages_train_under_torchrun_from_shards_and_sample(tmp_path):
    src = write_shards(tmp_path / "shards")

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "rqgen", *map(str, args)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    vae = tmp_path / "vae"
    torchrun("train-vae", "--data", src, "--out", vae, "--steps", 2, "--device", "cpu", *TINY,
             "--val-data", src)  # fmt: skip
    rows = [json.loads(r) for r in (vae / "metrics.jsonl").read_text().splitlines()]
    assert any("val_psnr" in r for r in rows)
    ar = tmp_path / "ar"
    torchrun("train-ar", "--vae", vae, "--data", src, "--out", ar, "--steps", 2, "--device",
             "cpu", "model.width=32", "model.heads=2", "model.spatial_layers=1",
             "model.depth_layers=1", "train.batch_size=8", "train.eval_every=2")  # fmt: skip
    (store,) = (ar / "features").iterdir()
    meta = json.loads((store / "store.json").read_text())
    assert meta["chunks"] == N_SHARDS  # one chunk per shard, two encoded by each rank
    assert json.loads((ar / "config.json").read_text())["config"]["num_classes"] == 10
    rqgen("sample", "--model", ar, "--n", 4, "--class", "3", "--device", "cpu",
          "--out", tmp_path / "grid.png")  # fmt: skip
    assert Image.open(tmp_path / "grid.png").size[0] > 64
    result = rqgen("eval-vae", "--vae", vae, "--data", src, "--json", "--no-rfid",
                   "--device", "cpu")  # fmt: skip
    assert json.loads(result.stdout)["n_images"] == N_SHARDS * PER_SHARD
