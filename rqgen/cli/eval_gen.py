"""`rqgen eval-gen`: FID / sFID / KID / IS / precision / recall (or the digits evaluator's
analogues) of samples against a reference, under a named protocol (evaluate/protocol.py),
in one process or split over torchrun ranks. The reference is a data source, rqgen's own
statistics file or an ADM reference batch; the samples can be written as an ADM sample
batch (--save-npz) and the features behind every score saved (--save-features).

Every sample i is drawn with its own seed (seed·1000003 + i), so its image does not depend
on the batch, the batch size or the rank that draws it; rank r draws samples r, r+N, ...,
and the ranks' feature statistics are merged in index order. One process and N processes
therefore write the same PNGs and report the same scores (to float rounding: 1e-6 relative),
with `world_size` in the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rqgen.cli.common import POSITIVE_INT, add_sampling, number, sampling_config
from rqgen.cli.eval_ref import (
    add_protocol,
    batch_stats,
    data_share,
    data_stats,
    eval_images,
    indexed,
    on_ranks,
    rank_evaluator,
    read_reference,
)
from rqgen.cli.evaluate import check_finite, keep_score
from rqgen.distributed import gather_objects, meet_after
from rqgen.errors import CheckpointError, ConfigError, DataError
from rqgen.evaluate.adm import AdmBatch, write_batch
from rqgen.evaluate.clip import CLIPScorer
from rqgen.evaluate.protocol import PROTOCOLS, scores
from rqgen.evaluate.stats import FeatureStats, merge_shares, save_features, share_stats
from rqgen.pipeline import RQPipeline
from rqgen.stage2.guidance import PerSampleSeeds
from rqgen.utils.files import check_output_file, check_writable_dir, read_text
from rqgen.utils.images import to_uint8


def add_eval_gen(sub) -> None:
    p = sub.add_parser(
        "eval-gen", help="FID / sFID / KID / IS / precision / recall of samples vs a reference"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="folder of generated images")
    src.add_argument("--model", help="RQ-Transformer directory: sample, stream to --out, score")
    p.add_argument(
        "--ref",
        required=True,
        help="data source (folder, bundled:...), STATS.npz (rqgen fid-stats) or an ADM "
        "reference batch (.npz with arr_0 images and/or mu/sigma/mu_s/sigma_s)",
    )
    add_protocol(p)
    p.add_argument(
        "--save-npz", help="also write the samples as an ADM sample batch (arr_0, arr_1 labels)"
    )
    p.add_argument(
        "--save-features", help="FILE.npz: the features and statistics behind every score"
    )
    p.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=POSITIVE_INT,
        help="samples to draw with --model (default: 1000); under torchrun write "
        "--num-samples (torchrun's own parser takes --n for one of its options)",
    )
    p.add_argument(
        "--per-class", type=POSITIVE_INT, help="class-balanced: this many samples per class"
    )
    p.add_argument("--prompts", help="text models: a file of captions, one per line (cycled)")
    p.add_argument("--clip", help="local CLIP directory for the CLIP score of text models")
    p.add_argument("--out", help="where --model writes its PNGs (default: MODEL/samples_eval)")
    p.add_argument(
        "--features",
        choices=["inception", "digits"],
        default="inception",
        help="evaluator network (inception: local torch-fidelity weights)",
    )
    p.add_argument(
        "--resolution", type=number(int, 8), help="image size for --ref/--samples folders"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--card",
        action="store_true",
        help="also add the scores, named by protocol, to the model's card (README.md)",
    )
    add_sampling(p)
    p.set_defaults(func=cmd_eval_gen)


def _conditions(args, pipe):
    """The condition of every sample (all ranks: cheap) and its captions (text models)."""

    kind = pipe.conditioning
    if args.prompts and kind != "text":
        raise ConfigError("--prompts is for text-conditional models; this one is not")
    if args.per_class is not None and args.n is not None:
        raise ConfigError("give --n or --per-class (N per class), not both")
    n = args.n or 1000
    if kind == "text":
        if not args.prompts:
            raise ConfigError("text-conditional model: pass --prompts FILE (one per line)")
        lines = [t.strip() for t in read_text(args.prompts, "--prompts").splitlines() if t.strip()]
        if not lines:
            raise DataError(f"no captions in '{args.prompts}'")
        texts = [lines[i % len(lines)] for i in range(n)]
        return pipe.conditions(prompt=texts)[0], texts
    if args.per_class is not None:
        if kind != "class":
            raise ConfigError("--per-class needs a class-conditional model")
        k = pipe.model.config.num_classes
        ids = [c for c in range(k) for _ in range(args.per_class)]
        return pipe.conditions(ids)[0], None
    return pipe.conditions(num_images=n)[0], None  # classes in turn: balanced up to one


def _sample_share(args, rt, result: dict):
    """This rank's samples, drawn with per-index seeds and written as PNGs, as (indices,
    batch) pairs; the total count; the resolution."""

    pipe = RQPipeline.from_pretrained(args.model, None, rt.device, args.dtype)
    cond, texts = _conditions(args, pipe)
    if not args.out and not (Path(args.model) / "config.json").is_file():
        raise ConfigError(
            f"--model {args.model} is not a local directory: give --out DIR for the samples"
        )
    out = Path(args.out) if args.out else Path(args.model) / "samples_eval"
    check_writable_dir(out)  # before sampling, not after it
    sampling = sampling_config(args)
    mine = list(range(rt.rank, len(cond), rt.world_size))
    seeds = PerSampleSeeds([args.seed * 1_000_003 + i for i in mine])
    images = pipe.stream(cond[mine], out, sampling, seeds, args.batch_size, indices=mine)
    if texts is not None:
        images = _with_clip_score(images, [texts[i] for i in mine], args.clip, rt.device, result)
    result.update(samples=str(out), sampling=dict(vars(sampling)), model=str(args.model))
    labels = None
    if cond.dim() == 1:
        result["per_class"] = {str(c): int((cond == c).sum()) for c in cond.unique().tolist()}
        labels = cond.cpu().numpy() if pipe.conditioning == "class" else None
    result["_written"] = (out, labels)
    return indexed(images, mine), len(cond), pipe.vae.config.resolution


def _with_clip_score(images, texts: list[str], clip: str | None, device, result: dict):
    """Pass image batches through, collecting CLIP similarity to their captions in `result`;
    without local CLIP weights, `clip_score` is null with the reason."""

    try:
        scorer = CLIPScorer.load(clip, device)
        result["clip_evaluator"] = f"CLIP {clip or 'default'} (mean cosine, not x100)"
        result["clip_similarities"] = []
    except CheckpointError as e:
        scorer, result["clip_score"], result["clip_score_note"] = None, None, str(e)
    start = 0
    for batch in images:
        if scorer is not None:
            sims = scorer.similarity(batch, texts[start : start + len(batch)])
            result["clip_similarities"].append(sims.cpu())
        start += len(batch)
        yield batch


def cmd_eval_gen(args) -> int:
    rt, result = on_ranks(args.device, lambda rt: _eval_gen(args, rt))
    if rt.is_main:
        protocol = (
            f"eval-gen, protocol {result['protocol']['name']} ({result['evaluator']}) against "
            f"{result['reference']}, {result['n_samples']} samples, {_sampling_words(result)}"
        )
        _report(result, args.json)
        if args.model and args.card:
            keep_score(args.model, protocol, result)
    return 0


def _sampling_words(result: dict) -> str:
    s = result.get("sampling", {})
    return (
        f"guidance {s.get('guidance_scale')}, top-k {s.get('top_k')}, top-p "
        f"{s.get('top_p')}, temperature {s.get('temperature')}"
    )


def _eval_gen(args, rt) -> dict:
    protocol = PROTOCOLS[args.protocol]
    keep = None if args.save_features else protocol.keep  # saved features: every row
    for path in (args.save_npz, args.save_features):
        if path:
            check_output_file(Path(path))  # before sampling, not after it
    evaluator = rank_evaluator(args, rt)
    result: dict = {"evaluator": evaluator.name, "world_size": rt.world_size}
    result["protocol"] = protocol.describe()
    ref = read_reference(args, evaluator, keep)

    def samples():
        if args.model:
            return _sample_share(args, rt, result)
        resolution = args.resolution or 256
        result["samples"] = str(args.samples)
        images, n, chain = data_share(args.samples, resolution, rt, args)
        result["protocol"]["samples_resize"] = chain
        return images, n, resolution

    def fake_share():
        images, total, resolution = samples()
        share = share_stats(images, evaluator, total, keep, with_logits=True)
        sims = result.pop("clip_similarities", None)
        share["clip"] = torch.cat(sims) if sims else None
        return share, total, resolution

    share, total, resolution = meet_after(rt, fake_share)
    shares = gather_objects(share, rt)
    fake, logits = merge_shares(shares, evaluator, total, keep, source="samples")
    if isinstance(ref, AdmBatch):
        ref, how = batch_stats(ref, evaluator, rt, args, keep)
        result["protocol"]["reference_statistics"] = how
    elif ref is None:
        ref, chain = data_stats(args.ref, args.resolution or resolution, evaluator, rt, args, keep)
        result["protocol"]["reference_resize"] = chain
    name = evaluator.score_names()
    result.update(
        {"reference": ref.source or str(args.ref), "n_reference": ref.n, "n_samples": fake.n}
    )
    result["protocol"]["feature_rows"] = {"reference": len(ref.subset), "samples": len(fake.subset)}
    result.update(scores(protocol, name, ref, fake, logits, rt.device))
    clips = [s["clip"] for s in shares if s.get("clip") is not None]
    if clips:
        result["clip_score"] = float(torch.cat(clips).mean())  # mean cosine, as Table 3
    check_finite(result, "eval-gen")
    if rt.is_main:
        _save(args, result, ref, fake, resolution)
    result["_names"] = (name, evaluator.short, evaluator.name)
    return result


def _save(args, result: dict, ref: FeatureStats, fake: FeatureStats, resolution: int) -> None:
    """--save-features and --save-npz, by rank 0 once the scores are in."""
    if args.save_features:
        save_features(args.save_features, ref, fake, result)
        result["features_file"] = str(args.save_features)
    written = result.pop("_written", None)
    if args.save_npz:
        if written:  # the PNGs just written, in index order: what was scored, exactly
            out, labels = written
            files = [_png(out, i) for i in range(fake.n)]
            starts = range(0, len(files), 64)
            batches = (np.stack([_read_png(f) for f in files[s : s + 64]]) for s in starts)
        else:
            data, _ = eval_images(args.samples, resolution, "val", PROTOCOLS[args.protocol].resize)
            loader = DataLoader(data, batch_size=64)
            batches, labels = (to_uint8(x) for x, _ in loader), None
        write_batch(args.save_npz, batches, fake.n, resolution, labels)
        result["npz"] = str(args.save_npz)


def _png(out: Path, i: int) -> Path:
    found = sorted(Path(out).glob(f"{i:06d}_*.png"))
    if len(found) != 1:
        raise DataError(f"sample {i} is not one file in {out} ({len(found)} found)")
    return found[0]


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _report(result: dict, as_json: bool) -> None:
    name, short, full = result.pop("_names")
    if as_json:
        print(json.dumps(result, indent=2))
        return
    inception = short == "inception"
    labels = {
        "fd": name["label"],
        "sfd": "sFID" if inception else f"sFD({short})",
        "kd": "KID" if inception else f"KD({short})",
        "is": "IS" if inception else f"IS({short})",
        "precision": "precision",
        "recall": "recall",
    }
    parts = []
    for k, label in labels.items():
        value = result.get(name[k])
        if value is not None:
            std = result.get(name[k] + "_std")
            parts.append(f"{label} {value:.5g}" + (f" ± {std:.2g}" if std is not None else ""))
    print(
        "  ".join(parts) + f"  ({result['n_samples']} samples vs {result['n_reference']} "
        f"reference images of {result['reference']}; {full}; protocol "
        f"{result['protocol']['name']}; {result['world_size']} process(es))"
    )
