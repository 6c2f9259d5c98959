"""`rqgen eval-gen`: FID / KID / IS (or the digits evaluator's analogues) of samples against
a reference, in one process or split over torchrun ranks.

Every sample i is drawn with its own seed (seed·1000003 + i), so its image does not depend
on the batch, the batch size or the rank that draws it; rank r draws samples r, r+N, ...,
and the ranks' feature statistics are merged in index order. One process and N processes
therefore write the same PNGs and report the same scores (to float rounding: 1e-6 relative),
with `world_size` in the output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from rqgen.cli.common import POSITIVE_INT, add_device, add_sampling, number, sampling_config
from rqgen.cli.evaluate import check_finite, keep_score
from rqgen.data import build_dataset
from rqgen.data.shards import is_shards
from rqgen.distributed import Runtime, gather_objects, init_runtime, meet_after, shutdown_runtime
from rqgen.errors import CheckpointError, ConfigError, DataError
from rqgen.evaluate.clip import CLIPScorer
from rqgen.evaluate.generation import (
    FeatureStats,
    build_evaluator,
    check_digits_like,
    frechet_distance,
    inception_score,
    kernel_distance,
    merge_shares,
    share_stats,
)
from rqgen.pipeline import RQPipeline
from rqgen.stage2.guidance import PerSampleSeeds
from rqgen.utils.device import resolve_device
from rqgen.utils.files import check_output_file, check_writable_dir, read_text


def add_eval_gen(sub) -> None:
    p = sub.add_parser("eval-gen", help="FID / KID / IS of samples against a reference")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="folder of generated images")
    src.add_argument("--model", help="RQ-Transformer directory: sample, stream to --out, score")
    p.add_argument("--ref", required=True, help="data source (folder, bundled:...) or STATS.npz")
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


def _indexed(batches: Iterator, indices: list[int]) -> Iterator[tuple[list[int], object]]:
    start = 0
    for batch in batches:
        yield indices[start : start + len(batch)], batch
        start += len(batch)


def _data_share(src: str, resolution: int, rt, batch_size: int, digits: bool, split: str = "val"):
    """This rank's share of a data source as (indices, batch) pairs, and its size."""

    if is_shards(src):  # the KID rows are chosen by index: that needs the count up front
        raise DataError(
            f"{src}: reference statistics are read from a folder, prepared "
            "data or bundled:NAME, not from tar shards yet (unpack a sample of "
            "them)"
        )
    data = build_dataset(src, resolution, split=split, labels=False)
    mine = list(range(rt.rank, len(data), rt.world_size))
    loader = DataLoader(Subset(data, mine), batch_size=batch_size, shuffle=False)
    batches = (x for x, _ in tqdm(loader, desc="features", leave=False, disable=rt.rank > 0))
    if digits:
        batches = check_digits_like(batches, src)
    return _indexed(batches, mine), len(data)


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
    if cond.dim() == 1:
        result["per_class"] = {str(c): int((cond == c).sum()) for c in cond.unique().tolist()}
    return _indexed(images, mine), len(cond), pipe.vae.config.resolution


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


def _runtime(device: str):
    """Under torchrun: the process group (this rank's device); else a single process."""

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_runtime(device)
    return Runtime(0, 1, resolve_device(device))


def _on_ranks(device: str, body):
    """body(rt) in one process, or on every torchrun rank; the process group is closed
    after it (with no barrier after an error: another rank may be stuck)."""

    rt = _runtime(device)
    try:
        result = body(rt)
    except BaseException:
        shutdown_runtime(finished=False)
        raise
    shutdown_runtime(finished=True)
    return rt, result


def _evaluator(args, rt):
    """The evaluator on every rank; rank 0 builds it first, as it may train the digits
    classifier and cache it for the others."""

    build = lambda: build_evaluator(args.features, rt.device)  # noqa: E731
    first = meet_after(rt, lambda: build() if rt.is_main else None)
    rest = meet_after(rt, lambda: None if rt.is_main else build())
    return first if rt.is_main else rest


def _data_stats(src: str, resolution: int, evaluator, rt, args, split: str = "val"):
    """Feature statistics of a data source, each rank scoring its share."""

    def share():
        data, n = _data_share(
            src, resolution, rt, args.batch_size, args.features == "digits", split
        )
        return share_stats(data, evaluator, n), n

    mine, n = meet_after(rt, share)
    return merge_shares(gather_objects(mine, rt), evaluator, n, source=src)[0]


def cmd_eval_gen(args) -> int:
    rt, result = _on_ranks(args.device, lambda rt: _eval_gen(args, rt))
    if rt.is_main:
        protocol = (
            f"eval-gen ({result['evaluator']}) against {result['reference']}, "
            f"{result['n_samples']} samples, {_sampling_words(result)}"
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

    evaluator = _evaluator(args, rt)
    result: dict = {"evaluator": evaluator.name, "world_size": rt.world_size}
    ref = None
    if str(args.ref).endswith(".npz"):  # checked before any sampling: fail fast
        ref = FeatureStats.load(args.ref)
        if ref.evaluator != evaluator.name:
            raise DataError(
                f"'{args.ref}' was computed with {ref.evaluator!r}, not {evaluator.name!r}: "
                "recompute it with rqgen fid-stats --features " + args.features
            )

    def samples():
        if args.model:
            return _sample_share(args, rt, result)
        resolution = args.resolution or 256
        result["samples"] = str(args.samples)
        return (*_data_share(args.samples, resolution, rt, args.batch_size, False), resolution)

    def fake_share():
        images, total, resolution = samples()
        share = share_stats(images, evaluator, total, with_logits=True)
        sims = result.pop("clip_similarities", None)
        share["clip"] = torch.cat(sims) if sims else None
        return share, total, resolution

    share, total, resolution = meet_after(rt, fake_share)
    shares = gather_objects(share, rt)
    fake, logits = merge_shares(shares, evaluator, total, source="samples")
    if ref is None:
        ref = _data_stats(args.ref, args.resolution or resolution, evaluator, rt, args)
    kid, kid_std = kernel_distance(ref, fake)
    name = evaluator.score_names()
    result.update(
        {
            "reference": ref.source or str(args.ref),
            "n_reference": ref.n,
            "n_samples": fake.n,
            name["fd"]: frechet_distance(ref, fake),
            name["kd"]: kid,
            name["kd"] + "_std": kid_std,
        }
    )
    if logits is not None:
        result[name["is"]], result[name["is"] + "_std"] = inception_score(logits)
    clips = [s["clip"] for s in shares if s.get("clip") is not None]
    if clips:
        result["clip_score"] = float(torch.cat(clips).mean())  # mean cosine, as Table 3
    check_finite(result, "eval-gen")
    result["_names"] = (name, evaluator.short, evaluator.name)
    return result


def _report(result: dict, as_json: bool) -> None:
    name, short, full = result.pop("_names")
    if as_json:
        print(json.dumps(result, indent=2))
        return
    kid_std = result[name["kd"] + "_std"]
    spread = f" ± {kid_std:.5f}" if kid_std is not None else ""
    kd = "KID" if name["kd"] == "kid" else f"KD({short})"
    print(
        f"{name['label']} {result[name['fd']]:.3f}  {kd} {result[name['kd']]:.5f}{spread}  "
        f"({result['n_samples']} samples vs {result['n_reference']} reference images of "
        f"{result['reference']}; {full}; {result['world_size']} process(es))"
    )


def add_fid_stats(sub) -> None:
    p = sub.add_parser("fid-stats", help="reference feature statistics for eval-gen (.npz)")
    p.add_argument("data", help="folder or bundled:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="STATS.npz")
    p.add_argument("--features", choices=["inception", "digits"], default="inception")
    p.add_argument("--resolution", type=number(int, 8), default=256)
    p.add_argument("--split", default="val", help="bundled split, or 'train' for random crops")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    add_device(p)
    p.set_defaults(func=cmd_fid_stats)


def cmd_fid_stats(args) -> int:
    """The statistics eval-gen computes of a reference, once, to a file (the same KID rows,
    chosen by index; each torchrun rank scores its share)."""

    if Path(args.out).suffix != ".npz":  # eval-gen --ref tells statistics from data by it
        raise ConfigError(f"--out {args.out}: statistics files end in .npz (e.g. ref.npz)")
    check_output_file(Path(args.out))  # before the features are computed, not after

    def body(rt):
        evaluator = _evaluator(args, rt)
        return _data_stats(args.data, args.resolution, evaluator, rt, args, args.split)

    rt, stats = _on_ranks(args.device, body)
    if rt.is_main:
        stats.save(args.out)
        print(f"rqgen: wrote {args.out} ({stats.n} images of {args.data}, {stats.evaluator})")
    return 0
