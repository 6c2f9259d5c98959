"""What the feature extraction reads: each training image as the crop policy's views
(the centre; the centre and its mirror; ten-crop), decoded deterministically, with whether
it could be read."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from rqgen.data import build_dataset
from rqgen.data.folder import DECODE_ERRORS, ImageFolder, load_image
from rqgen.data.prepared import PreparedImages
from rqgen.data.shards import Shards, worker_share

TEN_CROP_SCALE = 1.125  # ten-crop cuts R×R squares out of the image resized to 1.125·R


def crop_views(x: Tensor, resolution: int, crops: int) -> Tensor:
    """(C, S, S) -> (crops, C, R, R): 1 the centre; 2 the centre and its mirror; 10 the four
    corners and the centre of the S = 1.125·R image, each also mirrored (ten-crop)."""
    r, s = resolution, x.shape[-1]
    if crops in (1, 2):
        o = (s - r) // 2
        views = [x[:, o : o + r, o : o + r]]
    else:
        o, e = (s - r) // 2, s - r
        views = [x[:, a : a + r, b : b + r] for a, b in ((0, 0), (0, e), (e, 0), (e, e), (o, o))]
    if crops > 1:
        views += [v.flip(-1) for v in views]
    return torch.stack(views)


class _Views(Dataset):
    """Deterministic views of every image of the run's dataset, and whether it could be read
    (an unreadable file gets zeros and is left out of training, not replaced)."""

    def __init__(self, dataset: Dataset, resolution: int, crops: int):
        self.dataset, self.resolution, self.crops = dataset, resolution, crops
        self.size = round(resolution * TEN_CROP_SCALE) if crops == 10 else resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        ds, ok = self.dataset, 1
        if isinstance(ds, ImageFolder):  # load the file itself: no fallback to a neighbour
            try:
                x = load_image(ds.paths[i], self.size)
            except DECODE_ERRORS:
                x, ok = torch.zeros(3, self.size, self.size), 0
            label = ds.labels[i]
        else:
            x, label = ds[i]
        return crop_views(x, self.resolution, self.crops), int(label), ok


class ShardViews(IterableDataset):
    """Views of the samples of tar shards, in per-shard batches: DataLoader worker w takes
    every n-th of the shards `chunks`; a batch never spans two shards, and the last batch of
    each is flagged (possibly empty), so the main process knows when a chunk is complete."""

    def __init__(self, shards: Shards, resolution: int, crops: int):
        self.shards, self.resolution, self.crops = shards, resolution, crops
        self.chunks: list[int] = []
        self.batch_size = 64

    def __len__(self) -> int:
        return len(self.shards.urls)  # chunks: one per shard

    def __iter__(self):
        w, n = worker_share()
        for c in self.chunks[w::n]:
            batch: list = []
            for _, (x, label, caption) in self.shards.samples([c]):
                batch.append((crop_views(x, self.resolution, self.crops), label, caption))
                if len(batch) == self.batch_size:
                    yield c, _collate(batch), False
                    batch = []
            yield c, _collate(batch), True


def _collate(batch: list) -> tuple | None:
    if not batch:
        return None
    xs, labels, captions = zip(*batch)
    return torch.stack(xs), torch.tensor(labels), torch.ones(len(xs), dtype=torch.long), captions


def views_dataset(dataset: Dataset, data: str, resolution: int, crops: int, seed: int) -> Dataset:
    """The run's images as extraction sees them: centred (no random crop or flip), at the
    size the crop policy cuts its views from."""
    size = round(resolution * TEN_CROP_SCALE) if crops == 10 else resolution
    if isinstance(dataset, Shards):
        return ShardViews(Shards(dataset.src, size, seed=seed), resolution, crops)
    if isinstance(dataset, ImageFolder):
        base = ImageFolder(dataset.root, size, train=False, listing=dataset.listing, verify=False)
    elif isinstance(dataset, PreparedImages):
        base = PreparedImages(dataset.root, size, train=False)
    elif size != resolution:
        base = build_dataset(data, size, "train", seed=seed)
    else:
        base = dataset
    return _Views(base, resolution, crops)
