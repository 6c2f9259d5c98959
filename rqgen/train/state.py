"""What a run leaves to resume from, `OUT/train_state/` (weights, optimizers, counters and
every rank's RNG), and the random streams themselves."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException

from rqgen.checkpoint import save_state_dict, write_json
from rqgen.distributed import Runtime, from_rank0, gather_objects
from rqgen.errors import CheckpointError, ConfigError
from rqgen.train import sharded
from rqgen.train.parallel import load_weights
from rqgen.utils.files import DiskFullError, write_failed

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
RESUMABLE = frozenset(
    {
        "steps",
        "log_every",
        "ckpt_every",
        "eval_every",
        "sample_every",
        "val_batches",
        "patience",
        "num_workers",
        "dist_timeout",
        "compile",
        "activation_checkpointing",
        "extract_workers",
        "features",
    }
)


class TrainState:
    """`OUT/train_state/`: everything needed to resume, swapped in atomically.

        shards/           every rank's slices of the weights, optimizer moments and EMA
                          (sharded safetensors: see train/sharded.py)
        state.json        step, counters, optimizer hyper-parameters, scaler states
        rng.safetensors   every rank's generator states
        meta.json         the experiment, the data source, the run's identity

    Written into train_state.tmp (each rank its shards, rank 0 the rest) and swapped in by
    rank 0. The earlier layout (`<name>.safetensors` + `state.pt`) still resumes.
    """

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "train_state"

    def exists(self) -> bool:
        """On this rank's view of OUT: callers ask rank 0 (`from_rank0`)."""
        return _complete(self._live_dir())

    def _live_dir(self) -> Path:
        # A crash between the two renames in save() leaves only train_state.old.
        return self.dir if _complete(self.dir) else self.dir.with_suffix(".old")

    def save(
        self,
        rt: Runtime,
        modules: dict[str, nn.Module],
        optimizers: sharded.Optimizers,
        plain: dict[str, dict[str, Tensor]],
        counters: dict,
        rngs: list[dict],
        meta: dict,
    ) -> None:
        """Every rank. A failed write (a full disk) removes the partial copy, leaves the
        previous state as it was, and says so in one line with the bytes it needs."""
        tmp = self.dir.with_suffix(".tmp")

        def fresh() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        from_rank0(rt, fresh)
        try:
            groups, failure = (
                sharded.save(tmp / "shards", modules, optimizers, plain, rt.world_size > 1),
                None,
            )
        except (OSError, RuntimeError, DiskFullError, CheckpointException) as e:
            groups, failure = {}, _first_cause(e)
        failures = gather_objects(None if failure is None else repr(failure), rt)

        def finish() -> None:
            error: BaseException | None = failure
            if error is None and any(failures):
                error = OSError(errno.EIO, next(f for f in failures if f))
            if error is None:
                try:
                    save_state_dict(_rng_tensors(rngs), tmp / "rng.safetensors")
                    write_json(tmp / "state.json", {**counters, "optimizers": groups})
                    write_json(tmp / "meta.json", meta)
                except (OSError, DiskFullError) as e:
                    error = e
            if error is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(error, RuntimeError) and "write" not in str(error).lower():
                    raise error
                cause = error.__cause__ if isinstance(error, DiskFullError) else error
                err = cause if isinstance(cause, OSError) else OSError(errno.ENOSPC, str(error))
                need = sharded.nbytes(modules, optimizers, plain) * rt.world_size
                raise write_failed(self.dir, err, need) from error
            old = self.dir.with_suffix(".old")
            shutil.rmtree(old, ignore_errors=True)
            if self.dir.exists():
                os.replace(self.dir, old)
            os.replace(tmp, self.dir)  # the swap: a crash before it keeps the old state
            shutil.rmtree(old, ignore_errors=True)

        from_rank0(rt, finish)

    def load(
        self,
        rt: Runtime,
        modules: dict[str, nn.Module],
        optimizers: sharded.Optimizers,
        plain: dict[str, dict[str, Tensor]],
    ) -> dict:
        """Every rank: weights, optimizer states and plain tensors in place (each rank its
        slices), and the counters with every saved rank's RNG (`rng_ranks`). An earlier
        layout returns its state.pt dict, for the trainer to restore the optimizers from."""
        d = self._live_dir()
        if not (d / "state.json").is_file():
            return self._load_legacy(modules, rt.device)
        try:
            state = json.loads((d / "state.json").read_text())
            sharded.load(
                d / "shards", modules, optimizers, plain, state.pop("optimizers"), rt.world_size > 1
            )
            rngs = load_file(str(d / "rng.safetensors"))
        except (OSError, RuntimeError, KeyError, ValueError, CheckpointException) as e:
            why = str(_first_cause(e)).strip().splitlines()[0]
            raise CheckpointError(
                f"{d} is not a training state rqgen can read ({why}); "
                f"remove {d} to start the run over"
            ) from None
        n = 1 + max(int(k.split(".")[0]) for k in rngs)
        ranks = [
            {k.split(".")[1]: v for k, v in rngs.items() if k.startswith(f"{r}.")} for r in range(n)
        ]
        return {**state, "rng_ranks": ranks}

    def meta(self) -> dict:
        path = self._live_dir() / "meta.json"
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise CheckpointError(
                f"{path} is unreadable ({e}); remove {path.parent} to start the run over"
            ) from e

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
            raise ConfigError(
                f"{run} was trained on --data {meta['data']}, not {data}: resume "
                "with the same --data or choose a new --out"
            )
        for key, value in (identity or {}).items():
            if key in meta and meta[key] != value:
                raise ConfigError(
                    f"{run} was trained with another {key.replace('_', ' ')} "
                    f"({meta[key]}, now {value}): resume with the same one or "
                    "choose a new --out"
                )
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

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The full tensors of one module (or optimizer, or EMA) of the saved state."""
        d = self._live_dir()
        if not (d / "state.json").is_file():  # the earlier layout
            return load_file(str(d / f"{name}.safetensors"))
        return sharded.read_full(d / "shards", f"{name}.")

    def counters(self) -> dict:
        """step, scaler states, best loss... of the saved state (state.json)."""
        return json.loads((self._live_dir() / "state.json").read_text())

    def _load_legacy(self, modules: dict[str, nn.Module], map_location) -> dict:
        """The earlier layout: state.pt (tensors and plain containers only, read with
        weights_only=True, before anything else) and one safetensors file per module,
        which every rank reads whole."""
        d = self._live_dir()
        try:
            with warnings.catch_warnings():  # torch warns about the protocol of any pickle
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(d / "state.pt", map_location=map_location, weights_only=True)
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
        for name, m in modules.items():
            path = d / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"training state in {d} has no {name}.safetensors")
            load_weights(m, path)
        return state


def _complete(d: Path) -> bool:
    """A whole train state: today's layout or the earlier one (each written last)."""
    return (d / "state.json").is_file() or (d / "state.pt").is_file()


def _rng_tensors(rngs: list[dict]) -> dict[str, Tensor]:
    return {f"{r}.{k}": v for r, state in enumerate(rngs) for k, v in state.items()}


def _first_cause(e: BaseException) -> BaseException:
    """The error behind a checkpoint failure (DCP wraps each rank's in its own type)."""
    if isinstance(e, CheckpointException) and e.failures:
        wrapped = next(iter(e.failures.values()))  # (exception, traceback frames)
        cause = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exc", wrapped)
        return cause if isinstance(cause, BaseException) else RuntimeError(str(cause))
    return e
