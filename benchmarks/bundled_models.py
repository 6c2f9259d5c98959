"""Train the models shipped inside the package, write them as fp16 safetensors with their
cards, and record how well they do.

    python benchmarks/bundled_models.py                 # both, ~20 minutes on 2 CPU cores
    python benchmarks/bundled_models.py --only photos   # one of them

`bundled:digits`: the digits demo's two stages exactly as `make demo` trains them (the
tiny32 RQ-VAE without the patch shortcut, then the class-conditional ar-tiny), with the
demo's classifier scores. Weights are rounded to fp16 (the VAE's codebook and the
transformer's copy of it alike, so the pair's fingerprint still matches) and loaded back
into fp32 models. The results: benchmarks/results/bundled_models.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from rqgen.card import record_evaluation  # noqa: E402
from rqgen.configs import load_vae_experiment  # noqa: E402
from rqgen.data import build_dataset  # noqa: E402
from rqgen.demo import DEMO_TOP_K, run_demo  # noqa: E402
from rqgen.evaluate.digits import load_or_train, score_digits  # noqa: E402
from rqgen.evaluate.vae import evaluate_vae  # noqa: E402
from rqgen.hub import BUNDLED  # noqa: E402
from rqgen.pipeline import RQPipeline  # noqa: E402
from rqgen.stage1 import load_vae  # noqa: E402
from rqgen.stage2.guidance import SamplingConfig  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer, codebook_fingerprint  # noqa: E402
from rqgen.train.vae import train_vae  # noqa: E402
from rqgen.utils.paths import cache_dir  # noqa: E402

PHOTOS_STEPS = 400  # of the preset's 1000: 13 minutes here instead of 32
KEEP = ("classes", "conditioning", "train", "data", "step", "val_loss")  # card facts kept


def replace(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    return out


def ship_digits(work: Path) -> dict:
    metrics = run_demo(work, device="cpu")
    vae = load_vae(work / "vae").half().float()  # the values fp16 can hold
    model = RQTransformer.from_pretrained(work / "ar").half().float()
    model.config.vae_fingerprint = codebook_fingerprint(vae.quantizer.codebook)
    assert torch.equal(model.codebook, vae.quantizer.codebook)
    meta = json.loads((work / "ar" / "config.json").read_text())
    out = replace(BUNDLED / "digits")
    made = {"command": "python benchmarks/bundled_models.py (the digits demo's two stages)"}
    vae_meta = json.loads((work / "vae" / "config.json").read_text())
    vae_meta = {k: v for k, v in vae_meta.items() if k in KEEP}
    vae.half().save_pretrained(out / "vae", **vae_meta, **made, load_as="bundled:digits/vae")
    meta = {k: meta[k] for k in KEEP if k in meta}
    model.half().save_pretrained(out, vae="vae", **meta, **made, load_as="bundled:digits")
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*.safetensors")}
    return {"metrics": metrics, "bytes": sizes, "shipped": score_shipped()}


def score_shipped() -> dict:
    """The shipped fp16 pair, loaded as users load it, sampled and scored as the demo does."""
    pipe = RQPipeline.from_pretrained("bundled:digits", device="cpu", dtype="fp32")
    val = build_dataset("bundled:digits:val", pipe.vae.config.resolution, split="val")
    real = torch.stack([val[i][0] for i in range(len(val))])
    classifier = load_or_train(cache_dir() / "classifiers", torch.device("cpu"))
    cond, _ = pipe.conditions([c for c in range(10) for _ in range(10)])
    out = {}
    for name, scale in (("samples", 1.0), ("samples_cfg2", 2.0)):
        sampling = SamplingConfig(guidance_scale=scale, top_k=DEMO_TOP_K)
        _, images = pipe.sample(cond, sampling, torch.Generator().manual_seed(0))
        out[name] = score_digits(classifier, images, cond, real)
    return out


def ship_photos(work: Path) -> dict:
    """tiny32 as its preset trains it, on the bundled photos; scored on the held-out crops."""
    start = time.time()
    exp = load_vae_experiment("tiny32", [f"train.steps={PHOTOS_STEPS}", "train.num_workers=0"])
    train_vae(exp, "bundled:photos", work / "vae", device="cpu")
    seconds = time.time() - start
    val = build_dataset("bundled:photos:val", exp.model.resolution, split="val")
    vae = load_vae(work / "vae")
    scores = {"fp32": score_vae(vae, val)}
    vae = vae.half().float()
    scores["fp16"] = score_vae(vae, val)
    meta = json.loads((work / "vae" / "config.json").read_text())
    out = replace(BUNDLED / "photos-vae")
    made = {"command": "python benchmarks/bundled_models.py --only photos"}
    meta = {k: v for k, v in meta.items() if k in KEEP}
    vae.half().save_pretrained(out, **meta, **made, load_as="bundled:photos-vae")
    record_evaluation(out, "eval-vae on bundled:photos:val", scores["fp16"])
    size = (out / "model.safetensors").stat().st_size
    return {"scores": scores, "bytes": size, "seconds": seconds, "steps": exp.train.steps}


def score_vae(vae, val) -> dict:
    res = evaluate_vae(vae, val, progress=False, rfid=False)
    keep = ("psnr", "ssim", "per_depth_psnr", "codebook_usage", "perplexity")
    return {k: res[k] for k in keep}


def digits_section(digits: dict) -> list[str]:
    g, s = digits["metrics"]["generation"], digits["shipped"]
    total = sum(digits["bytes"].values())
    return [
        "`bundled:digits` (shipped in rqgen/bundled/digits): the digits demo's RQ-VAE and",
        "class-conditional RQ-Transformer, stored as fp16 safetensors "
        f"({total / 2**20:.1f} MiB: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                   for k, v in digits["bytes"].items()) + ").",
        "Scores as the demo measures them (fp32 weights before rounding to fp16; 10 samples",
        "per class, top-k 64, scored by the demo's digit classifier against the held-out",
        "digits):",
        "",
        "| samples | classifier accuracy | Fréchet distance | shipped fp16: accuracy | FD |",
        "|---|---|---|---|---|",
        *[f"| {k} | {v['accuracy']:.1%} | {v['frechet_distance']:.2f} | "
          f"{s[k]['accuracy']:.1%} | {s[k]['frechet_distance']:.2f} |" for k, v in g.items()],
        "",
        f"Training took {digits['metrics']['seconds']:.0f} s on this machine.",
    ]  # fmt: skip


def photos_section(photos: dict) -> list[str]:
    rows = [
        f"| {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | "
        + ", ".join(f"{p:.2f}" for p in v["per_depth_psnr"])
        + f" | {v['codebook_usage']:.0%} | {v['perplexity']:.0f} |"
        for k, v in photos["scores"].items()
    ]
    return [
        "`bundled:photos-vae` (shipped in rqgen/bundled/photos-vae): the tiny32 RQ-VAE",
        f"(8×8×4 codes, K = 512, patch shortcut) trained {photos['steps']} steps on the bundled",
        "photos by its preset, stored as fp16 safetensors "
        f"({photos['bytes'] / 2**20:.1f} MiB). Scored on the 256 fixed 32 px crops of the",
        "held-out photos (bundled:photos:val), before and after rounding to fp16:",
        "",
        "| weights | PSNR (dB) | SSIM | PSNR of Ẑ(1)..Ẑ(4) | codebook usage | perplexity |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Training took {photos['seconds']:.0f} s on this machine.",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("digits", "photos"), help="ship one model only")
    args = parser.parse_args()
    recorded = RESULTS / "bundled_models.json"
    results = json.loads(recorded.read_text()) if recorded.is_file() else {}
    results = {k: results[k] for k in ("digits", "photos") if k in results}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "digits"):
            results["digits"] = ship_digits(Path(tmp) / "digits")
        if args.only in (None, "photos"):
            results["photos"] = ship_photos(Path(tmp) / "photos")
    sections = []
    if "digits" in results:
        sections += digits_section(results["digits"])
    if "photos" in results:
        sections += ([""] if sections else []) + photos_section(results["photos"])
    write_results("bundled_models", "\n".join(sections), results)


if __name__ == "__main__":
    main()
