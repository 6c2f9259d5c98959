"""How many images a class-conditional ar-tiny needs: trained on folders of the first N
training digits (stratified, every class alike) on the shipped digits tokenizer, sampled
and scored by the demo's digit classifier against the held-out digits.

    python benchmarks/data_need.py                     # sizes 100 400 1527, ~15 minutes
    python benchmarks/data_need.py --sizes 50 1527 --steps 300

The demo's stage-2 recipe (600 steps at batch 32, no dropout, τ as the preset sets it);
stored views: the centre only (train.feature_crops=1), since a digit's mirror is not a
digit. A classifier's accuracy cannot tell a model that copies its few training digits from
one that writes new ones, so each row also gives the distance from every sample to its
nearest training digit, next to the same distance for held-out real digits (copies sit
closer to the training set than new digits do). Models are kept in --workdir, so a rerun
skips the sizes already trained. The results: benchmarks/results/data_need.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interval, write_results  # noqa: E402

from rqgen.configs import load_ar_experiment  # noqa: E402
from rqgen.data import build_dataset  # noqa: E402
from rqgen.data.bundled import BundledDigits  # noqa: E402
from rqgen.demo import DEMO_TOP_K, DIGITS_AR_OVERRIDES, DIGITS_AR_STEPS  # noqa: E402
from rqgen.evaluate.digits import load_or_train, score_digits  # noqa: E402
from rqgen.hub import bundled  # noqa: E402
from rqgen.pipeline import RQPipeline  # noqa: E402
from rqgen.stage2.guidance import SamplingConfig  # noqa: E402
from rqgen.train.ar import train_ar  # noqa: E402
from rqgen.utils.paths import cache_dir  # noqa: E402


def digit_folder(root: Path, n: int) -> Path:
    """The first n training digits, taken round-robin over the classes, as class folders."""
    data = BundledDigits(32, split="train")
    by_class = [[i for i in range(len(data)) if data[i][1] == c] for c in range(10)]
    order = [i for group in zip(*by_class) for i in group]
    order += sorted(set(range(len(data))) - set(order))  # the classes' unequal tails
    for i in order[:n]:
        x, label = data[i]
        img = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(label) / f"{i:04d}.png")
    return root


def nearest(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Each image's RMS pixel distance to its nearest training image."""
    d = torch.cdist(x.flatten(1), train.flatten(1)) / x[0].numel() ** 0.5
    return d.min(1).values


def one(n: int, steps: int, work: Path, classifier, real: torch.Tensor) -> dict:
    data = digit_folder(work / f"digits{n}", n)
    exp = load_ar_experiment(
        "ar-tiny", [f"train.steps={steps}", *DIGITS_AR_OVERRIDES, "train.feature_crops=1"]
    )
    out, start, seconds = work / f"ar{n}", time.time(), None
    if not (out / "model.safetensors").is_file():  # else trained by an earlier run
        train_ar(exp, bundled("bundled:digits/vae"), str(data), out, device="cpu")
        seconds = time.time() - start
    files = sorted(data.rglob("*.png"))
    train = (
        torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                for f in files
            ]
        ).float()
        / 127.5
        - 1
    )
    pipe = RQPipeline.from_pretrained(out, device="cpu", dtype="fp32")
    cond, _ = pipe.conditions([c for c in range(10) for _ in range(20)])
    row = {"images": n, "steps": steps, "seconds": seconds}
    row["heldout_to_train"] = float(nearest(real, train).median())
    for name, scale in (("cfg1", 1.0), ("cfg2", 2.0)):
        sampling = SamplingConfig(guidance_scale=scale, top_k=DEMO_TOP_K)
        _, images = pipe.sample(cond, sampling, torch.Generator().manual_seed(0))
        row[name] = score_digits(classifier, images, cond, real)
        hits = (classifier(images).argmax(1) == cond).float()
        row[name]["accuracy_interval"] = interval(hits.tolist())
        row[name]["sample_to_train"] = float(nearest(images, train).median())
    print(f"{n} images: {row['cfg1']['accuracy']:.1%} / {row['cfg2']['accuracy']:.1%}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1527])
    parser.add_argument("--steps", type=int, default=DIGITS_AR_STEPS)
    parser.add_argument("--workdir", default="benchmarks/work/data_need")
    args = parser.parse_args()
    torch.set_num_threads(2)
    classifier = load_or_train(cache_dir() / "classifiers", torch.device("cpu"))
    val = build_dataset("bundled:digits:val", 32, split="val")
    real = torch.stack([val[i][0] for i in range(len(val))])
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [one(n, args.steps, work, classifier, real) for n in args.sizes]
    cell = lambda r, k: (  # noqa: E731
        f"{r[k]['accuracy']:.1%} ± {r[k]['accuracy_interval'][1]:.1%} | "
        f"{r[k]['frechet_distance']:.2f} | {r[k]['sample_to_train']:.3f}"
    )
    body = "\n".join([
        "Class-conditional ar-tiny trained on folders of the first N training digits (every",
        f"class alike) on bundled:digits/vae, {args.steps} steps at batch 32 each (the demo's",
        "stage-2 recipe), centre views only; 20 samples per class (top-k 64), scored by the",
        "demo's digit classifier against the 269 held-out digits. Accuracy ± the half-width",
        "of its 95% interval over the 200 samples. 'to train': the median RMS pixel distance",
        "(images in [-1, 1]) from each sample to its nearest training digit; held-out real",
        "digits sit at the distance in the last column but one, copies closer.",
        "",
        "| training images | accuracy | FD | to train | accuracy, CFG 2 | FD, CFG 2 | to train,"
        " CFG 2 | held-out digits to train | train s |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['images']} | {cell(r, 'cfg1')} | {cell(r, 'cfg2')} | "
          f"{r['heldout_to_train']:.3f} | {r['seconds'] or 0:.0f} |" for r in rows],
    ])  # fmt: skip
    write_results("data_need", body, {"rows": rows})


if __name__ == "__main__":
    main()
