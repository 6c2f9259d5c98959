"""Stage-1 evaluation: reconstruction quality, coarse-to-fine quality, codebook health.

rqgen eval-vae --vae runs/vae --data bundled:photos:val --json
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from rqgen.evaluate.fid import FIDMeter, inception_fid_available
from rqgen.evaluate.recon import CodeStats, psnr, ssim
from rqgen.stage1.rqvae import RQVAE
from rqgen.utils.images import save_grid


def reference_codec(x: torch.Tensor, size: int) -> torch.Tensor:
    """The trivial codec every tokenizer should beat: area-downsample to size×size RGB,
    bicubic back up. At 8×8 it stores fewer bits than an 8×8×4 code map with K = 512."""
    small = F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def evaluate_vae(
    vae: RQVAE,
    dataset: Dataset,
    limit: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rfid: bool = True,
    progress: bool = True,
) -> dict:
    """Score `vae` on `dataset`; returns the JSON-ready dict `rqgen eval-vae` prints."""
    vae = vae.to(device).eval()
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    D, K = vae.config.code_depth, vae.config.codebook_size
    stats = CodeStats(K)
    sums = {"psnr": 0.0, "ssim": 0.0, "ref": 0.0}
    depth_sums = [0.0] * D
    n = 0
    use_fid, fid_note = inception_fid_available() if rfid else (False, "disabled")
    fid = FIDMeter().to(device) if use_fid else None
    for x, _ in tqdm(loader, desc="eval-vae", disable=not progress, leave=False):
        x = x.to(device)
        codes = vae.encode_to_codes(x)
        stats.update(codes)
        xr = vae.decode_codes(codes).clamp(-1, 1)
        sums["psnr"] += float(psnr(xr, x).sum())
        sums["ssim"] += float(ssim(xr, x).sum())
        sums["ref"] += float(psnr(reference_codec(x, codes.shape[1]), x).sum())
        for d in range(1, D + 1):  # Table 6 analog: decode Ẑ(d) for every d
            xd = xr if d == D else vae.decode_codes(codes, d).clamp(-1, 1)
            depth_sums[d - 1] += float(psnr(xd, x).sum())
        if fid is not None:
            fid.update(x, real=True)
            fid.update(xr, real=False)
        n += x.shape[0]
    result = {
        "n_images": n,
        "psnr": sums["psnr"] / n,
        "ssim": sums["ssim"] / n,
        "per_depth_psnr": [s / n for s in depth_sums],
        "codebook_usage": stats.usage(),
        "perplexity": stats.perplexity(),
        "per_depth_perplexity": stats.perplexity(per_depth=True),
        "reference_codec_psnr": sums["ref"] / n,
        "reference_codec": f"area-downsample to {codes.shape[1]}x{codes.shape[2]} RGB, bicubic up",
        "code_shape": list(vae.config.code_shape),
        "codebook_size": K,
    }
    if fid is not None:
        result["rfid"] = fid.compute()
        result["rfid_evaluator"] = fid.evaluator
    else:
        result["rfid"] = None
        result["rfid_note"] = fid_note
    return result


@torch.no_grad()
def write_reconstructions(
    vae: RQVAE, images: torch.Tensor, names: list[str], out_dir, device="cpu", batch_size: int = 32
) -> list[Path]:
    """For each image write NAME_pair.png (original | reconstruction) and
    NAME_coarse_to_fine.png (original, then G(Ẑ(1)) ... G(Ẑ(D)): the Fig. 5 analog)."""
    out_dir = Path(out_dir)
    vae = vae.to(device).eval()
    D = vae.config.code_depth
    upscale = max(1, 128 // vae.config.resolution)  # tiny images are enlarged for viewing
    written = []
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].to(device)
        codes = vae.encode_to_codes(x)
        steps = [vae.decode_codes(codes, d).clamp(-1, 1) for d in range(1, D + 1)]
        for i, name in enumerate(names[s : s + batch_size]):
            pair = torch.stack([x[i], steps[-1][i]])
            strip = torch.stack([x[i]] + [st[i] for st in steps])
            written.append(save_grid(pair, out_dir / f"{name}_pair.png", nrow=2, upscale=upscale))
            written.append(
                save_grid(
                    strip, out_dir / f"{name}_coarse_to_fine.png", nrow=D + 1, upscale=upscale
                )
            )
    return written
