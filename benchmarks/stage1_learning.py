"""How fast does the tiny32 autoencoder learn? One factor changed at a time (#16 item 1).

Trains the tiny32 encoder/decoder in process on the bundled photos (fresh crops every epoch,
as `train-vae` draws them), with or without the residual quantizer, and scores the mean
per-image PSNR of the 256 fixed held-out crops (bundled:photos:val) at fixed steps.

    python benchmarks/stage1_learning.py --variants baseline adam99 --steps 300
    python benchmarks/stage1_learning.py --list

Each variant is a set of changes against the baseline (the tiny32 preset as it was before
this study); results are appended to benchmarks/results/stage1_learning.json (one record per
variant and seed) and the table is rewritten from all records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, write_results  # noqa: E402

from rqgen.configs import PRESETS  # noqa: E402
from rqgen.data.bundled import BundledPhotos  # noqa: E402
from rqgen.evaluate.recon import psnr  # noqa: E402
from rqgen.stage1.blocks import zero_init_residual_branches  # noqa: E402
from rqgen.stage1.rqvae import RQVAE  # noqa: E402
from rqgen.train.trainer import scheduled_lr  # noqa: E402

# name -> (description, changes). Changes: model.* / train.* fields of the tiny32 preset,
# or `quantize` (False: decode the encoder output directly).
VARIANTS: dict[str, tuple[str, dict]] = {
    "baseline": ("tiny32 as before: Adam(0.5, 0.9) lr 4e-4, warm-up 50, no quantizer", {}),
    "baseline_rq4": ("the same with the RQ 8x8x4 quantizer", {"quantize": True}),
    "adam99": ("Adam betas (0.9, 0.99)", {"train.beta1": 0.9, "train.beta2": 0.99}),
    "lr1e-3": ("lr 1e-3", {"train.lr": 1e-3}),
    "lr2e-3": ("lr 2e-3", {"train.lr": 2e-3}),
    "adam99_lr1e-3": (
        "Adam (0.9, 0.99), lr 1e-3",
        {"train.beta1": 0.9, "train.beta2": 0.99, "train.lr": 1e-3},
    ),
    "adam99_lr1e-3_rq4": (
        "Adam (0.9, 0.99), lr 1e-3, with the RQ 8x8x4 quantizer (K 512)",
        {"train.beta1": 0.9, "train.beta2": 0.99, "train.lr": 1e-3, "quantize": True},
    ),
    "no_out_norm": (
        "no GroupNorm before the encoder's and the decoder's last conv",
        {"patch": "no_out_norm"},
    ),
    "no_norm": ("no GroupNorm anywhere", {"patch": "no_norm"}),
    "zero_res": (
        "residual branches start at zero (last conv of each ResBlock, attention output)",
        {"patch": "zero_res"},
    ),
    "adam99_lr2e-3": (
        "Adam (0.9, 0.99), lr 2e-3",
        {"train.beta1": 0.9, "train.beta2": 0.99, "train.lr": 2e-3},
    ),
    "adam99_lr2e-3_cosine": (
        "Adam (0.9, 0.99), lr 2e-3, cosine decay to 0 at the last step",
        {"train.beta1": 0.9, "train.beta2": 0.99, "train.lr": 2e-3, "train.lr_schedule": "cosine"},
    ),
    "adam99_lr1e-3_cosine_zero_res": (
        "Adam (0.9, 0.99), lr 1e-3, cosine decay, residual branches start at zero",
        {
            "train.beta1": 0.9,
            "train.beta2": 0.99,
            "train.lr": 1e-3,
            "train.lr_schedule": "cosine",
            "patch": "zero_res",
        },
    ),
    "adam99_lr1e-3_cosine_zero_res_rq4": (
        "Adam (0.9, 0.99), lr 1e-3, cosine decay, residual branches start at zero, RQ 8x8x4",
        {
            "train.beta1": 0.9,
            "train.beta2": 0.99,
            "train.lr": 1e-3,
            "train.lr_schedule": "cosine",
            "patch": "zero_res",
            "quantize": True,
        },
    ),
    "adam99_lr1e-3_cosine": (
        "Adam (0.9, 0.99), lr 1e-3, cosine decay to 0 at the last step",
        {"train.beta1": 0.9, "train.beta2": 0.99, "train.lr": 1e-3, "train.lr_schedule": "cosine"},
    ),
    "adam99_lr1e-3_no_out_norm": (
        "Adam (0.9, 0.99), lr 1e-3, no GroupNorm before the last convs",
        {"train.beta1": 0.9, "train.beta2": 0.99, "train.lr": 1e-3, "patch": "no_out_norm"},
    ),
}
# tiny32 since the study above, then with the linear patch shortcut (PatchShortcut)
_TINY32_NOW = {"train.beta1": 0.9, "train.beta2": 0.99, "train.lr": 1e-3,
               "train.lr_schedule": "cosine", "model.zero_init_residual": True}  # fmt: skip
VARIANTS |= {
    "patch_shortcut": (
        "Adam (0.9, 0.99), lr 1e-3, cosine, zero-init residuals, + linear patch shortcut",
        {**_TINY32_NOW, "model.patch_shortcut": True},
    ),
    "patch_shortcut_rq4": (
        "the same with the RQ 8x8x4 quantizer",
        {**_TINY32_NOW, "model.patch_shortcut": True, "quantize": True},
    ),
}


def patch(model: RQVAE, name: str | None) -> RQVAE:
    """Architecture changes tried before they became config fields."""
    if name == "no_out_norm":
        model.encoder.norm_out = torch.nn.Identity()
        model.decoder.norm_out = torch.nn.Identity()
    elif name == "zero_res":  # now model.zero_init_residual
        zero_init_residual_branches(model)
    elif name == "no_norm":
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if isinstance(child, torch.nn.GroupNorm):
                    setattr(parent, child_name, torch.nn.Identity())
    return model


# tiny32 before this study; every variant is a change against it
BASELINE = {"model.zero_init_residual": False, "train.lr": 4e-4, "train.beta1": 0.5,
            "train.beta2": 0.9, "train.lr_schedule": "constant"}  # fmt: skip


def apply(changes: dict):
    exp = PRESETS["tiny32"]()
    model, train = exp.model, exp.train
    for key, value in {**BASELINE, **changes}.items():
        if key.startswith("model."):
            model = replace(model, **{key[6:]: value})
        elif key.startswith("train."):
            train = replace(train, **{key[6:]: value})
    return model, train, bool(changes.get("quantize", False))


def val_psnr(model: RQVAE, val: torch.Tensor, quantize: bool) -> float:
    model.eval()
    with torch.no_grad():
        total = 0.0
        for s in range(0, len(val), 64):
            x = val[s : s + 64]
            y = model(x).reconstruction if quantize else model.decode(model.encode(x))
            total += float(psnr(y.clamp(-1, 1), x).sum())
    model.train()
    return total / len(val)


def run(name: str, steps: int, every: int, seed: int) -> dict:
    desc, changes = VARIANTS[name]
    mcfg, tcfg, quantize = apply(changes)
    torch.manual_seed(seed)
    model = patch(RQVAE(mcfg), changes.get("patch"))
    opt = torch.optim.Adam(
        model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.adam_eps
    )
    train = BundledPhotos(mcfg.resolution, "train", seed=seed)
    val = torch.stack([x for x, _ in BundledPhotos(mcfg.resolution, "val")])
    batch = tcfg.batch_size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    curve, t0 = {}, time.process_time()
    for step in range(1, steps + 1):
        pos = (step - 1) * batch
        epoch, start = divmod(pos, len(train))
        if start == 0 and epoch:
            train.set_epoch(epoch)
        x = torch.stack([train[int(i)][0] for i in order[start : start + batch]])
        lr = scheduled_lr(step - 1, tcfg.lr, tcfg.warmup_steps, steps, tcfg.lr_schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        if quantize:
            out = model(x)
            loss = F.mse_loss(out.reconstruction, x) + out.commitment_loss
        else:
            loss = F.mse_loss(model.decode(model.encode(x)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve[step] = round(val_psnr(model, val, quantize), 3)
            print(f"{name} seed {seed} step {step}: {curve[step]:.2f} dB", flush=True)
    return {
        "variant": name,
        "description": desc,
        "seed": seed,
        "batch": batch,
        "steps": steps,
        "curve": curve,
        "cpu_s_per_step": round((time.process_time() - t0) / steps, 3),
    }


def raw_patch_rq(updates: int = 200, seed: int = 0) -> dict:
    """No network: residual quantization of the raw 4×4 pixel patches (48 values) of the
    training crops, K 512, EMA codebook updates on 64 crops each, scored on the held-out
    crops at D = 1, 2, 4, 8: what a linear patch path alone gives tiny32's code map."""
    from rqgen.quantize import ResidualQuantizer

    torch.manual_seed(seed)
    train = BundledPhotos(32, "train", length=8192, seed=seed)
    x = torch.stack([train[i][0] for i in range(len(train))])
    val = torch.stack([v for v, _ in BundledPhotos(32, "val")])
    patches = lambda im: F.pixel_unshuffle(im, 4).permute(0, 2, 3, 1)  # noqa: E731
    out = {}
    for depth in (1, 2, 4, 8):
        q = ResidualQuantizer(48, 512, depth).train()
        for _ in range(updates):
            q(patches(x[torch.randint(0, len(x), (64,))]))
        with torch.no_grad():
            y = F.pixel_shuffle(q.eval()(patches(val)).quantized.permute(0, 3, 1, 2), 4)
        out[depth] = round(float(psnr(y.clamp(-1, 1), val).mean()), 3)
        print(f"raw-patch RQ, D = {depth}: {out[depth]:.2f} dB", flush=True)
    return {"updates": updates, "seed": seed, "psnr_by_depth": out}


def table(records: list[dict], raw: dict | None = None) -> str:
    """One table per run length: mean per-image PSNR (dB) of the 256 held-out crops."""
    out = [
        "tiny32's encoder and decoder trained in process on bundled:photos (batch 64, fresh "
        "crops each epoch, MSE; + 0.25·commitment with the quantizer), scored on the 256 "
        "fixed crops of the held-out photos (bundled:photos:val): mean per-image PSNR (dB). "
        "Every variant is a change against the baseline, tiny32 before this study. One seed "
        "per row; rows accumulate over invocations (the command above is the last one; each "
        "variant ran as `--variants NAME --steps N`). For scale: the bicubic 8×8 codec "
        "scores 29.32 dB on these crops (rate_distortion.md).",
    ]
    if raw:
        cells = ", ".join(f"D = {d}: {v:.2f}" for d, v in raw["psnr_by_depth"].items())
        out += ["", f"No network (`--raw-patch-rq`): residual quantization of the raw 4×4 pixel "
                f"patches, K 512, {raw['updates']} EMA updates of 64 crops, seed {raw['seed']}: "
                f"{cells} dB. The linear patch shortcut (`patch_shortcut` variants) starts tiny32 "
                "from this codec."]  # fmt: skip
    for length in sorted({r["steps"] for r in records}):
        rows = [r for r in records if r["steps"] == length]
        steps = sorted({int(s) for r in rows for s in r["curve"]})
        out += ["", f"Runs of {length} steps:", "",
                "| variant | change | seed | " + " | ".join(f"step {s}" for s in steps) + " |",
                "|---|---|---|" + "---|" * len(steps)]  # fmt: skip
        for r in rows:
            cells = [f"{float(r['curve'].get(str(s), r['curve'].get(s, 'nan'))):.2f}"
                     for s in steps]  # fmt: skip
            out.append(f"| {r['variant']} | {r['description']} | {r['seed']} | "
                       + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(out)


def save(records: list[dict], raw: dict | None) -> None:
    write_results("stage1_learning", table(records, raw), {"records": records, "raw_patch_rq": raw})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--raw-patch-rq", action="store_true", help="also score the no-network codec")
    args = ap.parse_args()
    if args.list:
        for k, (d, _) in VARIANTS.items():
            print(f"{k:20s} {d}")
        return
    path = RESULTS / "stage1_learning.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    records, raw = saved.get("records", []), saved.get("raw_patch_rq")
    if args.raw_patch_rq:
        raw = raw_patch_rq()
    for name in args.variants:
        for seed in args.seeds:
            rec = run(name, args.steps, args.every, seed)
            records = [
                r
                for r in records
                if (r["variant"], r["seed"], r["steps"]) != (name, seed, args.steps)
            ]
            records.append(rec)
            save(records, raw)  # after each run: a long study keeps what it has measured
    save(records, raw)  # also with no run


if __name__ == "__main__":
    main()
