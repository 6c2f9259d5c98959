"""The reference side of generation metrics and `rqgen fid-stats`: the protocols' resize
chains applied to data sources, ADM reference batches read as streams, feature statistics
computed by every torchrun rank for its share and merged in index order, and the process
group eval-gen and fid-stats run in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from rqgen.cli.common import POSITIVE_INT, add_device, number
from rqgen.data import build_dataset
from rqgen.data.shards import is_shards
from rqgen.distributed import Runtime, gather_objects, init_runtime, meet_after, shutdown_runtime
from rqgen.errors import ConfigError, DataError
from rqgen.evaluate.adm import AdmBatch, from_uint8_nhwc, is_adm_batch, read_batch
from rqgen.evaluate.generation import build_evaluator, check_digits_like
from rqgen.evaluate.protocol import PROTOCOLS, through_chain
from rqgen.evaluate.stats import FeatureStats, merge_shares, share_stats
from rqgen.utils.device import resolve_device
from rqgen.utils.files import check_output_file


def indexed(batches: Iterator, indices: list[int]) -> Iterator[tuple[list[int], object]]:
    start = 0
    for batch in batches:
        yield indices[start : start + len(batch)], batch
        start += len(batch)


def add_protocol(p) -> None:
    p.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="rqgen",
        help="resize chain, rows kept and scores (rqgen: all scores, rqgen's loader; paper: "
        "the RQ paper's FID/IS; adm: the ADM suite's FID/sFID/IS/precision/recall)",
    )


def eval_images(src: str, resolution: int, split: str, chain: str):
    """A data source as evaluation reads it: a folder through the protocol's resize chain,
    any other source through its loader (the chain applies to files only)."""
    if is_shards(src):  # the KID rows are chosen by index: that needs the count up front
        raise DataError(
            f"{src}: reference statistics are read from a folder, prepared "
            "data or bundled:NAME, not from tar shards yet (unpack a sample of "
            "them)"
        )
    return through_chain(
        build_dataset(src, resolution, split=split, labels=False), resolution, chain
    )


def data_share(src: str, resolution: int, rt, args, split: str = "val", digits=False):
    """This rank's share of a data source as (indices, batch) pairs, its size, and the
    resize chain it went through."""
    data, chain = eval_images(src, resolution, split, PROTOCOLS[args.protocol].resize)
    mine = list(range(rt.rank, len(data), rt.world_size))
    loader = DataLoader(Subset(data, mine), batch_size=args.batch_size, shuffle=False)
    batches = (x for x, _ in tqdm(loader, desc="features", leave=False, disable=rt.rank > 0))
    if digits:
        batches = check_digits_like(batches, src)
    return indexed(batches, mine), len(data), chain


def batch_share(batch: AdmBatch, rt, batch_size: int):
    """This rank's rows of an ADM batch's arr_0 (read as a stream by every rank)."""
    index = 0
    for part in batch.batches(batch_size):
        rows = [i for i in range(len(part)) if (index + i) % rt.world_size == rt.rank]
        if rows:
            yield [index + i for i in rows], from_uint8_nhwc(part[rows])
        index += len(part)


def runtime(device: str):
    """Under torchrun: the process group (this rank's device); else a single process."""

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_runtime(device)
    return Runtime(0, 1, resolve_device(device))


def on_ranks(device: str, body):
    """body(rt) in one process, or on every torchrun rank; the process group is closed
    after it (with no barrier after an error: another rank may be stuck)."""

    rt = runtime(device)
    try:
        result = body(rt)
    except BaseException:
        shutdown_runtime(finished=False)
        raise
    shutdown_runtime(finished=True)
    return rt, result


def rank_evaluator(args, rt):
    """The evaluator on every rank; rank 0 builds it first, as it may train the digits
    classifier and cache it for the others."""

    build = lambda: build_evaluator(args.features, rt.device)  # noqa: E731
    first = meet_after(rt, lambda: build() if rt.is_main else None)
    rest = meet_after(rt, lambda: None if rt.is_main else build())
    return first if rt.is_main else rest


def data_stats(src: str, resolution: int, evaluator, rt, args, keep, split: str = "val"):
    """Feature statistics of a data source, each rank scoring its share; the resize chain."""

    def share():
        data, n, chain = data_share(
            src, resolution, rt, args, split, digits=args.features == "digits"
        )
        return share_stats(data, evaluator, n, keep), n, chain

    mine, n, chain = meet_after(rt, share)
    return merge_shares(gather_objects(mine, rt), evaluator, n, keep, source=src)[0], chain


def batch_stats(batch: AdmBatch, evaluator, rt, args, keep):
    """Statistics of an ADM reference batch: its images through the evaluator (each rank a
    share); the file's own mu/sigma/mu_s/sigma_s only when it has no images, since those
    come from the TensorFlow Inception, not this evaluator."""
    if batch.shape is None:
        if evaluator.short != "inception":
            raise DataError(
                f"{batch.path} holds Inception statistics only: --features {args.features} "
                "needs its images (arr_0)"
            )
        st = batch.stats
        empty = np.zeros((0, len(st["mu"])), np.float32)
        ref = FeatureStats(evaluator.name, 0, st["mu"], st["sigma"], empty, str(batch.path))
        ref.mu_s, ref.sigma_s = st["mu_s"], st["sigma_s"]
        return ref, "the file's statistics (TensorFlow Inception)"
    n = batch.shape[0]
    mine = meet_after(rt, lambda: share_stats(batch_share(batch, rt, 64), evaluator, n, keep))
    ref = merge_shares(gather_objects(mine, rt), evaluator, n, keep, source=str(batch.path))[0]
    return ref, f"arr_0 ({batch.shape[1]}×{batch.shape[2]} uint8), scored by this evaluator"


def read_reference(args, evaluator, keep):
    """An .npz reference read before any sampling (fail fast): an ADM batch (its layout; the
    features come later) or rqgen's statistics file; None for a data source."""
    if not str(args.ref).endswith(".npz"):
        return None
    if is_adm_batch(args.ref):
        return read_batch(args.ref)
    ref = FeatureStats.load(args.ref)
    if ref.evaluator != evaluator.name:
        raise DataError(
            f"'{args.ref}' was computed with {ref.evaluator!r}, not {evaluator.name!r}: "
            "recompute it with rqgen fid-stats --features " + args.features
        )
    return ref


def add_fid_stats(sub) -> None:
    p = sub.add_parser("fid-stats", help="reference feature statistics for eval-gen (.npz)")
    p.add_argument("data", help="folder or bundled:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="STATS.npz")
    p.add_argument("--features", choices=["inception", "digits"], default="inception")
    p.add_argument("--resolution", type=number(int, 8), default=256)
    p.add_argument("--split", default="val", help="bundled split, or 'train' for random crops")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    add_protocol(p)
    add_device(p)
    p.set_defaults(func=cmd_fid_stats)


def cmd_fid_stats(args) -> int:
    """The statistics eval-gen computes of a reference, once, to a file (the same KID rows,
    chosen by index; each torchrun rank scores its share)."""

    if Path(args.out).suffix != ".npz":  # eval-gen --ref tells statistics from data by it
        raise ConfigError(f"--out {args.out}: statistics files end in .npz (e.g. ref.npz)")
    check_output_file(Path(args.out))  # before the features are computed, not after

    def body(rt):
        evaluator = rank_evaluator(args, rt)
        keep = PROTOCOLS[args.protocol].keep
        return data_stats(args.data, args.resolution, evaluator, rt, args, keep, args.split)[0]

    rt, stats = on_ranks(args.device, body)
    if rt.is_main:
        stats.save(args.out)
        print(f"rqgen: wrote {args.out} ({stats.n} images of {args.data}, {stats.evaluator})")
    return 0
