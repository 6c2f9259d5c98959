"""Arguments several commands share: device, precision, per-depth values."""

from __future__ import annotations


def add_device(p) -> None:
    p.add_argument(
        "--device", default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process "
        "takes cuda:LOCAL_RANK (default: auto)",
    )  # fmt: skip


def add_compile(p) -> None:
    p.add_argument(
        "--compile", action="store_true",
        help="compile the sampler's per-step networks (fixed shapes over static KV caches; "
        "CUDA graphs on GPU). The first batch pays the compilation (~30 s on CPU)",
    )  # fmt: skip


def add_dtype(p) -> None:
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
        help="the transformer's precision while sampling; auto: bf16 on CUDA, fp32 on CPU "
        "(whose bf16 is emulated and slower) (default: auto)",
    )  # fmt: skip


def device_for(name: str | None):
    from rqgen.utils.device import resolve_device

    return resolve_device(name)


def per_depth(kind):
    """'16' -> 16; '16,8,4,4' -> [16, 8, 4, 4] (one value per depth)."""

    def parse(text: str):
        values = [kind(v) for v in text.split(",")]
        return values[0] if len(values) == 1 else values

    return parse
