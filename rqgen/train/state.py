"""What a run leaves to resume from: `OUT/train_state/` (weights, optimizer, counters and
every rank's RNG), the claim on OUT, and the random streams themselves."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import random
import secrets
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from rqgen.checkpoint import save_state_dict, write_json
from rqgen.distributed import Runtime, gather_objects, meet_after
from rqgen.errors import CheckpointError, ConfigError
from rqgen.train.parallel import load_weights
from rqgen.utils.files import DiskFullError, RunLock, check_output_dir, write_failed

# ------------------------------------------------------------------ random streams


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # the CPU generator and every CUDA device's


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A rank's stream when no saved one fits (a fresh run, or a resume at another world
    size): distinct per rank and per step, the same on every rerun."""
    if step == 0:
        return seed + rank  # fresh runs: rank 0 draws as a single process would
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def rng_state(device: torch.device) -> dict:
    """This process's generators: the CPU one and, on a GPU, that device's (dropout there
    draws from it)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_rng(saved: dict, rt: Runtime, seed: int, step: int) -> None:
    """Each rank's own saved stream when the run had as many ranks as this one (an old
    single-process state's one stream too); otherwise a fresh one per rank from
    (seed, rank, step), so that no two ranks draw the same dropout masks."""
    per_rank = saved.get("rng_ranks")
    if per_rank and len(per_rank) == rt.world_size:
        set_rng_state(per_rank[rt.rank], rt.device)
    elif per_rank is None and rt.world_size == 1 and "rng" in saved:
        set_rng_state(saved["rng"], rt.device)
    else:
        seed_everything(rank_seed(seed, rt.rank, step))


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
            load_weights(m, path)
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


def sees_token(path: Path, token: str, attempts: int = 6, wait_s: float = 0.25) -> bool:
    """Whether `path` holds `token`, retried with a growing wait: an NFS client caches a
    directory's attributes (and a lookup that found nothing) for seconds, so a file rank 0
    has just written can look absent at first. Listing the directory revalidates it."""
    for i in range(attempts):
        with contextlib.suppress(OSError):
            os.listdir(path.parent)
            if path.read_text() == token:
                return True
        if i + 1 < attempts:
            time.sleep(wait_s * 2**i)
    return False


def check_shared_output(out: Path, rt: Runtime) -> None:
    """Every rank must see the directory rank 0 writes to: with node-local output the other
    nodes would start at step 0 with their own schedule and hang at the end. Rank 0 writes a
    random token into `out`, every rank reads it back; a rank that cannot is named."""
    if rt.world_size == 1:
        return
    path = out / ".rank0-token"
    token = [secrets.token_hex(8) if rt.is_main else None]
    if rt.is_main:
        path.write_text(token[0])
    torch_dist.broadcast_object_list(token, src=0)  # after the write: the file is there
    flags = gather_objects(rt.is_main or sees_token(path, token[0]), rt)
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

    lock = meet_after(rt, claim)
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
