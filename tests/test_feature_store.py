"""The stage-2 feature store: split over ranks, keyed by what made it, read without copies."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_ar import train_ar

from rqgen.data.bundled import BundledDigits
from rqgen.distributed import Runtime
from rqgen.stage1.rqvae import RQVAE, RQVAEConfig
from rqgen.train import features as F
from rqgen.train import views as V

TINY_VAE = RQVAEConfig(resolution=32, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                       attn_resolutions=[], z_channels=8, embed_dim=8, codebook_size=16,
                       code_depth=2)  # fmt: skip
N_IMAGES, CHUNK = 37, 8  # 5 chunks, the last one short


def _store(root: Path, rank: int, world: int, kind: str = "features", crops: int = 1):
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the same kernels in every process: bit-equal outputs
    vae = RQVAE(TINY_VAE).eval()
    data = torch.utils.data.Subset(BundledDigits(32, labels=True), range(N_IMAGES))
    views = V.views_dataset(data, "bundled:digits", 32, crops, seed=0)
    key = F.StoreKey("digits", 32, crops, F.vae_fingerprint(vae), kind)
    encoded = []
    real = F._encode_chunks

    def counting(vae, views, chunks, *args):
        encoded.extend(chunks)
        return real(vae, views, chunks, *args)

    F._encode_chunks = counting
    try:
        store = F.build_store(root, key, vae, views, Runtime(rank, world, torch.device("cpu")),
                              batch_size=3, chunk_items=CHUNK, quiet=True)  # fmt: skip
    finally:
        F._encode_chunks = real
    return store, encoded


def _on_rank(rank: int, root: str, init: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    _, encoded = _store(Path(root), rank, 2)
    results[rank] = encoded
    dist.destroy_process_group()


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_two_ranks_write_the_same_store_as_one_each_encoding_half(tmp_path):
    import torch.multiprocessing as mp

    one, encoded = _store(tmp_path / "one", 0, 1)
    assert encoded == [0, 1, 2, 3, 4]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_on_rank, args=(str(tmp_path / "two"), str(tmp_path / "init"), results),
                 nprocs=2)  # fmt: skip
        results = dict(results)
    assert results == {0: [0, 2, 4], 1: [1, 3]}  # chunk c on rank c % 2
    (two,) = (tmp_path / "two").iterdir()
    assert _files(one.path) == _files(two)
    # the stored items are the encoder's output for the centre crops, in fp16
    torch.manual_seed(0)
    vae = RQVAE(TINY_VAE).eval()
    x = torch.stack([BundledDigits(32)[i][0] for i in (0, 9, 36)])
    with torch.no_grad():
        z = vae.encode(x).half().float()
    got = torch.stack([one.read(i) for i in (0, 9, 36)])
    assert torch.equal(got, z) and got.dtype == torch.float32
    assert one.labels.tolist() == [int(BundledDigits(32)[i][1]) for i in range(N_IMAGES)]


def test_an_interrupted_extraction_keeps_its_finished_chunks(tmp_path):
    store, _ = _store(tmp_path, 0, 1)
    before = _files(store.path)
    (store.path / "store.json").unlink()
    (store.path / "y-00003.npy").unlink()  # chunk 3 never finished
    again, encoded = _store(tmp_path, 0, 1)
    assert encoded == [3] and _files(again.path) == before


def test_hard_label_runs_store_int16_codes_that_equal_the_argmin(tmp_path):
    store, _ = _store(tmp_path, 0, 1, kind="codes")
    torch.manual_seed(0)
    vae = RQVAE(TINY_VAE).eval()
    x = BundledDigits(32)[5][0][None]
    assert store.dtype == np.int16 and store.read(5).dtype == torch.long
    assert torch.equal(store.read(5), vae.encode_to_codes(x)[0])


def test_crop_views_are_the_centre_the_corners_and_their_mirrors():
    x = torch.arange(3 * 36 * 36, dtype=torch.float32).reshape(3, 36, 36)
    assert torch.equal(V.crop_views(x[:, 2:34, 2:34], 32, 1)[0], x[:, 2:34, 2:34])
    two = V.crop_views(x[:, 2:34, 2:34], 32, 2)
    assert torch.equal(two[1], two[0].flip(-1))
    ten = V.crop_views(x, 32, 10)
    assert ten.shape == (10, 3, 32, 32)
    assert torch.equal(ten[0], x[:, :32, :32]) and torch.equal(ten[3], x[:, 4:, 4:])
    assert torch.equal(ten[4], x[:, 2:34, 2:34]) and torch.equal(ten[9], ten[4].flip(-1))


def test_training_draws_one_view_per_image_and_epoch_reproducibly(tmp_path):
    store, _ = _store(tmp_path, 0, 1, crops=2)
    view = F.StoreView(store, np.arange(10), torch.zeros(10), seed=3, random_views=True)
    picks = []
    for epoch in range(6):
        view.set_epoch(epoch)
        picks.append([view.view(i) for i in range(10)])
    assert {p for row in picks for p in row} == {0, 1}  # both views are used
    view.set_epoch(2)
    assert [view.view(i) for i in range(10)] == picks[2]  # a resume draws the same
    assert F.StoreView(store, np.arange(10), torch.zeros(10)).view(4) == 0  # eval: centre
    torch.manual_seed(0)
    vae = RQVAE(TINY_VAE).eval()
    with torch.no_grad():
        mirrored = vae.encode(BundledDigits(32)[4][0].flip(-1)[None])[0].half().float()
    assert torch.allclose(store.read(4, 1), mirrored, atol=2e-3)  # fp16, another batch


def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        x, label = BundledDigits(32)[i]
        img = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(label) / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_resume_opens_no_image_and_a_changed_folder_gets_a_new_store(vae, tmp_path, monkeypatch):
    import rqgen.data.folder as folder

    data = _folder(tmp_path / "data", 24)
    (data / "3" / "broken.png").write_bytes(b"not an image")
    store_root = tmp_path / "store"
    opened = []
    real = folder.open_image
    monkeypatch.setattr(folder, "open_image", lambda p: opened.append(p) or real(p))
    run = ["model.conditioning=class", f"train.features={store_root}"]
    p = train_ar(vae, tmp_path / "ar", 2, "--data", data, *run)
    assert "1 unreadable image(s)" in p.stdout + p.stderr
    assert len(opened) == 25  # each image read once, by the extraction
    (first,) = store_root.iterdir()
    meta = json.loads((first / "store.json").read_text())
    assert meta["items"] == 25
    opened.clear()
    train_ar(vae, tmp_path / "ar", 4, "--data", data, *run)  # resume: steps 3-4
    assert opened == []  # neither listing nor features opened an image
    _folder(tmp_path / "data", 25)  # one more image: a new run on it has a new store
    train_ar(vae, tmp_path / "ar2", 2, "--data", data, *run)
    stores = {json.loads((s / "store.json").read_text())["items"] for s in store_root.iterdir()}
    assert stores == {25, 26}


def test_each_chunk_is_opened_once_per_process_and_batches_read_by_chunk(tmp_path, monkeypatch):
    import os

    store, _ = _store(tmp_path, 0, 1)
    opened, real_open = [], os.open

    def counting_open(path, *args):
        opened.append(Path(path).name)
        return real_open(path, *args)

    monkeypatch.setattr(F.os, "open", counting_open)
    items = [(36, 0), (0, 0), (9, 0), (1, 0), (35, 0), (8, 0), (0, 0)]
    single = [store.read(i, v) for i, v in items]
    assert sorted(opened) == ["z-00000.npy", "z-00001.npy", "z-00004.npy"]  # not one per item
    grouped = store.read_many(items)
    assert all(torch.equal(a, b) for a, b in zip(single, grouped)) and len(opened) == 3
    # a DataLoader worker (a fork of this process) opens its own descriptors and reads the
    # same items through the batched fetch
    view = F.StoreView(store, np.arange(N_IMAGES), torch.arange(N_IMAGES))
    loaded = list(torch.utils.data.DataLoader(view, batch_size=8, num_workers=1))
    assert torch.equal(
        torch.cat([z for z, _ in loaded]), torch.stack([store.read(i) for i in range(N_IMAGES)])
    )
    assert torch.equal(torch.cat([c for _, c in loaded]), torch.arange(N_IMAGES))
    store.close()


def test_a_small_folder_stores_the_centre_and_random_crops_drawn_from_the_seed(tmp_path):
    from rqgen.data.folder import ImageFolder, load_image

    rng = np.random.default_rng(0)
    for i in range(3):  # wide images: a 32 px crop can move along 17 columns
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    folder = ImageFolder(tmp_path, 32, train=False)
    assert V.choose_crops(folder) == V.MAX_VIEWS and V.choose_crops(BundledDigits(32)) == 1
    assert [V.views_for(n) for n in (12, 1000, 5000, 10**6)] == [64, 8, 1, 1]
    views = V.views_dataset(folder, str(tmp_path), 32, 6, seed=0)
    x, _, ok = views[1]
    assert x.shape == (6, 3, 32, 32) and ok == 1
    assert torch.equal(x[0], load_image(folder.paths[1], 32))  # view 0: the centre
    assert torch.equal(views[1][0], x)  # drawn from the seed and the index: reproducible
    assert not torch.equal(V.views_dataset(folder, "", 32, 6, seed=1)[1][0], x)
    full = torch.from_numpy(np.array(Image.open(folder.paths[1]).convert("RGB"))).permute(2, 0, 1)
    windows = [full[:, :, o : o + 32].float() / 127.5 - 1 for o in range(17)]
    where = set()
    for v in x[1:]:  # each view is a window of the image, or its mirror
        hits = [(o, f) for o, w in enumerate(windows) for f in (0, 1)
                if torch.allclose(v, w.flip(-1) if f else w, atol=1e-6)]  # fmt: skip
        assert len(hits) == 1
        where |= set(hits)
    assert len(where) > 1
    with pytest.raises(F.DataError, match="random views"):
        V.views_dataset(BundledDigits(32), "bundled:digits", 32, 6, seed=0)
    fixed = F.StoreKey("s", 32, 2, "v", "codes")
    assert fixed.digest() == F.StoreKey("s", 32, 2, "v", "codes", seed=5).digest()
    assert (
        F.StoreKey("s", 32, 6, "v", "codes").digest()
        != F.StoreKey("s", 32, 6, "v", "codes", seed=5).digest()
    )

    torch.manual_seed(0)
    vae = RQVAE(TINY_VAE).eval()
    key = F.StoreKey("folder", 32, 6, F.vae_fingerprint(vae), "codes")
    store = F.build_store(tmp_path / "store", key, vae, views,
                          Runtime(0, 1, torch.device("cpu")), quiet=True)  # fmt: skip
    maps = {store.read(i, v).numpy().tobytes() for i in range(3) for v in range(6)}
    assert store.distinct(np.arange(3)) == len(maps) > 3
    assert store.distinct(np.arange(1)) == len(
        {store.read(0, v).numpy().tobytes() for v in range(6)}
    )
