"""Arguments several commands share: device, precision, per-depth values, and the range
checks of every numeric argument (the same wording as the config checks)."""

from __future__ import annotations

import argparse
import math

from rqgen.configs.validate import Rule
from rqgen.stage2.guidance import SamplingConfig
from rqgen.utils.device import resolve_device


def number(
    kind=int,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
):
    """An argparse type: `kind` within [low, high] (open ends where asked), else one line
    naming the range."""

    rule = Rule("int" if kind is int else "float", low, high, open_low, open_high)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {rule.describe()}") from None
        if not rule.accepts(value) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text}: must be {rule.describe()}")
        return value

    parse.rule = rule  # what the fuzz tests read to build out-of-range values
    return parse


POSITIVE_INT = number(int, 1)


def add_device(p) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process "
        "takes cuda:LOCAL_RANK (default: auto)",
    )


def add_compile(p) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the sampler's per-step networks (fixed shapes over static KV caches; "
        "CUDA graphs on GPU). The first batch pays the compilation (~30 s on CPU)",
    )


def add_dtype(p) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="the transformer's precision while sampling; auto: bf16 on CUDA, fp32 on CPU "
        "(whose bf16 is emulated and slower); int8: CPU, linear layers quantized "
        "(default: auto)",
    )


def device_for(name: str | None):

    return resolve_device(name)


def per_depth(kind):
    """'16' -> 16; '16,8,4,4' -> [16, 8, 4, 4] (one value per depth): top-k values ≥ 1,
    top-p values in (0, 1]."""
    one = number(int, 1) if kind is int else number(float, 0, 1, open_low=True)

    def parse(text: str):
        values = [one(v) for v in text.split(",")]
        return values[0] if len(values) == 1 else values

    parse.rule = one.rule
    return parse


def add_sampling(p) -> None:
    """The sampling options of `sample` and `eval-gen`, read back by `sampling_config`."""
    p.add_argument("--top-k", type=per_depth(int), help="K, or one per depth: 64,32,16,16")
    p.add_argument("--top-p", type=per_depth(float), help="P, or one per depth")
    p.add_argument(
        "--temperature",
        type=number(float, 0, open_low=True),
        default=1.0,
        help="softmax temperature of every depth",
    )
    p.add_argument(
        "--guidance-scale",
        "--cfg",
        dest="guidance_scale",
        type=number(float, 0),
        default=1.0,
        help="classifier-free guidance scale (1: off)",
    )
    p.add_argument(
        "--speculative",
        type=number(int, 0),
        default=0,
        metavar="N",
        help="speculative Jacobi decoding: N positions drafted and verified per spatial pass, "
        "the same distribution in fewer passes (RQ; 0: off)",
    )
    p.add_argument("--seed", type=number(int, 0), default=0, help="the same seed, the same images")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images sampled at once")
    add_device(p)
    add_dtype(p)
    add_compile(p)


def sampling_config(args):

    return SamplingConfig(
        args.temperature,
        args.top_k,
        args.top_p,
        args.guidance_scale,
        args.compile,
        args.speculative,
    )
