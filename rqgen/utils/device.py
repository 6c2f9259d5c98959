"""Which device a command computes on: `--device auto|cpu|cuda|cuda:N`.

Under torchrun every rank must own one GPU, `cuda:LOCAL_RANK`; an explicit index would put
all ranks on the same GPU, so it is refused there. Every mistake is a one-line `DeviceError`
raised before any work starts.
"""

from __future__ import annotations

import contextlib
import os

import torch

from rqgen.errors import ConfigError, DeviceError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | None = "auto", world_size: int | None = None) -> torch.device:
    """The torch.device for `name` (None = auto) in this process.

    auto: `cuda:LOCAL_RANK` when CUDA is available, else cpu. cuda: `cuda:LOCAL_RANK`
    (LOCAL_RANK is 0 outside torchrun). cuda:N: that GPU, in a single process only.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = (name or "auto").strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"--device {name!r} is not one of {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {name} was asked for but this machine has no CUDA device usable by "
            f"torch {torch.__version__}: use --device cpu (or install a CUDA build of torch)"
        )
    if index and world_size > 1:
        raise DeviceError(
            f"--device {name} names one GPU for all {world_size} processes: use --device cuda "
            "(each torchrun process then takes cuda:LOCAL_RANK)"
        )
    gpu = int(index) if index else local_rank
    count = torch.cuda.device_count()
    if gpu >= count:
        what = f"--device {name}" if index else f"LOCAL_RANK {local_rank}"
        raise DeviceError(f"{what} needs GPU {gpu} but only {count} GPU(s) are visible")
    return torch.device("cuda", gpu)


def use_device(device: torch.device) -> None:
    """Make `device` the current CUDA device (so NCCL and stray allocations land on it) and
    allow TF32 matmuls there: 8-10× the fp32 throughput on Ampere+ at ~1e-3 relative error,
    which training and sampling tolerate. The codebook search turns TF32 off around itself
    (`exact_fp32`): a nearest code must not depend on the GPU."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def exact_fp32():
    """fp32 matrix products in full precision inside the block, whatever TF32 allows
    outside it (distances between nearly tied codes differ in TF32's 10-bit mantissa)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str | None, device: torch.device) -> str:
    """fp32, bf16 or fp16 for `name` (auto / None: bf16 on CUDA, fp32 on CPU, whose bf16 is
    emulated and slower than fp32 on CPUs without bf16 units)."""
    name = (name or "auto").lower()
    if name == "auto":  # pre-Ampere GPUs: fp16 (training adds a gradient scaler)
        cuda = device.type == "cuda"
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"precision {name!r} is not one of auto, {', '.join(PRECISIONS)}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support: use fp16 (or fp32)")
    return name


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by a container's CPU quota
    (cgroup v2 `cpu.max`), which os.cpu_count() ignores."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def cpu_budget(
    workers: int, local_world_size: int | None = None, device: torch.device | None = None
) -> tuple[int, int]:
    """(data-loader workers, torch threads) for one training process, never more busy
    threads than cores: the cores are shared by the ranks on this machine, then split
    between loader workers and torch's compute threads.

    `workers` < 0 is auto. A CPU rank computes on its cores: no worker on 1-3 cores per
    process (each worker would take a core from the model; prepared or small images decode
    in microseconds), else a quarter of the cores (at most 8) to decode full-size images
    while the other cores compute. A GPU rank computes on its GPU: it keeps two threads
    (the Python loop and the host side of the kernels) and gives the rest of its cores to
    decoding, at most 16. OMP_NUM_THREADS, when set, fixes the thread count."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = max(1, available_cores() // max(1, local_world_size))
    gpu = device is not None and device.type == "cuda"
    if workers < 0 and gpu:
        workers = max(0, min(16, cores - 2))
    elif workers < 0:
        workers = 0 if cores < 4 else min(8, cores // 4)
    threads = max(1, cores - workers)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    return workers, threads


def use_cpu_budget(workers: int, device: torch.device | None = None) -> tuple[int, int]:
    """Apply cpu_budget: set torch's thread count; return (workers, threads)."""
    workers, threads = cpu_budget(workers, device=device)
    torch.set_num_threads(threads)
    return workers, threads
