"""The process group and the ways its ranks meet.

One process, or the group torchrun describes in the environment. Two kinds of meeting:

- Collectives (`barrier`, `gather_objects`, the tensor all-reduces of training): quick, and
  under the process group's timeout, which turns a dead or stuck rank into an error.
- Meetings after work (`meet_after`, `from_rank0`): a rank does its share of long work
  (listing or preparing a folder, extracting features), then waits for the others in the
  rendezvous store with a long timeout, not in a collective whose watchdog would kill the
  job after `train.dist_timeout`.

The rules every caller keeps:
1. Every rank makes the same calls in the same order. Whether a meeting happens is never
   decided by one rank's own view of the filesystem: rank 0 decides (`from_rank0`) and
   every rank acts on its answer.
2. No long work inside a collective: long work runs before a `meet_after` / `from_rank0`,
   whose wait is in the store.
3. An error (`RqgenError`) on any rank is raised on every rank with its message, so no rank
   walks on to a collective that the failed one never reaches.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from rqgen.errors import RqgenError
from rqgen.utils.device import resolve_device, use_device

T = TypeVar("T")

# How long a rank waits for the others' long work: a dead rank ends the whole job through
# torchrun's agent, so this only bounds a stuck one.
WORK_TIMEOUT = timedelta(hours=48)


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


# ------------------------------------------------------------------ collectives (quick)


def barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        torch_dist.barrier()


def gather_objects(obj: Any, rt: Runtime) -> list:
    """Every rank's `obj`, on every rank."""
    if rt.world_size == 1:
        return [obj]
    out = [None] * rt.world_size
    torch_dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------ meetings after work

_meetings = itertools.count()  # the same sequence on every rank (rule 1)


def _store():
    return torch_dist.distributed_c10d._get_default_store()


def _meet(rt: Runtime, message: dict, timeout: timedelta) -> list[dict]:
    """Post this rank's message under the next meeting's key, wait for every rank's."""
    n = next(_meetings)
    store = _store()
    store.set(f"rqgen/meet/{n}/{rt.rank}", json.dumps(message))
    keys = [f"rqgen/meet/{n}/{r}" for r in range(rt.world_size)]
    store.wait(keys, timeout)
    return [json.loads(store.get(k)) for k in keys]


def meet_after(rt: Runtime, fn: Callable[[], T], timeout: timedelta = WORK_TIMEOUT) -> T:
    """fn() on this rank, then wait (in the store) until every rank has run its own; the
    first error any rank raised is raised on every rank. Returns this rank's value."""
    try:
        value, error = fn(), None
    except RqgenError as e:
        value, error = None, e
    if rt.world_size > 1:
        messages = _meet(rt, {"error": None if error is None else str(error)}, timeout)
        first = next((m["error"] for m in messages if m["error"]), None)
        if first is not None and error is None:
            error = RqgenError(first)
    if error is not None:
        raise error
    return value


def from_rank0(rt: Runtime, fn: Callable[[], T], timeout: timedelta = WORK_TIMEOUT) -> T:
    """fn() on rank 0 alone; its value (JSON: plain data) or its error on every rank. The
    decisions rank 0 takes for everyone (does a listing exist, which chunks are missing)."""
    if rt.world_size == 1:
        return fn()
    value, error = None, None
    if rt.is_main:
        try:
            value = fn()
        except RqgenError as e:
            error = e
    message = {"value": value, "error": None if error is None else str(error)}
    first = _meet(rt, message, timeout)[0]
    if error is not None:
        raise error
    if first["error"] is not None:
        raise RqgenError(first["error"])
    return first["value"]
