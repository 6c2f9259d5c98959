"""Stage-1 evaluation: reconstruction quality, coarse-to-fine quality, codebook health.

rqgen eval-vae --vae runs/vae --data bundled:photos:val --json
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from rqgen.errors import DataError, RqgenError
from rqgen.evaluate.generation import Evaluator, build_evaluator
from rqgen.evaluate.recon import SSIM_WORDS, CodeStats, psnr, ssim
from rqgen.evaluate.stats import StatsAccumulator, frechet_distance
from rqgen.family import family_of
from rqgen.stage1.dqvae import DQVAE, unpack_codes
from rqgen.stage1.rqvae import RQVAE
from rqgen.utils.images import (
    error_map,
    labelled_row,
    save_grid,
    save_labelled_grid,
    save_pil,
    stack_rows,
)


def sequence_codes(packed: torch.Tensor) -> torch.Tensor:
    """A DQ code map's codes, each coarse code once: (N_tokens, 1) for code statistics."""
    codes, fine = unpack_codes(packed)
    fine_cells = fine.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return torch.cat([codes[:, ::2, ::2][~fine], codes[fine_cells]])[:, None]


GRANULARITY_LEGEND = "red tint, 4 boxes: fine region (4 codes); plain box: coarse (1 code)"


def granularity_overlay(x: torch.Tensor, fine_mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, 3, R, R) images enlarged `scale`× with the code grid drawn on: one box per coarse
    region, four per fine region (fine regions tinted red)."""
    big = F.interpolate(x, scale_factor=scale, mode="nearest")
    B, _, S, _ = big.shape
    hc = fine_mask.shape[-1]
    cell = S // hc
    tint = fine_mask.float().repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, None]
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    big = torch.where(tint > 0, 0.75 * big + 0.25 * red, big)
    idx = torch.arange(S)
    coarse_line = (idx % cell == 0) | (idx % cell == cell - 1)
    half_line = (idx % (cell // 2) == 0) & ~coarse_line
    lines = coarse_line[None, :] | coarse_line[:, None]
    half = (half_line[None, :] | half_line[:, None])[None] & (tint[:, 0] > 0)
    mask = (lines[None] | half)[:, None]
    return torch.where(mask, torch.ones_like(big), big)


def reference_codec(x: torch.Tensor, size: int) -> torch.Tensor:
    """The trivial codec every tokenizer should beat: area-downsample to size×size RGB,
    bicubic back up. At 8×8 it stores fewer bits than an 8×8×4 code map with K = 512."""
    small = F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def evaluate_vae(
    vae: RQVAE | DQVAE,
    dataset: Dataset,
    limit: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rfid: bool = True,
    progress: bool = True,
    evaluator: Evaluator | None = None,
    lpips: torch.nn.Module | None = None,
    keep_features: bool = False,
    on_batch=None,
) -> dict:
    """Score `vae` on `dataset`; returns the JSON-ready dict `rqgen eval-vae` prints.

    rFID is the Fréchet distance between the evaluator's features of the images and of
    their reconstructions (Inception from local weights unless `evaluator` is given; null
    with the reason when it cannot run); LPIPS the mean VGG distance when `lpips` is given.
    `keep_features` keeps every feature row (result["_features"]: (images, reconstructions)
    FeatureStats); `on_batch(x, xr)` sees each batch and its reconstruction."""
    vae = vae.to(device).eval()
    streamed = isinstance(dataset, IterableDataset)  # tar shards: no length, read in order
    if limit is not None and not streamed and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    D, K = vae.config.code_depth, vae.config.codebook_size
    dq = not family_of(vae).residual  # dynamic granularity: fine mask, variable length
    stats = CodeStats(K)
    tokens = fine = 0.0
    sums = {"psnr": 0.0, "ssim": 0.0, "ref": 0.0, "unquantized": 0.0, "lpips": 0.0}
    depth_sums = [0.0] * D
    n = 0
    fid_note = "disabled (--no-rfid)"
    if rfid and evaluator is None:
        try:
            evaluator = build_evaluator("inception", device)
        except RqgenError as e:  # the weights or torch-fidelity missing
            fid_note = str(e)
    keep = None if keep_features else 0
    real, recon = StatsAccumulator(keep), StatsAccumulator(keep)
    for x, _ in tqdm(loader, desc="eval-vae", disable=not progress, leave=False):
        if limit is not None and streamed:
            if n >= limit:
                break
            x = x[: limit - n]
        x = x.to(device)
        if dq:
            codes = vae.encode_to_codes(x)
            stats.update(sequence_codes(codes))
            tokens += float(vae.tokens_per_image(codes).sum())
            fine += float(unpack_codes(codes)[1].float().flatten(1).mean(1).sum())
        else:  # one encoder pass for the codes and for the unquantized decode
            z = vae.encode(x)
            codes = vae.quantizer.quantize(z)[0]
            sums["unquantized"] += float(psnr(vae.decode(z).clamp(-1, 1), x).sum())
            stats.update(codes)
        xr = vae.decode_codes(codes).clamp(-1, 1)
        sums["psnr"] += float(psnr(xr, x).sum())
        sums["ssim"] += float(ssim(xr, x).sum())
        sums["ref"] += float(psnr(reference_codec(x, codes.shape[1]), x).sum())
        for d in range(1, D + 1):  # Table 6 analog: decode Ẑ(d) for every d
            xd = xr if d == D else vae.decode_codes(codes, d).clamp(-1, 1)
            depth_sums[d - 1] += float(psnr(xd, x).sum())
        if evaluator is not None and rfid:
            real.update(evaluator.features(x))
            recon.update(evaluator.features(xr))
        if lpips is not None:
            sums["lpips"] += float(lpips(xr, x).sum())
        if on_batch is not None:
            on_batch(x, xr)
        n += x.shape[0]
    if n == 0:
        raise DataError("the data gave no readable image to evaluate: check --data")
    result = {
        "n_images": n,
        "psnr": sums["psnr"] / n,
        "ssim": sums["ssim"] / n,
        "ssim_convention": SSIM_WORDS,
        "lpips": sums["lpips"] / n if lpips is not None else None,
        "per_depth_psnr": [s / n for s in depth_sums],
        **({} if dq else {"unquantized_psnr": sums["unquantized"] / n}),
        "codebook_usage": stats.usage(),
        "per_depth_usage": stats.usage(per_depth=True),
        "perplexity": stats.perplexity(),
        "per_depth_perplexity": stats.perplexity(per_depth=True),
        "reference_codec_psnr": sums["ref"] / n,
        "reference_codec": f"area-downsample to {codes.shape[1]}x{codes.shape[2]} RGB, bicubic up",
        "code_shape": list(vae.config.code_shape),
        "codebook_size": K,
        "tokens_per_image": tokens / n if dq else vae.config.code_shape[0] ** 2 * D,
    }
    if dq:  # a DQ code map is the fine grid × (code, granularity)
        result["fine_fraction"] = fine / n
        result["coarse_grid"] = vae.config.coarse_size
        result["fine_grid"] = vae.config.fine_size
        result["router"] = vae.config.router
    if evaluator is not None and rfid:
        name = evaluator.score_names()["fd"]
        a, b = real.stats(evaluator.name, "images"), recon.stats(evaluator.name, "recons")
        result["r" + name] = frechet_distance(a, b)
        result["rfid_evaluator"] = evaluator.name
        if keep_features:
            result["_features"] = (a, b)
    else:
        result["rfid"] = None
        result["rfid_note"] = fid_note
    return result


ERROR_GAIN = 4


def coarse_to_fine_strip(x: torch.Tensor, partials: list[torch.Tensor], upscale: int):
    """Image x, then the decodings of its partial sums Ẑ(1) ... Ẑ(D) captioned with their
    PSNR; under each, |x - decoding| magnified ERROR_GAIN times (black: exact)."""
    scores = psnr(torch.stack(partials), x.expand(len(partials), *x.shape)).tolist()
    labels = ["input"] + [
        f"depth 1-{d}  {p:.1f} dB" if d > 1 else f"depth 1  {p:.1f} dB"
        for d, p in enumerate(scores, 1)
    ]
    errors = [error_map(x, x_hat, ERROR_GAIN) for x_hat in [x, *partials]]
    return stack_rows(
        [
            labelled_row(torch.stack([x, *partials]), labels, upscale),
            labelled_row(
                torch.stack(errors), [f"error x{ERROR_GAIN}"] + [""] * len(partials), upscale
            ),
        ]
    )


@torch.no_grad()
def write_reconstructions(
    vae: RQVAE | DQVAE,
    images: torch.Tensor,
    names: list[str],
    out_dir,
    device="cpu",
    batch_size: int = 32,
) -> list[Path]:
    """For each image write NAME_pair.png (original | reconstruction) and, for an RQ-VAE,
    NAME_coarse_to_fine.png (original, then G(Ẑ(1)) ... G(Ẑ(D)) with their PSNR: the Fig. 5
    analog; under them each decoding's error, magnified, where refinements too fine to see
    in the images show); for a DQ-VAE, NAME_granularity.png (the code grid drawn on the
    original and on the reconstruction)."""
    out_dir = Path(out_dir)
    vae = vae.to(device).eval()
    D = vae.config.code_depth
    upscale = max(1, 128 // vae.config.resolution)  # tiny images are enlarged for viewing
    written = []
    dq = not family_of(vae).residual
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].to(device)
        codes = vae.encode_to_codes(x)
        steps = [vae.decode_codes(codes, d).clamp(-1, 1) for d in range(1, D + 1)]
        if dq:
            fine = unpack_codes(codes)[1].cpu()
            shown = granularity_overlay(
                torch.cat([x.cpu(), steps[-1].cpu()]), torch.cat([fine, fine]), upscale
            )
        for i, name in enumerate(names[s : s + batch_size]):
            pair = torch.stack([x[i], steps[-1][i]])
            if dq:
                pair_file = out_dir / f"{name}_pair.png"
                written.append(save_grid(pair, pair_file, nrow=2, upscale=upscale))
                both = torch.stack([shown[i], shown[len(x) + i]])
                written.append(
                    save_labelled_grid(
                        both,
                        out_dir / f"{name}_granularity.png",
                        ["input", "reconstruction"],
                        legend=GRANULARITY_LEGEND,
                    )
                )
                continue
            written.append(save_grid(pair, out_dir / f"{name}_pair.png", nrow=2, upscale=upscale))
            strip = coarse_to_fine_strip(x[i], [st[i] for st in steps], upscale)
            written.append(save_pil(strip, out_dir / f"{name}_coarse_to_fine.png"))
    return written
