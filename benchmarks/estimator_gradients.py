"""How far the rotation trick's gradient is from straight-through's, per code depth D.

In the forward pass the estimators all give Ẑ; in the backward pass straight-through hands
the decoder's gradient g to z unchanged, the rotation trick hands it λRᵀg, R the rotation that
carries z's direction onto Ẑ's, and rotation_per_depth the mean over depths of the rotations
carrying each residual onto its code (estimators.py). In RQ Ẑ = Ẑ(D) approaches z as D
grows, so the first should agree with straight-through more the deeper the stack; a
residual and its code stay apart at every depth, so the second need not. Measured on the
rate-distortion study's tiny32 RQ 8×8×D models (straight-through trained; trained here
when their folders are missing): the gradient of the reconstruction MSE over the held-out
crops with respect to z under each estimator, compared per vector and over the batch; and
how much of each descent step grows or shrinks z, against the commitment loss's pull
towards the shorter partial sums Ẑ(d), which only the reconstruction gradient resists.

    python benchmarks/estimator_gradients.py --steps 1000 --seeds 0 1 2

Results: benchmarks/results/estimator_gradients[_1000steps].md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from rate_distortion import (  # noqa: E402
    VARIANTS,
    cell,
    parse_args,
    results_name,
    run_dir,
    train_all,
)

from rqgen.data import build_dataset  # noqa: E402
from rqgen.quantize.estimators import cross  # noqa: E402
from rqgen.stage1.rqvae import RQVAE  # noqa: E402

MODELS = ["RQ 8x8x1", "RQ 8x8x2", "RQ 8x8x4", "RQ 8x8x8"]
# an estimator's columns: (name, suffix) around its tag
COLUMNS = [("cos_grad", "_median"), ("cos_grad", "_p10"), ("cos_grad", "_batch"),
           ("norm_ratio_grad", ""), ("outward", "")]  # fmt: skip


def outward(step: torch.Tensor, z: torch.Tensor) -> float:
    """How much of a descent step (N, dim) points along z, away from 0: Σ step·ẑ / Σ ‖step‖.
    Positive grows z, negative shrinks it; the EMA codebook follows z's scale either way."""
    return ((step * F.normalize(z, dim=-1)).sum() / step.norm(dim=-1).sum()).item()


def agreement(vae: RQVAE, images: torch.Tensor) -> dict:
    """Per-vector and whole-batch agreement of the rotation trick's gradient on z with
    straight-through's, and how close Ẑ is to z (cosine and norm ratio, medians)."""
    z = vae.encode(images).detach()
    flat = z.reshape(-1, z.shape[-1])
    _, partials, _ = vae.quantizer._residual_quantize(flat)
    zhat = partials[-1]
    grads = {}
    for name in ("ste", "rotation", "rotation_per_depth"):
        leaf = flat.clone().requires_grad_(True)
        out = cross(name, leaf, zhat, partials).reshape(z.shape)
        F.mse_loss(vae.decode(out), images).backward()
        grads[name] = leaf.grad
    g = grads["ste"]
    out = {
        "cos_z_zhat": F.cosine_similarity(flat, zhat, dim=-1).median().item(),
        "norm_ratio_zhat_z": (zhat.norm(dim=-1) / flat.norm(dim=-1)).median().item(),
        "outward_ste": outward(-g, flat),
        # Eq. 7's pull on z (all depths): −∇ Σ_d ||z − sg[Ẑ(d)]||²
        "outward_commit": outward(-2 * (flat[None] - partials).sum(0), flat),
    }
    for name in ("rotation", "rotation_per_depth"):
        h, tag = grads[name], "" if name == "rotation" else "_per_depth"
        per = F.cosine_similarity(g, h, dim=-1)
        whole = F.cosine_similarity(g.flatten(), h.flatten(), dim=0)
        out |= {
            f"cos_grad{tag}_median": per.median().item(),
            f"cos_grad{tag}_p10": per.quantile(0.1).item(),
            f"cos_grad{tag}_batch": whole.item(),
            f"norm_ratio_grad{tag}": (h.norm() / g.norm()).item(),
            f"outward{tag}": outward(-h, flat),
        }
    return out


def main() -> None:
    args = parse_args(__doc__, 150, "benchmarks/work/rate_distortion")  # that study's runs
    seeds = args.seeds or [args.seed]
    wanted = [m for m in MODELS if not args.only or m in args.only]
    train_all({m: ("tiny32", VARIANTS[m]) for m in wanted}, args, seeds, keep_models=wanted)
    val = build_dataset(args.val_data, 32, "val")
    images = torch.stack([val[i][0] for i in range(len(val))])
    runs = {}
    for m in wanted:
        for s in seeds:
            vae = RQVAE.from_pretrained(run_dir(args, m, s)).eval()
            runs[m, s] = agreement(vae, images)
            print(m, s, runs[m, s], flush=True)
    rows = [
        "| model | estimator | cos(z, Ẑ), median | ‖Ẑ‖/‖z‖, median | cos(g, g_ste) per "
        "vector, median | same, 10th percentile | same, whole batch | ‖g‖/‖g_ste‖, whole batch "
        "| outward share of −g | same, straight-through | same, commitment pull |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in wanted:
        for tag, name in (("", "rotation"), ("_per_depth", "rotation_per_depth")):
            cols = ["cos_z_zhat", "norm_ratio_zhat_z"]
            cols += [f"{c}{tag}{end}" for c, end in COLUMNS] + ["outward_ste", "outward_commit"]
            cells = [cell([runs[m, s][c] for s in seeds], 3) for c in cols]
            rows.append(f"| {m} | {name} | " + " | ".join(cells) + " |")
    body = "\n".join([
        f"tiny32 RQ 8×8×D (K = 512, straight-through trained, {args.steps} steps at batch 64), "
        f"seeds {', '.join(map(str, seeds))}; gradients of the reconstruction MSE over the "
        f"{len(images)} held-out crops ({args.val_data}) with respect to the encoder's output "
        "z, under each estimator at the same weights. Means ± half-width of the 95% "
        "Student-t interval over seeds. Outward share: Σ step·ẑ / Σ ‖step‖ over the crops' "
        "vectors for the descent step −g (positive grows z), and for the commitment loss's "
        "pull towards every Ẑ(d) (Eq. 7).",
        "",
        *rows,
    ])  # fmt: skip
    data = {"steps": args.steps, "seeds": seeds, "runs": [
        {"model": m, "seed": s, **runs[m, s]} for m in wanted for s in seeds]}  # fmt: skip
    print(write_results(results_name("estimator_gradients", args), body, data))


if __name__ == "__main__":
    main()
