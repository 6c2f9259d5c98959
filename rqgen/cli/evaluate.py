"""`eval-vae`, `reconstruct`, `eval-gen` and `fid-stats`: scoring both stages."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from rqgen.card import record_evaluation
from rqgen.cli.common import (
    POSITIVE_INT,
    add_device,
    device_for,
)
from rqgen.data import build_dataset, load_image
from rqgen.data.folder import DECODE_ERRORS
from rqgen.errors import CheckpointError, ConfigError, DataError, RqgenError
from rqgen.evaluate.adm import write_batch
from rqgen.evaluate.generation import build_evaluator
from rqgen.evaluate.protocol import RESIZE_WORDS, through_chain
from rqgen.evaluate.stats import save_features
from rqgen.evaluate.vae import evaluate_vae, write_reconstructions
from rqgen.stage1 import load_vae
from rqgen.stage1.losses import LPIPS
from rqgen.utils.files import check_output_file, check_writable_dir
from rqgen.utils.images import to_uint8


def add_eval_vae(sub) -> None:
    p = sub.add_parser("eval-vae", help="PSNR, SSIM, LPIPS, per-depth PSNR, codebook usage, rFID")
    p.add_argument("--vae", required=True, help="directory written by train-vae / save_pretrained")
    p.add_argument("--data", required=True, help="image folder or bundled:NAME[:val]")
    p.add_argument("--limit", type=POSITIVE_INT, help="score at most N images")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    add_device(p)
    p.add_argument("--no-rfid", action="store_true", help="skip rFID even if Inception is present")
    p.add_argument(
        "--protocol",
        choices=sorted(VAE_CHAINS),
        default="rqgen",
        help="how a folder's images become squares (rqgen: its loader; official: the RQ "
        "code's Resize + CenterCrop; adm: guided-diffusion's center_crop_arr)",
    )
    p.add_argument(
        "--features",
        choices=["inception", "digits"],
        default="inception",
        help="network of rFID (inception: local torch-fidelity weights)",
    )
    p.add_argument("--save-recons", help="FILE.npz: the reconstructions as an ADM batch (arr_0)")
    p.add_argument(
        "--save-features", help="FILE.npz: the rFID features of the images and reconstructions"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument(
        "--card",
        action="store_true",
        help="also add the scores, named by protocol, to the model's card (README.md)",
    )
    p.set_defaults(func=cmd_eval_vae)


def check_finite(result: dict, what: str) -> None:
    """A score that is NaN or infinite is an error, not a number printed with exit 0. A
    spread (`*_std`) undefined for too few samples becomes null instead."""

    for key, value in result.items():
        if key.endswith("_std") and isinstance(value, float) and not math.isfinite(value):
            result[key] = None
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise RqgenError(
                f"{what}: {key} is {value}, not a finite number: the model or the "
                "data gives non-finite outputs"
            )


VAE_CHAINS = {"rqgen": "loader", "official": "official", "adm": "adm"}


def cmd_eval_vae(args) -> int:
    if args.save_features and args.no_rfid:
        raise ConfigError("--save-features saves the rFID features: drop --no-rfid")
    for path in (args.save_recons, args.save_features):
        if path:
            check_output_file(Path(path))  # before the evaluation, not after it
    vae = load_vae(args.vae)
    device = device_for(args.device)
    res = vae.config.resolution
    data = build_dataset(args.data, res, split="val")
    data, chain = through_chain(data, res, VAE_CHAINS[args.protocol])
    evaluator = None  # evaluate_vae tries Inception itself, and says why not in the JSON
    if args.features == "digits" or args.save_features:  # features to save: fail now if none
        evaluator = build_evaluator(args.features, device)
    lpips, lpips_note = _lpips(device)
    recons = _ReconWriter(args.save_recons, data, args.limit, res) if args.save_recons else None
    result = evaluate_vae(
        vae,
        data,
        args.limit,
        args.batch_size,
        device,
        rfid=not args.no_rfid,
        progress=not args.json,
        evaluator=evaluator,
        lpips=lpips,
        keep_features=bool(args.save_features),
        on_batch=recons,
    )
    features = result.pop("_features", None)
    protocol = {"name": args.protocol, "resize": RESIZE_WORDS[chain]}
    result = {"vae": str(args.vae), "data": args.data, "protocol": protocol, **result}
    if lpips_note:
        result["lpips_note"] = lpips_note
    check_finite(result, f"eval-vae of {args.vae}")
    if recons is not None:
        result["recons"] = str(recons.finish())
    if args.save_features:
        if features is None:
            raise DataError(f"no rFID features to save: {result.get('rfid_note')}")
        save_features(args.save_features, *features, result)
        result["features_file"] = str(args.save_features)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    if args.card:
        limit = f", the first {args.limit} images" if args.limit else ""
        keep_score(args.vae, f"eval-vae on {args.data}{limit} ({args.protocol})", result)
    return 0


def _lpips(device) -> tuple[torch.nn.Module | None, str]:
    """LPIPS (VGG) from the local files the training loss uses, or None and why not."""
    try:
        return LPIPS.from_pretrained().to(device), ""
    except CheckpointError as e:
        return None, str(e)


class _ReconWriter:
    """Reconstructions as uint8 into a memory-mapped .npy next to the output as they come,
    then streamed into an ADM batch: memory stays one batch."""

    def __init__(self, path: str, data, limit: int | None, size: int):
        if not hasattr(data, "__len__"):
            raise DataError("--save-recons needs a data source with a length (not tar shards)")
        self.path, self.size = Path(path), size
        self.n = min(limit or len(data), len(data))
        self.tmp = self.path.with_name(f".{self.path.name}.rows.npy")
        self.rows = np.lib.format.open_memmap(self.tmp, "w+", np.uint8, (self.n, size, size, 3))
        self.done = 0

    def __call__(self, x: torch.Tensor, xr: torch.Tensor) -> None:
        self.rows[self.done : self.done + len(xr)] = to_uint8(xr)
        self.done += len(xr)

    def finish(self) -> Path:
        try:
            batches = (self.rows[s : s + 256] for s in range(0, self.done, 256))
            return write_batch(self.path, batches, self.done, self.size)
        finally:
            del self.rows
            self.tmp.unlink(missing_ok=True)


def keep_score(model: str, protocol: str, result: dict) -> None:
    """The scores into a local model directory's card (--card; a hub model's cache is left
    alone); a directory that cannot be written gets a warning, the scores are already
    printed."""
    if not (Path(model) / "config.json").is_file():
        print(
            f"rqgen: warning: {model} is not a local directory: no card to add to", file=sys.stderr
        )
        return
    try:
        record_evaluation(model, protocol, result)
    except OSError as e:
        print(f"rqgen: warning: scores not added to {model}'s card ({e})", file=sys.stderr)


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="original/reconstruction pairs + coarse-to-fine strips")
    p.add_argument("--vae", required=True)
    p.add_argument("--input", required=True, help="an image file, a folder, or bundled:NAME[:val]")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--limit", type=POSITIVE_INT, default=16, help="at most N images from a folder/dataset"
    )
    add_device(p)
    p.set_defaults(func=cmd_reconstruct)


def load_inputs(src: str, resolution: int, limit: int):
    """An image file, a folder or a bundled set -> (images (N,3,R,R), names)."""

    path = Path(src)
    if path.is_file():
        try:
            return load_image(path, resolution)[None], [path.stem]
        except DECODE_ERRORS as e:
            raise DataError(f"cannot read image '{src}': {e}") from e
    data = build_dataset(src, resolution, split="val")
    n = min(limit, len(data))
    images = torch.stack([data[i][0] for i in range(n)])
    paths = getattr(data, "paths", None)
    names = [Path(paths[i]).stem if paths else f"{i:04d}" for i in range(n)]
    return images, names


def cmd_reconstruct(args) -> int:

    check_writable_dir(Path(args.out))
    vae = load_vae(args.vae)
    images, names = load_inputs(args.input, vae.config.resolution, args.limit)
    files = write_reconstructions(vae, images, names, args.out, device=device_for(args.device))
    print(f"rqgen: wrote {len(files)} images for {len(names)} input(s) to {args.out}")
    return 0
