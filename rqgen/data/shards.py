"""WebDataset tar shards as a data source (#12): `--data 'shards/train-{000000..000320}.tar'`.

A shard holds samples `KEY.jpg|jpeg|png|webp`, with an optional `KEY.cls` (class id) and
`KEY.txt` (caption); paths may be local or any URL the `webdataset` library opens (http://,
pipe:...). The `webdataset` package reads the tars and shuffles; rqgen decodes (the same
resize and crops as a folder) and splits the shards:

- training streams them endlessly, epoch after epoch, each epoch's shard order drawn from the
  seed; rank r takes every world-th shard of it and DataLoader worker w every workers-th of
  those. A resume starts a fresh epoch order from the step it resumes at: with shards the
  exact sample order of an unbroken run is not replayed (it would mean reading past every
  sample already seen).
- extraction and evaluation read shards in order, one after another (`samples`).
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator

import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from rqgen.data.folder import DECODE_ERRORS, crop, decode_resized
from rqgen.errors import DataError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples: shards are written in order, so shuffle within a window too


def _expand(src: str) -> list[str]:

    return [u for part in src.split("::") for u in braceexpand(part.strip())]


def is_shards(src: str) -> bool:
    """True for a tar shard, a brace pattern of them, or several joined by '::'."""
    s = str(src).strip()
    return bool(s) and not s.startswith("bundled:") and _expand(s)[0].endswith(SHARD_SUFFIXES)


def _local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def shard_urls(src: str) -> list[str]:
    """The shards of `src`; local ones must exist (one line naming the first missing)."""
    urls = _expand(src)
    bad = [u for u in urls if not u.endswith(SHARD_SUFFIXES)]
    if bad:
        raise DataError(f"'{bad[0]}' in --data {src} is not a tar shard (.tar, .tar.gz, .tgz)")
    missing = [u for u in urls if _local(u) and not os.path.isfile(os.path.expanduser(u))]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(urls)} shards of --data {src} do not exist "
            f"(e.g. {missing[0]}): check the path and the brace range"
        )
    return [os.path.expanduser(u) if _local(u) else u for u in urls]


def _decode(sample: dict, resolution: int, generator: torch.Generator | None = None):
    """(image (3, R, R), label, caption) of one WebDataset sample, centre-cropped or, with a
    `generator`, randomly cropped and flipped; None if unreadable."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return None
    try:
        img = decode_resized(io.BytesIO(sample[ext]), resolution)
        label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
    except DECODE_ERRORS:
        return None
    caption = sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else None
    return crop(img, resolution, generator is not None, generator), label, caption


def worker_share() -> tuple[int, int]:
    """(this DataLoader worker's index, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _tar_samples(urls: list[str]) -> Iterator[dict]:
    import webdataset as wds

    # an unreadable shard or member is warned about and skipped, never the end of a run
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue)
    )
    yield from pipeline


class Shards(IterableDataset):
    """Tar shards as `(image, label)`: every sample of every shard once, in order, centre
    crops (evaluation and extraction). `stream` gives the endless training one."""

    def __init__(self, src: str, resolution: int, seed: int = 0):
        self.src, self.urls = src, shard_urls(src)
        self.resolution, self.seed = int(resolution), seed
        self.classes: list[str] = []  # class ids come with the samples, names do not
        self.skipped = 0

    @property
    def num_classes(self) -> int:
        return 0  # not known before a pass over the data (the feature store counts them)

    def fingerprint(self) -> str:
        """The shard list and, for local shards, their sizes and times: no shard is read."""
        parts = [self.src]
        for u in self.urls:
            st = os.stat(u) if _local(u) else None
            parts.append(f"{u}|{st.st_size}|{st.st_mtime_ns}" if st else u)
        return "\n".join(parts)

    def samples(self, shards: list[int] | None = None) -> Iterator[tuple[int, tuple]]:
        """(shard index, (image, label, caption)) of the given shards (default all), in
        order; unreadable samples are counted in `skipped` and left out."""
        for i in range(len(self.urls)) if shards is None else shards:
            for sample in _tar_samples([self.urls[i]]):
                item = _decode(sample, self.resolution)
                if item is None:
                    self.skipped += 1
                    continue
                yield i, item

    def __iter__(self):
        w, n = worker_share()
        for _, (x, label, _) in self.samples(list(range(w, len(self.urls), n))):
            yield x, label

    def stream(self, rank: int, world: int, start_step: int) -> ShardStream:
        return ShardStream(self, rank, world, start_step)


class ShardStream(IterableDataset):
    """The endless training stream of one rank: see the module docstring."""

    def __init__(self, shards: Shards, rank: int, world: int, start_step: int):
        self.shards, self.rank, self.world, self.start = shards, rank, world, start_step

    def __iter__(self):
        import webdataset as wds

        w, n = worker_share()
        consumers, me = self.world * n, self.rank * n + w
        urls, epoch = self.shards.urls, 0
        while True:
            seed = f"{self.shards.seed}/{self.start}/{epoch}"
            order = random.Random(seed).sample(urls, len(urls))  # the same on every reader
            rng = random.Random(f"{seed}/{me}")
            crops = torch.Generator().manual_seed(rng.getrandbits(63))
            if len(order) >= consumers:
                mine, keep = order[me::consumers], (lambda i: True)
            else:  # fewer shards than readers: all read every shard, each keeps its share
                mine, keep = order, (lambda i: i % consumers == me)
            samples = (s for i, s in enumerate(_tar_samples(mine)) if keep(i))
            shuffle = wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER // 10, rng=rng)
            readable = 0
            for sample in shuffle(samples):
                item = _decode(sample, self.shards.resolution, crops)
                if item is not None:
                    readable += 1
                    yield item[0], item[1]
            if not readable:  # else this loop would read the same nothing for ever
                raise DataError(
                    f"no readable image sample in the shards of --data "
                    f"{self.shards.src} (reader {me} of {consumers})"
                )
            epoch += 1
