"""A new codebook for a trained RQ-VAE, fit at frozen weights (`rqgen refit-codebook`).

Why: training with one shared codebook from the start drags the autoencoder down against
four separate codebooks at equal bits, while the autoencoder trained with separate codebooks
keeps most of its quality when they are replaced afterwards by one shared, scaled codebook
fit to its latents; fine-tuning encoder and decoder on that codebook lost more than it
gained (benchmarks/results/depth_scale_1000steps.md, README). The same refit serves
another K or depth.

The new quantizer starts over as in training (data init on the first batch, then one EMA
update per batch, with restarts) on the encoder's latents of random training crops, then a
few least-squares steps on the final error refine it; encoder and decoder are copied
unchanged. Single process: it only encodes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from rqgen.configs.validate import check_fields
from rqgen.data import build_dataset
from rqgen.errors import ConfigError, DataError
from rqgen.stage1.rqvae import RQVAE

# the model.* settings a refit may change: the quantizer's alone
QUANTIZER_SETTINGS = (
    "codebook_size",
    "code_depth",
    "shared_codebook",
    "depth_scale",
    "decay",
    "restart_unused_codes",
)


def refit_codebook(
    vae: RQVAE,
    data: str,
    changes: dict,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    refine: int = 10,
) -> RQVAE:
    """`vae` with a new quantizer (its settings changed by `changes`, model.* keys without
    the prefix) fit by `steps` EMA updates on batches of `data`, then `refine` iterations
    of the least-squares refinement (quantize/codebook.py) where its system is small enough
    (`ResidualQuantizer.refinable`); `vae` is not modified."""
    if not isinstance(vae, RQVAE):
        raise ConfigError(f"refit-codebook takes an RQ-VAE, not a {vae.model_type}")
    other = sorted(set(changes) - set(QUANTIZER_SETTINGS))
    if other:
        allowed = ", ".join(f"model.{k}" for k in QUANTIZER_SETTINGS)
        raise ConfigError(f"model.{other[0]} is not a quantizer setting: a refit changes {allowed}")
    config = dataclasses.replace(vae.config, **changes)
    check_fields(config, "model")  # types and ranges, as train-vae checks them
    model = RQVAE(config).to(device).eval()
    refine = refine if model.quantizer.refinable else 0
    kept = {k: v for k, v in vae.state_dict().items() if not k.startswith("quantizer.")}
    missing, _ = model.load_state_dict(kept, strict=False)
    assert all(k.startswith("quantizer.") for k in missing), missing  # same autoencoder

    images = build_dataset(data, config.resolution, "train")
    if len(images) < batch_size:
        raise DataError(
            f"{data} has {len(images)} training images, fewer than a batch of {batch_size}: "
            "give a smaller --batch-size"
        )
    draw = torch.Generator().manual_seed(seed)
    loader = DataLoader(images, batch_size, shuffle=True, drop_last=True, generator=draw)
    torch.manual_seed(seed)  # the data init's and the restarts' draws
    quantizer = model.quantizer.train()
    batches = _batches(loader, steps + (REFINE_BATCHES if refine else 0))
    with torch.no_grad():
        fit = itertools.islice(batches, steps)
        for x in tqdm(fit, desc="refit-codebook", total=steps, disable=not progress):
            quantizer(model.encode(x.to(device)))
        if refine:  # the final error of the latents of further batches
            z = torch.cat([model.encode(x.to(device)).flatten(0, -2) for x in batches])
            quantizer.refine(z, refine)
    return model.eval()


REFINE_BATCHES = 64  # whose latents the least-squares refinement fits


def _batches(loader: DataLoader, n: int) -> Iterator[Tensor]:
    """n batches of images, passing over the loader again as often as needed."""
    while n > 0:
        for x, _ in loader:
            yield x
            n -= 1
            if n == 0:
                return
