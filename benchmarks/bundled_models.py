"""Train the models shipped inside the package, write them as fp16 safetensors with their
cards, and record how well they do.

    python benchmarks/bundled_models.py            # ~7 minutes on 2 CPU cores

`bundled:digits`: the digits demo's two stages exactly as `make demo` trains them (the
tiny32 RQ-VAE without the patch shortcut, then the class-conditional ar-tiny), with the
demo's classifier scores. Weights are rounded to fp16 (the VAE's codebook and the
transformer's copy of it alike, so the pair's fingerprint still matches) and loaded back
into fp32 models. The results: benchmarks/results/bundled_models.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from rqgen.data import build_dataset  # noqa: E402
from rqgen.demo import DEMO_TOP_K, run_demo  # noqa: E402
from rqgen.evaluate.digits import load_or_train, score_digits  # noqa: E402
from rqgen.hub import BUNDLED  # noqa: E402
from rqgen.pipeline import RQPipeline  # noqa: E402
from rqgen.stage1 import load_vae  # noqa: E402
from rqgen.stage2.guidance import SamplingConfig  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer, codebook_fingerprint  # noqa: E402
from rqgen.utils.paths import cache_dir  # noqa: E402


def ship_digits(work: Path) -> dict:
    metrics = run_demo(work, device="cpu")
    vae = load_vae(work / "vae").half().float()  # the values fp16 can hold
    model = RQTransformer.from_pretrained(work / "ar").half().float()
    model.config.vae_fingerprint = codebook_fingerprint(vae.quantizer.codebook)
    assert torch.equal(model.codebook, vae.quantizer.codebook)
    meta = json.loads((work / "ar" / "config.json").read_text())
    out = BUNDLED / "digits"
    if out.exists():
        shutil.rmtree(out)
    keep = ("classes", "conditioning", "train", "data", "step", "val_loss")
    made = {"command": "python benchmarks/bundled_models.py (the digits demo's two stages)"}
    vae_meta = json.loads((work / "vae" / "config.json").read_text())
    vae_meta = {k: v for k, v in vae_meta.items() if k in keep}
    vae.half().save_pretrained(out / "vae", **vae_meta, **made, load_as="bundled:digits/vae")
    meta = {k: meta[k] for k in keep if k in meta}
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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        digits = ship_digits(Path(tmp) / "digits")
    g, s = digits["metrics"]["generation"], digits["shipped"]
    total = sum(digits["bytes"].values())
    body = "\n".join([
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
    ])  # fmt: skip
    write_results("bundled_models", body, {"digits": digits})


if __name__ == "__main__":
    main()
