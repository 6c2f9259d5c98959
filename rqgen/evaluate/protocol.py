"""Evaluation protocols: which resize chain turns reference images into squares, which rows
are kept, and which scores are computed and how, so that every number says what produced it.

    rqgen   rqgen's own loader (bicubic short side, centre crop); FID, sFID, KID, IS,
            precision/recall on a 10,000-row subset
    paper   the RQ paper's: FID against training-set statistics with the 2015 Inception
            (pytorch-fid's port; torch-fidelity holds the same weights), IS, KID; reference
            images as the official code reads them (Resize + CenterCrop)
    adm     the ADM suite (guided-diffusion `evaluations/`), as VAR, LlamaGen, RAR, TiTok
            report it: FID, sFID, IS (5,000-image splits), precision/recall (k = 3) over
            every image; reference images through center_crop_arr, or an ADM reference batch
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rqgen.data.folder import DECODE_ERRORS, ImageFolder, open_image
from rqgen.errors import DataError
from rqgen.evaluate.adm import RESIZE_CHAINS, from_uint8_nhwc
from rqgen.evaluate.manifold import NEIGHBOURS, precision_recall
from rqgen.evaluate.stats import (
    FeatureStats,
    frechet_distance,
    inception_score,
    inception_score_adm,
    kernel_distance,
)


@dataclass(frozen=True)
class Protocol:
    name: str
    resize: str  # loader | official | adm: how a folder's images become squares
    keep: int | None  # feature rows kept for KID and precision/recall (None: all)
    metrics: tuple[str, ...]  # of fd, sfd, kd, is, precision, recall
    words: str

    def describe(self) -> dict:
        """The protocol as the JSON records it next to its numbers."""
        return {
            "name": self.name,
            "resize": RESIZE_WORDS[self.resize],
            "rows_for_kid_and_precision_recall": self.keep or "all",
            "metrics": list(self.metrics),
            "about": self.words,
        }


RESIZE_WORDS = {
    "loader": "rqgen's loader: bicubic to the short side, centre crop",
    "official": "the RQ code's Resize(size) + CenterCrop(size): bilinear (antialiased), centre",
    "adm": "guided-diffusion center_crop_arr: box-halving, bicubic to the short side, centre",
}
PROTOCOLS = {
    "rqgen": Protocol(
        "rqgen",
        "loader",
        10_000,
        ("fd", "sfd", "kd", "is", "precision", "recall"),
        "every score rqgen computes; KID and precision/recall on a seeded 10,000-row subset",
    ),
    "paper": Protocol(
        "paper",
        "official",
        10_000,
        ("fd", "kd", "is"),
        "the RQ paper's: FID and IS with the 2015 Inception, against training-set statistics",
    ),
    "adm": Protocol(
        "adm",
        "adm",
        None,
        ("fd", "sfd", "is", "precision", "recall"),
        "the ADM suite: FID, sFID, IS over 5,000-image splits, improved precision/recall "
        f"(k = {NEIGHBOURS}) over all images",
    ),
}


class ResizedFiles(Dataset):
    """Image files through a protocol's resize chain -> ((3, S, S) in [-1, 1], 0)."""

    def __init__(self, paths: list[Path], size: int, chain: str):
        self.paths, self.size, self.chain = list(paths), size, RESIZE_CHAINS[chain]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            with open_image(self.paths[i]) as img:
                arr = self.chain(img, self.size)
        except DECODE_ERRORS as e:
            raise DataError(
                f"{self.paths[i]} cannot be read ({e}): remove it from the evaluation set"
            ) from e
        return from_uint8_nhwc(np.ascontiguousarray(arr)[None])[0], 0


def through_chain(data: Dataset, resolution: int, chain: str) -> tuple[Dataset, str]:
    """A dataset as a protocol reads it, and the chain it went through: an image folder's
    files through the resize chain; any other source (bundled, prepared) as its loader gives
    it, since its images are squares already."""
    if chain != "loader" and isinstance(data, ImageFolder):
        return ResizedFiles(data.paths, resolution, chain), chain
    return data, "loader"


def scores(
    protocol: Protocol,
    names: dict[str, str],
    ref: FeatureStats,
    fake: FeatureStats,
    logits: Tensor | None,
    device: torch.device | str = "cpu",
) -> dict:
    """The protocol's scores of `fake` against `ref`, under the evaluator's names; a score
    the inputs cannot give (no spatial statistics, too few rows) is null with the reason.
    The nearest-neighbour distances of precision/recall run on `device`."""
    out: dict = {}
    m = protocol.metrics
    if "fd" in m:
        out[names["fd"]] = frechet_distance(ref, fake)
    if "sfd" in m:
        if ref.spatial() is None or fake.spatial() is None:
            out[names["sfd"]] = None
            out[names["sfd"] + "_note"] = "no spatial statistics on one side (an old stats file?)"
        else:
            out[names["sfd"]] = frechet_distance(ref.spatial(), fake.spatial())
    if "kd" in m and min(len(ref.subset), len(fake.subset)) < 2:
        out[names["kd"]] = None
        out[names["kd"] + "_note"] = "needs feature rows on both sides (statistics only?)"
    elif "kd" in m:
        out[names["kd"]], out[names["kd"] + "_std"] = kernel_distance(ref, fake)
    if "is" in m and logits is not None:
        if protocol.name == "adm":
            out[names["is"]] = inception_score_adm(logits)
        else:
            out[names["is"]], out[names["is"] + "_std"] = inception_score(logits)
    if "precision" in m:
        if min(len(ref.subset), len(fake.subset)) <= NEIGHBOURS:
            for k in ("precision", "recall"):
                out[names[k]] = None
            out[names["precision"] + "_note"] = f"needs more than {NEIGHBOURS} rows per side"
        else:
            a, b = (torch.from_numpy(x.subset).to(device) for x in (ref, fake))
            out[names["precision"]], out[names["recall"]] = precision_recall(a, b)
    return out
