"""Pieces every trainer uses: process group, data stream, logging, EMA, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import math
import os
import pickle
import random
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from rqgen.checkpoint import load_state_dict_into, save_state_dict, write_json
from rqgen.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from rqgen.train.parallel import agree, gather_objects
from rqgen.utils.device import PRECISIONS, resolve_device, resolve_precision, use_device
from rqgen.utils.files import DiskFullError, RunLock, check_output_dir, write_failed

# ------------------------------------------------------------------ process group


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str | None = None, timeout_s: float = 1800.0) -> Runtime:
    """Single process, or the process group torchrun describes in the environment: NCCL
    when this rank computes on a GPU, gloo on CPU. A collective that waits longer than
    `timeout_s` (a dead or stuck rank) fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, world)  # before the process group: a bad name fails fast
    use_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        torch_dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    rank = torch_dist.get_rank() if world > 1 else 0
    return Runtime(rank, world, dev)


def shutdown_runtime(finished: bool = False) -> None:
    """Tear the process group down while the interpreter is fully alive. Garbage that still
    holds collective work (DDP / FSDP wrappers in reference cycles) is collected first:
    freed later, during interpreter shutdown, gloo's worker threads can abort the process
    (SIGABRT) after a successful run. After a finished run the ranks also meet at a barrier,
    so none closes its connections while another still uses them; after an error there is
    no barrier (another rank may be stuck in a collective)."""
    if not torch_dist.is_initialized():
        return
    gc.collect()
    if finished:
        with contextlib.suppress(RuntimeError):
            torch_dist.barrier()
    torch_dist.destroy_process_group()
    gc.collect()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ data stream

LISTING_NAME = "data_listing.json"


def run_dataset(data: str, resolution: int, seed: int, out: Path, rt: Runtime) -> Dataset:
    """The training set of a run. A folder is listed once, by rank 0, into OUT/data_listing
    .json (file names and classes, no image opened; or the prepared copy of a folder of
    large images), which every rank reads and every resume reuses: neither walks nor opens
    the folder to list it again. Unreadable images are skipped when first loaded. Bundled
    and prepared data and tar shards need no listing."""
    from rqgen.data import build_dataset
    from rqgen.data.folder import ImageFolder, Listing
    from rqgen.data.prepared import PreparedImages, is_prepared, prepared_copy
    from rqgen.data.shards import Shards, is_shards

    if is_shards(data):  # nothing to list: the shards are read as a stream
        return Shards(data, resolution, seed=seed)
    root = Path(data).expanduser()
    plain = data.strip() and not data.startswith("bundled:") and not is_prepared(root)
    if not plain or not root.is_dir():  # (an empty --data: build_dataset says so)
        return build_dataset(data, resolution, "train", seed=seed)
    path = out / LISTING_NAME

    def list_once() -> None:
        prepared = prepared_copy(root, resolution)
        if prepared is not None:
            record = {"prepared": str(prepared)}
        else:
            folder = ImageFolder(root, resolution, verify=False)  # one line if empty
            record = {"listing": dataclasses.asdict(folder.listing)}
        write_json(path, record)

    if not path.is_file():
        agree(rt, lambda: list_once() if rt.is_main else None)
    record = json.loads(path.read_text())
    if "prepared" in record and is_prepared(record["prepared"]):
        return PreparedImages(record["prepared"], resolution, train=True)
    if "prepared" in record:  # the cache was cleared since: prepare it again
        return build_dataset(data, resolution, "train", seed=seed)
    listing = Listing(**record["listing"])
    return ImageFolder(listing.root, resolution, listing=listing, verify=False)


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of a seeded permutation per epoch; rank r takes the r-th consecutive
    slice of each. Starts at any global step, so resuming needs no replay of the data, and
    the ranks together see exactly the batch a single process would."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int):
        if global_batch % world:
            raise ValueError(f"batch {global_batch} is not divisible by {world} processes")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start = seed, start
        self.per_epoch = max(1, n // global_batch)  # drop the last partial batch

    def permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.n < self.global_batch:  # tiny datasets: repeat to fill a batch
            perm = perm.repeat(math.ceil(self.global_batch / self.n))
        return perm

    def __iter__(self) -> Iterator[list[int]]:
        step, local = self.start, self.global_batch // self.world
        epoch, perm = -1, None
        while True:
            e, i = divmod(step, self.per_epoch)
            if e != epoch:  # one permutation per epoch (118 ms at 1.28M images), not per step
                epoch, perm = e, self.permutation(e)
            batch = perm[i * self.global_batch : (i + 1) * self.global_batch]
            yield batch[self.rank * local : (self.rank + 1) * local].tolist()
            step += 1

    def __len__(self) -> int:  # infinite stream; len is only used for display
        return self.per_epoch


class _EpochedDataset(Dataset):
    """Forwards the epoch of each index to datasets with random crops (set_epoch)."""

    def __init__(self, dataset: Dataset, per_epoch: int):
        self.dataset, self.per_epoch = dataset, per_epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, step = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(step // self.per_epoch)
        return self.dataset[index]


class _TaggedSampler(Sampler):
    def __init__(self, sampler: ShardedBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        for step, batch in enumerate(self.sampler, start=self.sampler.start):
            yield [(i, step) for i in batch]


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which saves and stops cleanly (a
    worker killed by it would only turn the interrupt into a data-loading error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_stream(
    dataset: Dataset, global_batch: int, rt: Runtime, seed: int, start_step: int, workers: int
) -> Iterator:
    """Endless iterator of this rank's micro-batches, starting at global micro-step start_step."""
    from rqgen.data.shards import Shards

    if isinstance(dataset, Shards):  # tar shards: a stream split by rank and worker
        loader = DataLoader(dataset.stream(rt.rank, rt.world_size, start_step),
                            batch_size=global_batch // rt.world_size, num_workers=workers,
                            worker_init_fn=_ignore_stop_signals,
                            pin_memory=rt.device.type == "cuda")  # fmt: skip
        return iter(loader)
    sampler = ShardedBatchSampler(
        len(dataset), global_batch, rt.rank, rt.world_size, seed, start_step
    )
    loader = DataLoader(
        _EpochedDataset(dataset, sampler.per_epoch),
        worker_init_fn=_ignore_stop_signals,
        batch_sampler=_TaggedSampler(sampler),
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=False,
        # its own generator: creating the iterator must not draw from the global RNG, or a
        # resumed run (RNG restored, then a new iterator) would drift from an unbroken one
        generator=torch.Generator().manual_seed(seed + 7919 * start_step + rt.rank),
    )
    return iter(loader)


# ------------------------------------------------------------------ logging


class MetricsLog:
    """JSONL metrics and TensorBoard scalars and images (OUT/tensorboard), on the main
    process only."""

    def __init__(self, directory: Path, enabled: bool):
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.tb = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:  # a dependency, but a hand-made environment may lack it
                self.tb = None

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """One (3, H, W) image in [-1, 1] (e.g. a sample grid) for TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, (image.float().clamp(-1, 1) + 1) / 2, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------ weight EMA


class WeightEMA:
    """Exponential moving average of parameters; buffers (e.g. the codebook) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for k, v in model.state_dict().items():
            if k in params and v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)


# ------------------------------------------------------------------ training state


# Training settings a resumed run may change: how long and how it reports and checkpoints,
# not what it optimises (batch, learning rate, losses, precision... define the run).
RESUMABLE = frozenset({
    "steps", "log_every", "ckpt_every", "eval_every", "sample_every", "val_batches",
    "patience", "num_workers", "dist_timeout", "compile", "activation_checkpointing",
    "extract_workers", "features",
})  # fmt: skip


class TrainState:
    """`DIR/train_state/`: every tensor needed to resume, swapped in atomically.

    Weights go to safetensors files; optimizer states, step and RNG states to `state.pt`
    (tensors and plain containers only, read back with weights_only=True).
    """

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "train_state"

    def exists(self) -> bool:
        return (self._live_dir() / "state.pt").is_file()

    def save(self, modules: dict[str, nn.Module | dict], state: dict, meta: dict) -> None:
        """Everything into train_state.tmp, then swapped in. A failed write (a full disk)
        removes the partial copy, leaves the previous state as it was, and says so in one
        line with the bytes the state needs."""
        tmp = self.dir.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tensors = {n: (m if isinstance(m, dict) else m.state_dict()) for n, m in modules.items()}
        try:
            tmp.mkdir(parents=True)
            for name, sd in tensors.items():
                save_state_dict(sd, tmp / f"{name}.safetensors")
            torch.save(state, tmp / "state.pt")
            write_json(tmp / "meta.json", meta)
        except (OSError, RuntimeError, DiskFullError) as e:  # torch.save: ENOSPC as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, RuntimeError) and "write" not in str(e).lower():
                raise
            need = sum(_nbytes(sd) for sd in tensors.values()) + _nbytes(state)
            cause = e.__cause__ if isinstance(e, DiskFullError) else e
            err = cause if isinstance(cause, OSError) else OSError(errno.ENOSPC, str(e))
            raise write_failed(self.dir, err, need) from e
        old = self.dir.with_suffix(".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)  # the swap: a crash before it keeps the old state
        shutil.rmtree(old, ignore_errors=True)

    def _live_dir(self) -> Path:
        # A crash between the two renames in save() leaves only train_state.old.
        return self.dir if (self.dir / "state.pt").is_file() else self.dir.with_suffix(".old")

    def meta(self) -> dict:
        path = self._live_dir() / "meta.json"
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}); remove {path.parent} to start "
                                  "the run over") from e  # fmt: skip

    def check_same_model(self, model_config) -> None:
        """Refuse to resume a run whose model config (a dataclass) differs from the one asked
        for. A field added to rqgen after the run was saved counts as its default value."""
        wanted = dataclasses.asdict(model_config)
        saved = {**dataclasses.asdict(type(model_config)()), **self.meta()["experiment"]["model"]}
        if saved != wanted:
            diff = sorted(k for k in saved if saved[k] != wanted.get(k))
            raise ConfigError(
                f"{self.dir.parent} holds a run with a different model config "
                f"({', '.join(diff)}): resume with the same config or choose a new --out"
            )

    def check_resume(self, exp, data: str, identity: dict | None = None) -> list[str]:
        """Everything that defines the run must match the saved one: the model config, the
        data source, `identity` (e.g. the VAE's fingerprint) and the training settings that
        shape the optimisation. Settings that may change mid-run (RESUMABLE) are returned
        as 'train.x: old -> new' lines for the caller to show and log."""
        self.check_same_model(exp.model)
        meta = self.meta()
        run = self.dir.parent
        if meta.get("data", data) != data:
            raise ConfigError(f"{run} was trained on --data {meta['data']}, not {data}: resume "
                              "with the same --data or choose a new --out")  # fmt: skip
        for key, value in (identity or {}).items():
            if key in meta and meta[key] != value:
                raise ConfigError(f"{run} was trained with another {key.replace('_', ' ')} "
                                  f"({meta[key]}, now {value}): resume with the same one or "
                                  "choose a new --out")  # fmt: skip
        wanted = dataclasses.asdict(exp.train)
        saved = {**dataclasses.asdict(type(exp.train)()), **meta["experiment"].get("train", {})}
        changed = [k for k in wanted if saved.get(k) != wanted[k]]
        fixed = [k for k in changed if k not in RESUMABLE]
        if fixed:
            was = " ".join(f"train.{k}={saved.get(k)}" for k in fixed)
            raise ConfigError(
                f"{run} was trained with {was} (this run asks for "
                + ", ".join(f"{wanted[k]}" for k in fixed)
                + f"): resume with those settings (add {was}) or choose a new --out"
            )
        return [f"train.{k}: {saved.get(k)} -> {wanted[k]}" for k in changed]

    def load(self, modules: dict[str, nn.Module], map_location) -> dict:
        d = self._live_dir()
        for name, m in modules.items():
            path = d / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"training state in {d} has no {name}.safetensors")
            load_state_dict_into(m, path)
        try:
            with warnings.catch_warnings():  # torch warns about the protocol of any pickle
                warnings.simplefilter("ignore", UserWarning)
                return torch.load(d / "state.pt", map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            refused = "weights only" in str(e).lower()
            why = (
                "refused: it holds objects other than tensors and plain containers, which "
                "could run code"
                if refused
                else f"corrupt: {e}"
            )
            raise CheckpointError(
                f"{d / 'state.pt'} is not a training state rqgen can read ({why.splitlines()[0]})"
                f"; remove {d} to start the run over"
            ) from e


def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def check_shared_output(out: Path, rt: Runtime) -> None:
    """Every rank must see the directory rank 0 writes to: with node-local output the other
    nodes would start at step 0 with their own schedule and hang at the end. Rank 0 writes a
    random token into `out`, every rank reads it back; a rank that cannot is named."""
    if rt.world_size == 1:
        return
    import secrets

    path = out / ".rank0-token"
    token = [secrets.token_hex(8) if rt.is_main else None]
    if rt.is_main:
        path.write_text(token[0])
    torch_dist.broadcast_object_list(token, src=0)  # after the write: the file is there
    try:
        seen = path.read_text() == token[0]
    except OSError:
        seen = False
    flags = gather_objects(seen, rt)
    if rt.is_main:
        path.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(flags) if not ok]
    if blind:
        raise ConfigError(
            f"rank(s) {blind} do not see what rank 0 writes in --out {out} (node-local "
            "storage?): put --out on a filesystem that every node shares"
        )


@contextlib.contextmanager
def claim_output(out: Path, rt: Runtime, model_types: tuple[str, ...], what: str):
    """Before a run writes anything: `out` is a writable directory not holding another kind
    of model, and no other run trains into it (an advisory lock, held until the block ends).
    Rank 0 checks; every rank learns the outcome, so none is left waiting at a collective."""
    created = not out.exists()

    def claim() -> RunLock | None:
        if not rt.is_main:
            return None
        check_output_dir(out, model_types, what)
        return RunLock(out)

    lock = agree(rt, claim)
    try:
        check_shared_output(out, rt)
        yield
    except BaseException:
        if lock is not None and created:  # a run that failed at once leaves no empty --out
            lock.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()  # only if nothing else was written
        raise
    finally:
        if lock is not None:
            lock.release()


class StopWhileLoading(Exception):
    """A stop signal arrived while a single-process run was loading its next batches."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])


def scheduled_lr(step: int, base: float, warmup: int, total: int, schedule: str = "cosine",
                 min_ratio: float = 0.0) -> float:  # fmt: skip
    """Linear warm-up over `warmup` steps, then constant (the paper's stage 1) or a cosine
    decay to base·min_ratio at step `total` (its stage 2)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------ trainer base


class Trainer:
    """What both trainers share: autocast, DDP accumulation, NaN stop, rank-mean metrics."""

    rt: Runtime
    out: Path
    step: int
    model: nn.Module
    ema: WeightEMA | None
    precision: str = "fp32"
    scaler: torch.amp.GradScaler
    quiet: bool = False
    resume_changes: tuple[str, ...] | list[str] = ()  # train.x: old -> new, when resumed
    stop_requested: str | None = None  # the stop signal received, if any
    stop_agreed: bool = False  # every rank saves and stops after this step
    _loading: bool = False  # fetching the next batches (see fetch)

    def _set_precision(self, name: str) -> None:
        """Autocast dtype for forward passes, and a gradient scaler for fp16 (whose 5-bit
        exponent underflows small gradients without it; bf16 and fp32 need none)."""
        self.precision = resolve_precision(name, self.rt.device)
        self.scaler = self._new_scaler()

    def _new_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.rt.device.type, enabled=self.precision == "fp16")

    def public_model(self) -> nn.Module:
        """The model to save and score: a copy holding the EMA weights when EMA is on."""
        if self.ema is None:
            return self.model
        m = type(self.model)(self.model.config).to(self.rt.device)
        m.load_state_dict(self.ema.shadow)
        return m

    def announce_resume(self) -> None:
        """Settings a resumed run changed (e.g. more steps): said once and logged."""
        if self.resume_changes and self.rt.is_main:
            if not self.quiet:
                print(f"rqgen: resuming at step {self.step} with " + "; ".join(self.resume_changes))
            self.log.log(self.step, resumed_with=self.resume_changes)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=PRECISIONS[self.precision])

    @staticmethod
    def _load_scaler(scaler: torch.amp.GradScaler, state: dict | None) -> None:
        """A scaler state is only written by an fp16 run (a disabled scaler's is empty)."""
        if scaler.is_enabled() and state:
            scaler.load_state_dict(state)

    @contextlib.contextmanager
    def stop_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM ask the loop to save a checkpoint at the end of the
        current step and stop (`stop_agreed`); a second signal stops at once. Outside the
        main thread (where signals cannot be caught) nothing changes."""
        self.stop_requested, self.stop_agreed = None, False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_requested is not None:
                raise KeyboardInterrupt  # the second signal: no checkpoint, stop now
            self.stop_requested = signal.Signals(signum).name
            if self._loading:
                raise StopWhileLoading

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def fetch(self, stream: Iterator, n: int) -> list:
        """The step's n micro-batches. Loading can take seconds (large files, a slow disk):
        in a single-process run a stop signal meanwhile abandons the half-loaded step at once
        (StopWhileLoading) instead of waiting for it, with the RNG put back as the step found
        it, so that the checkpoint saved then equals one saved at the step boundary. Several
        ranks must agree on the step they stop after, so they stop at its end."""
        if self.rt.world_size > 1:
            return [next(stream) for _ in range(n)]
        before = rng_state()
        self._loading = True
        try:
            return [next(stream) for _ in range(n)]
        except StopWhileLoading:
            set_rng_state(before)
            raise
        finally:
            self._loading = False

    def stopped(self) -> Interrupted:
        return Interrupted(
            f"interrupted ({self.stop_requested or 'signal on another rank'}) at step "
            f"{self.step}: checkpoint saved in {self.out}; rerun the same command to resume"
        )

    def _stop_if_nonfinite(self, nonfinite: bool, loss: float) -> None:
        """Stop before the optimizer step, on every rank at once (no rank left waiting).
        The same collective carries a pending stop signal, so every rank stops after the
        same step even when the signal reached them at different moments."""
        stop = float(self.stop_requested is not None)
        flag = torch.tensor([float(nonfinite), stop], device=self.rt.device)  # NCCL: on GPU
        if self.rt.world_size > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        diverged, stop_agreed = flag.tolist()  # one host synchronisation per step
        self.stop_agreed = stop_agreed > 0
        if diverged > 0:
            raise TrainingError(
                f"loss became {loss} at step {self.step + 1}; the last checkpoint in "
                f"{self.out} is intact: lower train.lr, set train.grad_clip, or check the data"
            )

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Logged losses describe the global batch, not rank 0's share of it."""
        if self.rt.world_size == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor(
            [metrics[k] for k in keys], dtype=torch.float64, device=self.rt.device
        )
        torch_dist.all_reduce(values)
        return dict(zip(keys, (values / self.rt.world_size).tolist()))
