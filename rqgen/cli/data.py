"""`rqgen prepare`: decode a folder of images once into prepared data for training."""

from __future__ import annotations

from rqgen.cli.common import POSITIVE_INT, number
from rqgen.data.prepared import PreparedImages, prepare


def add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="decode a folder of images once, short side resized, into a memory-mapped array",
        description="Decode every image under --data once, resize its short side to "
        "--resolution, and store the pixels (with labels from subfolders and sidecar .txt "
        "captions) as one memory-mapped array with a manifest. Train on it with --data OUT: "
        "a step then never decodes a full-size photo.",
    )
    p.add_argument("--data", required=True, help="folder of images (subfolders = classes)")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    p.add_argument(
        "--resolution",
        type=number(int, 8),
        required=True,
        help="short side in pixels: the model's resolution, or more",
    )
    p.add_argument(
        "--workers", type=POSITIVE_INT, help="decoding processes (default: the cores available)"
    )
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:

    out = prepare(args.data, args.out, args.resolution, workers=args.workers)
    data = PreparedImages(out, args.resolution)
    m = data.manifest
    print(
        f"rqgen: prepared {m['count']} images ({m['skipped']} skipped, "
        f"{len(data.classes)} classes, {m['bytes'] / 2**20:.1f} MiB at {m['resolution']} px "
        f"short side) in {out}; train with --data {out}"
    )
    return 0
