"""What the feature extraction reads and writes: each training image as the crop policy's
views (the centre; the centre and its mirror; ten-crop), decoded deterministically, with
whether it could be read; and what the VAE makes of the views (`store_kind`,
`encode_views`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from rqgen.data import build_dataset
from rqgen.data.folder import DECODE_ERRORS, ImageFolder, load_image
from rqgen.data.prepared import PreparedImages
from rqgen.data.shards import Shards, worker_share
from rqgen.family import family_of
from rqgen.stage1.dqvae import unpack_codes
from rqgen.stage2.dq_sequence import DQVocab, to_sequence
from rqgen.stage2.dq_transformer import stack_sequence

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


def store_kind(vae: torch.nn.Module, soft_labels: bool, stochastic_codes: bool) -> str:
    """fp16 features where codes are drawn or soft targets computed at every step; else the
    argmin codes themselves (int16), which is all hard-label training reads."""
    if not family_of(vae).residual:
        return "dq"  # the token streams of each image
    return "features" if soft_labels or stochastic_codes else "codes"


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
