"""What the feature extraction reads and writes: each training image as the crop policy's
views (the centre; the centre and its mirror; ten-crop; the centre and random crops and
flips), decoded deterministically, with whether it could be read; how many views a folder
gets (`choose_crops`); and what the VAE makes of the views (`store_kind`,
`encode_views`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from rqgen.data import build_dataset
from rqgen.data.folder import DECODE_ERRORS, ImageFolder, crop, decode_resized
from rqgen.data.prepared import PreparedImages
from rqgen.data.shards import Shards, worker_share
from rqgen.errors import DataError
from rqgen.family import family_of
from rqgen.stage1.dqvae import unpack_codes
from rqgen.stage2.dq_sequence import DQVocab, to_sequence
from rqgen.stage2.dq_transformer import stack_sequence

TEN_CROP_SCALE = 1.125  # ten-crop cuts R×R squares out of the image resized to 1.125·R
FIXED_CROPS = (1, 2, 10)  # the deterministic policies; other counts draw random views
# A small folder gets more views per image, up to VIEW_BUDGET views in all and MAX_VIEWS
# per image: 12 photos would otherwise give stage 2 twelve code maps to learn from.
VIEW_BUDGET, MAX_VIEWS = 8192, 64


def choose_crops(dataset: Dataset) -> int:
    """Views per image for train.feature_crops=0: for image folders (prepared or not)
    min(MAX_VIEWS, VIEW_BUDGET // images), so more than 4,096 images keep the centre crop
    and counts of 2 and 10 are the centre + mirror and ten-crop policies. Bundled sets and
    tar shards keep the centre: their sources already vary (or are too big to multiply)."""
    return views_for(len(dataset)) if isinstance(dataset, (ImageFolder, PreparedImages)) else 1


def views_for(images: int) -> int:
    return max(1, min(MAX_VIEWS, VIEW_BUDGET // max(1, images)))


def random_views(img, resolution: int, crops: int, seed: list[int]) -> Tensor:
    """(crops, C, R, R): the centre square of `img` (short side R), then crops - 1 random
    squares with random flips as stage 1 draws them, from a generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    views = [crop(img, resolution)]
    views += [crop(img, resolution, random_crop=True, generator=gen) for _ in range(crops - 1)]
    return torch.stack(views)


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
    """Deterministic views of every image of the run's dataset (random ones drawn from the
    seed and the index), and whether it could be read (an unreadable file gets zeros and is
    left out of training, not replaced)."""

    def __init__(self, dataset: Dataset, resolution: int, crops: int, seed: int = 0):
        self.dataset, self.resolution, self.crops, self.seed = dataset, resolution, crops, seed
        self.size = round(resolution * TEN_CROP_SCALE) if crops == 10 else resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        ds, r, fixed = self.dataset, self.resolution, self.crops in FIXED_CROPS
        if isinstance(ds, ImageFolder):  # load the file itself: no fallback to a neighbour
            try:
                img = decode_resized(ds.paths[i], self.size)
            except DECODE_ERRORS:
                return torch.zeros(self.crops, 3, r, r), int(ds.labels[i]), 0
            x = crop(img, self.size) if fixed else random_views(img, r, self.crops, [self.seed, i])
            label = ds.labels[i]
        elif not fixed:  # prepared images (views_dataset allows nothing else)
            x, label = random_views(ds.image(i), r, self.crops, [self.seed, i]), ds.labels[i]
        else:
            x, label = ds[i]
        return (crop_views(x, r, self.crops) if fixed else x), int(label), 1


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
    """The run's images as extraction sees them: decoded without the loader's random crop or
    flip, at the size the crop policy cuts its views from."""
    size = round(resolution * TEN_CROP_SCALE) if crops == 10 else resolution
    if crops not in FIXED_CROPS and not isinstance(dataset, (ImageFolder, PreparedImages)):
        raise DataError(
            f"train.feature_crops={crops} (random views) reads image folders; for {data} "
            "use 1 (centre), 2 (centre + mirror) or 10 (ten-crop)"
        )
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
    return _Views(base, resolution, crops, seed)


def store_kind(vae: torch.nn.Module, features: bool) -> str:
    """fp16 `features` where codes are drawn, soft targets computed or stacks cut at every
    step; else the argmin codes themselves (int16), which is all hard-label training reads."""
    if not family_of(vae).residual:
        return "dq"  # the token streams of each image
    return "features" if features else "codes"


@torch.no_grad()
def encode_views(vae: torch.nn.Module, x: Tensor, kind: str) -> np.ndarray:
    """(B, V, C, R, R) images -> (B, V, *item) array in the store's dtype."""
    b, v = x.shape[:2]
    x = x.flatten(0, 1)
    if kind == "dq":
        vocab = DQVocab(vae.config.codebook_size, vae.config.coarse_size)
        codes, fine = unpack_codes(vae.encode_to_codes(x).cpu())
        seq = stack_sequence(to_sequence(codes, fine, vocab))
        pad = torch.tensor([vocab.content_pad, vocab.position_pad(True), 1])[None, :, None]
        missing = 4 * vocab.n_coarse + 4 - seq.shape[2]  # pad to the longest possible
        out = torch.cat([seq, pad.expand(len(seq), 3, missing)], 2).to(torch.int32)
    elif kind == "codes":
        out = vae.quantizer.quantize(vae.encode(x))[0].cpu()
        out = out.to(torch.int16 if vae.quantizer.codebook_size <= 2**15 else torch.int32)
    else:
        out = vae.encode(x).cpu().to(torch.float16)
    return out.reshape(b, v, *out.shape[1:]).numpy()
