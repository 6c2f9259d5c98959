"""Feature store for stage 2: what a frozen VAE makes of every training image, extracted
once, split over the ranks, in chunk files that every rank reads.

    STORE/<key>/store.json      written last: the key, item shape and dtype, chunk count
    STORE/<key>/z-00000.npy     (n, crops, *item) fp16 features Z = E(X), int16 codes or
                                int32 DQ token streams; CHUNK_ITEMS images per file, or
                                one file per tar shard
    STORE/<key>/y-00000.npy     (n, 2) int64: label, 1 if the image could be read else 0
    STORE/<key>/t-00000.json    captions (KEY.txt of tar shards), when there are any

The key covers the data listing, the resolution, the crop policy, what is stored and every
weight of the VAE, so a changed folder or VAE gets a new store instead of stale features.
Rank 0 deals the missing chunks out evenly; each is encoded in batches that start at its
first image, so the files are byte-identical whatever the number of ranks; an interrupted
extraction keeps its finished chunks. Items are read with positioned reads (`os.pread`)
through one descriptor per chunk and process, opened on first use after the fork (a
metadata operation on NFS / Lustre per chunk, not per item); reads go through the kernel's
page cache, shared by every rank on a node, while a memory mapping would count
every page a rank ever touched against its own resident memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from rqgen.checkpoint import write_json
from rqgen.data.folder import ImageFolder
from rqgen.data.shards import Shards
from rqgen.distributed import from_rank0, meet_after
from rqgen.errors import DataError
from rqgen.train.views import FIXED_CROPS, ShardViews, encode_views
from rqgen.utils.files import atomic_write

CHUNK_ITEMS = 1024  # images per chunk file: 32 MiB of fp16 8×8×256 features
STORE_VERSION = 1
MAX_OPEN = 64  # chunk files a process keeps open (a store can have thousands)


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of every weight and buffer of the VAE: features depend on all of them."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def source_fingerprint(dataset: Dataset, data: str, seed: int) -> str:
    """Hash of what the data source lists, opening no image: a folder's file list and labels,
    tar shards' names, sizes and times, a prepared directory's manifest, or the bundled
    source's name and crop seed."""
    if isinstance(dataset, Shards):
        what = dataset.fingerprint()
    elif isinstance(dataset, ImageFolder):
        what = json.dumps(asdict(dataset.listing), sort_keys=True)
    elif hasattr(dataset, "manifest"):  # prepared data
        what = json.dumps(dataset.manifest, sort_keys=True)
    else:
        what = f"{data}|{type(dataset).__name__}|{len(dataset)}|{seed}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StoreKey:
    source: str  # source_fingerprint
    resolution: int
    crops: int  # crop policy: views per image (views.py)
    vae: str  # vae_fingerprint
    kind: str  # features | codes | dq
    version: int = STORE_VERSION
    seed: int = 0  # what random views are drawn from (a fixed policy has none)

    def digest(self) -> str:
        what = asdict(self)
        if self.crops in FIXED_CROPS:  # as before random views existed: stores stay found
            del what["seed"]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class FeatureStore:
    """A finished store, read by positioned reads; private memory is the labels (16 bytes
    per image) and the batch being read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            meta = json.loads((self.path / "store.json").read_text())
            ys = [np.load(self.path / f"y-{c:05d}.npy") for c in range(meta["chunks"])]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"feature store {self.path} is unreadable ({e}): delete it and "
                "train again to extract it anew"
            ) from e
        self.meta = meta
        self.crops, self.shape = meta["crops"], tuple(meta["item_shape"])
        self.dtype = np.dtype(meta["dtype"])
        y = np.concatenate(ys)
        self.labels, self.readable = y[:, 0].copy(), y[:, 1].astype(bool)
        self.item_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._starts = np.cumsum([0] + [len(c) for c in ys])  # chunks of tar shards vary
        self._offsets = [self._data_offset(c) for c in range(meta["chunks"])]
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid: int | None = os.getpid()

    def _data_offset(self, c: int) -> int:
        with open(self.path / f"z-{c:05d}.npy", "rb") as f:  # the .npy header's length
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            return f.tell()

    def __len__(self) -> int:
        return len(self.labels)

    def captions(self) -> list[str | None]:
        """The captions stored with the images (tar shards' KEY.txt), else Nones."""
        out: list[str | None] = []
        for c in range(self.meta["chunks"]):
            f = self.path / f"t-{c:05d}.json"
            n = int(self._starts[c + 1] - self._starts[c])
            out += json.loads(f.read_text()) if f.is_file() else [None] * n
        return out

    def _locate(self, index: int, view: int) -> tuple[int, int]:
        """(chunk, byte offset) of view `view` of image `index`."""
        c = int(np.searchsorted(self._starts, index, side="right")) - 1
        i = int(index) - int(self._starts[c])
        return c, self._offsets[c] + (i * self.crops + view) * self.item_bytes

    def _fd(self, c: int) -> int:
        """This process's descriptor of chunk c: opened once, after a fork anew (a worker
        must not share the parent's file offsets' bookkeeping), at most MAX_OPEN at once."""
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(c)
        if fd is None:
            if len(self._fds) >= MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[c] = os.open(self.path / f"z-{c:05d}.npy", os.O_RDONLY)
        else:
            self._fds.move_to_end(c)
        return fd

    def _item(self, raw: bytes) -> Tensor:
        t = torch.from_numpy(np.frombuffer(raw, self.dtype).reshape(self.shape).copy())
        return t.float() if self.meta["kind"] == "features" else t.long()

    def read(self, index: int, view: int = 0) -> Tensor:
        """One stored item (view `view` of image `index`): float32 features or long codes."""
        c, pos = self._locate(index, view)
        return self._item(os.pread(self._fd(c), self.item_bytes, pos))

    def read_many(self, items: list[tuple[int, int]]) -> list[Tensor]:
        """Items (index, view) in the order asked, read grouped by chunk and position."""
        where = [self._locate(i, v) for i, v in items]
        out: list[Tensor | None] = [None] * len(items)
        for j in sorted(range(len(items)), key=where.__getitem__):
            c, pos = where[j]
            out[j] = self._item(os.pread(self._fd(c), self.item_bytes, pos))
        return out

    def distinct(self, indices: np.ndarray) -> int:
        """How many different items (code maps, or feature maps) the views of images
        `indices` hold: what training can tell apart, counted from the stored bytes."""
        seen = set()
        for i in indices:
            for v in range(self.crops):
                c, pos = self._locate(int(i), v)
                seen.add(hashlib.blake2b(os.pread(self._fd(c), self.item_bytes, pos)).digest())
        return len(seen)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:  # to a spawned worker: without this process's files
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": None}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def save_npy(path: Path, a: np.ndarray) -> None:
    """np.save, atomically, with the user's umask."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, a)

    atomic_write(path, write, a.nbytes)


def _write_chunk(path: Path, c: int, z: np.ndarray, y: np.ndarray, captions=None) -> None:
    save_npy(path / f"z-{c:05d}.npy", z)
    if captions is not None and any(t is not None for t in captions):
        atomic_write(path / f"t-{c:05d}.json", lambda p: Path(p).write_text(json.dumps(captions)))
    save_npy(path / f"y-{c:05d}.npy", y)  # y last: it marks the chunk done


def _stream_npy(tmp: str, batches, n: int, vae, device, kind: str, ys: list) -> None:
    """Encode `batches` into a .npy of n items, written batch by batch (memory stays one
    batch); their (label, readable) rows are appended to `ys`."""
    with open(tmp, "wb") as f:
        for x, label, ok in batches:
            z = encode_views(vae, x.to(device), kind)
            if not ys:  # the header needs the item shape: known from the first batch
                header = {
                    "descr": np.lib.format.dtype_to_descr(z.dtype),
                    "fortran_order": False,
                    "shape": (n, *z.shape[1:]),
                }
                np.lib.format.write_array_header_1_0(f, header)
            f.write(np.ascontiguousarray(z).tobytes())
            ys.append(torch.stack([label, ok], 1).numpy().astype(np.int64))


def _encode_chunks(
    vae,
    views,
    chunks: list[int],
    chunk_items: int,
    kind: str,
    path: Path,
    device,
    batch_size: int,
    workers: int,
    bar,
) -> None:
    """Encode and write the given chunks: ranges of `chunk_items` images of a dataset, or
    whole tar shards. Batches start at a chunk's first image, whatever the rank."""
    empty = encode_views(
        vae, torch.zeros(1, 1, 3, views.resolution, views.resolution, device=device), kind
    )[:0]
    if isinstance(views, ShardViews):
        views.chunks, views.batch_size = chunks, batch_size
        parts: dict[int, list] = {}
        for c, batch, last in DataLoader(views, batch_size=None, num_workers=workers):
            if batch is not None:
                x, label, ok, captions = batch
                y = torch.stack([label, ok], 1).numpy().astype(np.int64)
                parts.setdefault(c, []).append(
                    (encode_views(vae, x.to(device), kind), y, list(captions))
                )
            if last:
                done = parts.pop(c, [])
                z = np.concatenate(
                    [empty.reshape(0, views.crops, *empty.shape[2:])] + [p[0] for p in done]
                )
                y = np.concatenate([np.zeros((0, 2), np.int64)] + [p[1] for p in done])
                _write_chunk(path, c, z, y, [t for p in done for t in p[2]])
                bar.update(1)
        return
    for c in chunks:
        items = range(c * chunk_items, min(len(views), (c + 1) * chunk_items))
        loader = DataLoader(Subset(views, items), batch_size=batch_size, num_workers=workers)
        ys: list[np.ndarray] = []
        write = functools.partial(
            _stream_npy, batches=loader, n=len(items), vae=vae, device=device, kind=kind, ys=ys
        )
        atomic_write(path / f"z-{c:05d}.npy", write)
        save_npy(path / f"y-{c:05d}.npy", np.concatenate(ys))  # y last: it marks the chunk done
        bar.update(1)


def deal_chunks(missing: list[int], world: int) -> list[list[int]]:
    """The chunks still to encode, dealt out evenly: rank r takes every world-th of them
    (after an interrupted extraction, no rank waits for another's whole old share)."""
    return [missing[r::world] for r in range(world)]


def build_store(
    root: Path,
    key: StoreKey,
    vae,
    views: Dataset,
    rt,
    *,
    batch_size: int = 64,
    workers: int = 0,
    chunk_items: int = CHUNK_ITEMS,
    quiet: bool = False,
) -> FeatureStore:
    """Open the store for `key` under `root`, extracting what is missing first. Rank 0
    decides whether the store is complete and deals out the missing chunks; each rank
    encodes its share, the ranks meet in the store (extraction takes hours, longer than any
    collective may wait), and rank 0 writes store.json."""
    path = Path(root) / key.digest()
    sharded = isinstance(views, ShardViews)
    chunks = len(views) if sharded else -(-len(views) // chunk_items)

    def plan() -> list[list[int]] | None:
        if (path / "store.json").is_file():
            return None
        missing = [c for c in range(chunks) if not (path / f"y-{c:05d}.npy").is_file()]
        return deal_chunks(missing, rt.world_size)

    shares = from_rank0(rt, plan)
    if shares is None:
        return FeatureStore(path)
    mine = shares[rt.rank]

    def extract() -> None:
        path.mkdir(parents=True, exist_ok=True)
        with tqdm(
            total=len(mine),
            desc="extract features",
            unit="chunk",
            leave=False,
            disable=quiet or not rt.is_main,
        ) as bar:
            _encode_chunks(
                vae, views, mine, chunk_items, key.kind, path, rt.device, batch_size, workers, bar
            )

    def finish() -> None:
        first = np.load(path / "z-00000.npy", mmap_mode="r")
        items = sum(len(np.load(path / f"y-{c:05d}.npy", mmap_mode="r")) for c in range(chunks))
        meta = {
            "key": asdict(key),
            "items": items,
            "crops": key.crops,
            "chunks": chunks,
            "chunk_items": None if sharded else chunk_items,
            "item_shape": list(first.shape[2:]),
            "dtype": first.dtype.str,
            "kind": key.kind,
        }
        write_json(path / "store.json", meta)

    meet_after(rt, extract)
    from_rank0(rt, finish)
    return FeatureStore(path)


class StoreView(Dataset):
    """Items `indices` of a store with their conditions: training takes one view per image
    and epoch (drawn from seed, epoch and index, so a resume reads the same ones), evaluation
    the centre view."""

    def __init__(
        self,
        store: FeatureStore,
        indices: np.ndarray,
        cond: Tensor,
        seed: int = 0,
        random_views: bool = False,
    ):
        self.store, self.indices, self.cond = store, np.asarray(indices), cond
        self.seed, self.random_views, self.epoch = seed, random_views and store.crops > 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def view(self, i: int) -> int:
        if not self.random_views:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch, i]).integers(self.store.crops))

    def __getitem__(self, i: int):
        return self.store.read(self.indices[i], self.view(i)), self.cond[i]

    def __getitems__(self, items: list[int]) -> list[tuple[Tensor, Tensor]]:
        """A batch at once (DataLoader's batched fetch): read grouped by chunk."""
        zs = self.store.read_many([(self.indices[i], self.view(i)) for i in items])
        return [(z, self.cond[i]) for z, i in zip(zs, items)]

    def batch(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        items = self.__getitems__(list(range(start, min(stop, len(self)))))
        return torch.stack([z for z, _ in items]), torch.stack([c for _, c in items])
