"""The claim a run makes on its output directory before writing anything: OUT is usable,
no other run trains into it, and every rank sees what rank 0 writes there."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

import torch.distributed as torch_dist

from rqgen.distributed import Runtime, gather_objects, meet_after
from rqgen.errors import ConfigError
from rqgen.utils.files import RunLock, check_output_dir


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
