"""The training data stream: the run's dataset (listed once), and each rank's micro-batches
of a seeded permutation that starts at any step."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from rqgen.checkpoint import write_json
from rqgen.data import build_dataset
from rqgen.data.folder import ImageFolder, Listing
from rqgen.data.prepared import PreparedImages, is_prepared, prepared_copy
from rqgen.data.shards import Shards, is_shards
from rqgen.distributed import Runtime, from_rank0, meet_after

LISTING_NAME = "data_listing.json"


def run_dataset(data: str, resolution: int, seed: int, out: Path, rt: Runtime) -> Dataset:
    """The training set of a run. A folder is listed once, by rank 0, into OUT/data_listing
    .json (file names and classes, no image opened; or the prepared copy of a folder of
    large images), which every rank reads and every resume reuses: neither walks nor opens
    the folder to list it again. Unreadable images are skipped when first loaded. Bundled
    and prepared data and tar shards need no listing.

    Rank 0 alone decides whether the listing exists (a rank's own look at OUT could see it
    appear mid-way); preparing a folder can take hours, so the others wait for it in the
    store, not in a collective. A rank that does not see rank 0's prepared copy (a
    node-local cache) prepares its own, and every rank meets once all have a dataset."""
    if is_shards(data):  # nothing to list: the shards are read as a stream
        return Shards(data, resolution, seed=seed)
    root = Path(data).expanduser()
    plain = data.strip() and not data.startswith("bundled:") and not is_prepared(root)
    if not plain or not root.is_dir():  # (an empty --data: build_dataset says so)
        return build_dataset(data, resolution, "train", seed=seed)
    path = out / LISTING_NAME

    def list_once() -> None:
        if path.is_file():
            return
        prepared = prepared_copy(root, resolution)
        if prepared is not None:
            record = {"prepared": str(prepared)}
        else:
            folder = ImageFolder(root, resolution, verify=False)  # one line if empty
            record = {"listing": dataclasses.asdict(folder.listing)}
        write_json(path, record)

    from_rank0(rt, list_once)

    def open_listed() -> Dataset:
        record = json.loads(path.read_text())
        if "prepared" in record and is_prepared(record["prepared"]):
            return PreparedImages(record["prepared"], resolution, train=True)
        if "prepared" in record:  # cleared since, or not on this node: prepare it here
            return build_dataset(data, resolution, "train", seed=seed)
        listing = Listing(**record["listing"])
        return ImageFolder(listing.root, resolution, listing=listing, verify=False)

    return meet_after(rt, open_listed)


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of a seeded permutation per epoch; rank r takes the r-th consecutive
    slice of each. Starts at any global step, so resuming needs no replay of the data, and
    the ranks together see exactly the batch a single process would."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int):
        if global_batch % world:
            raise ValueError(f"batch {global_batch} is not divisible by {world} processes")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start = seed, start
        self.per_epoch = max(1, n // global_batch)  # drop the last partial batch

    def permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.n < self.global_batch:  # tiny datasets: repeat to fill a batch
            perm = perm.repeat(math.ceil(self.global_batch / self.n))
        return perm

    def __iter__(self) -> Iterator[list[int]]:
        step, local = self.start, self.global_batch // self.world
        epoch, perm = -1, None
        while True:
            e, i = divmod(step, self.per_epoch)
            if e != epoch:  # one permutation per epoch, not per step (design_notes.md)
                epoch, perm = e, self.permutation(e)
            batch = perm[i * self.global_batch : (i + 1) * self.global_batch]
            yield batch[self.rank * local : (self.rank + 1) * local].tolist()
            step += 1

    def __len__(self) -> int:  # infinite stream; len is only used for display
        return self.per_epoch


class _EpochedDataset(Dataset):
    """Forwards the epoch of each index to datasets with random crops (set_epoch)."""

    def __init__(self, dataset: Dataset, per_epoch: int):
        self.dataset, self.per_epoch = dataset, per_epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, step = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(step // self.per_epoch)
        return self.dataset[index]

    def __getitems__(self, items: list) -> list:
        """One micro-batch (one step): through the dataset's batched read when it has one."""
        if not hasattr(self.dataset, "__getitems__"):
            return [self[item] for item in items]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(items[0][1] // self.per_epoch)
        return self.dataset.__getitems__([index for index, _ in items])


class _TaggedSampler(Sampler):
    def __init__(self, sampler: ShardedBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        for step, batch in enumerate(self.sampler, start=self.sampler.start):
            yield [(i, step) for i in batch]


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which saves and stops cleanly (a
    worker killed by it would only turn the interrupt into a data-loading error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_stream(
    dataset: Dataset, global_batch: int, rt: Runtime, seed: int, start_step: int, workers: int
) -> Iterator:
    """Endless iterator of this rank's micro-batches, starting at global micro-step start_step."""
    if isinstance(dataset, Shards):  # tar shards: a stream split by rank and worker
        loader = DataLoader(
            dataset.stream(rt.rank, rt.world_size, start_step),
            batch_size=global_batch // rt.world_size,
            num_workers=workers,
            worker_init_fn=_ignore_stop_signals,
            pin_memory=rt.device.type == "cuda",
        )
        return iter(loader)
    sampler = ShardedBatchSampler(
        len(dataset), global_batch, rt.rank, rt.world_size, seed, start_step
    )
    loader = DataLoader(
        _EpochedDataset(dataset, sampler.per_epoch),
        worker_init_fn=_ignore_stop_signals,
        batch_sampler=_TaggedSampler(sampler),
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=False,
        # its own generator: creating the iterator must not draw from the global RNG, or a
        # resumed run (RNG restored, then a new iterator) would drift from an unbroken one
        generator=torch.Generator().manual_seed(seed + 7919 * start_step + rt.rank),
    )
    return iter(loader)
