"""Finished training runs, kept in the repository, so a study longer than one sitting goes
on from them on a fresh checkout instead of training them again.

A run's record (benchmarks/results/runs/<hash of its key>.json) holds what studies read of
it (held-out scores, the trainer's held-out PSNR at each evaluation, residual scales) under
a key made of all that decides the run: the resolved config (preset, overrides, steps, seed)
and the data. Two studies that train the same run share one record. The checkout's commit
when the run was kept is noted for the reader. Delete a record to train its run again, e.g. after a
change to training or evaluation that keeps every config field as it was.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from common import RESULTS

RUNS = RESULTS / "runs"


def run_key(preset: str, overrides: list[str], data: str) -> dict:
    """Everything that decides a `rqgen train-vae` run: its resolved config and data."""
    from rqgen.configs import load_vae_experiment, to_dict

    return {"config": to_dict(load_vae_experiment(preset, overrides)), "data": data}


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return RUNS / f"{digest[:20]}.json"


def get(key: dict) -> dict | None:
    """The kept result of the run `key` describes, or None when it has no record."""
    path = _path(key)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["key"] != key:  # a hash collision, or a hand-edited record
        raise RuntimeError(f"{path} holds another run; delete it to train this one")
    return {**record["result"], "commit": record["commit"]}


def put(key: dict, result: dict, source: str | None = None, trained_at: str | None = None) -> dict:
    """Keep `result` (minus the study's labels) as the record of the run `key`, trained at
    this checkout's commit unless `trained_at` says otherwise, and first reported in `source`
    when that is not the study that keeps it; returns it as `get` would."""
    result = {k: v for k, v in result.items() if k not in ("variant", "seed", "commit")}
    result = json.loads(json.dumps(result))  # as it reads back
    path = _path(key)
    if path.is_file() and (old := json.loads(path.read_text()))["result"] == result:
        return {**result, "commit": old["commit"]}  # the same run scored again: as it was
    record = {"key": key, "commit": trained_at or commit(), "source": source, "result": result}
    RUNS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return {**result, "commit": record["commit"]}


def commit() -> str:
    """The checkout's commit, with `+` when it has uncommitted changes to rqgen/."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "rqgen"]).returncode
    return rev.stdout.strip() + ("+" if dirty else "")
