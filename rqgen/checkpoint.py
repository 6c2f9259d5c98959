"""Checkpoint directories: `config.json` + `model.safetensors`, written atomically.

Every model class mixes in `Pretrained`, which gives `save_pretrained(dir)` and
`from_pretrained(dir)`. Files are written to a temporary name and renamed into place, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from rqgen.errors import CheckpointError
from rqgen.utils.files import umask_mode, write_failed

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: str | os.PathLike, write, needed_bytes: int | None = None) -> None:
    """Call write(tmp_path), then rename tmp_path onto path (atomic on POSIX). The file gets
    the permissions of the user's umask (mkstemp's 0o600 would hide a shared model), and a
    failed write (a full disk) leaves no temporary file and the old `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e, needed_bytes) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def read_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"'{directory}' is not a model directory (no {CONFIG_NAME}): "
            "pass a directory written by save_pretrained or by rqgen training"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda tmp: save_file(tensors, tmp), needed_bytes=size)


def load_state_dict_into(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Strict load that names what does not match instead of a wall of text."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"cannot read weights {path}: {e}") from e
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with another shape", wrong),
        ):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {keys[0]})")
        raise CheckpointError(
            f"weights in {path} do not match the config next to them: "
            + "; ".join(parts)
            + ": the directory mixes files from different models"
        )
    bad = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()),
               None)  # fmt: skip
    if bad is not None:
        raise CheckpointError(
            f"weights in {path} hold NaN or infinite values (e.g. {bad}): the run diverged "
            "or the file is corrupt; use an earlier checkpoint"
        )
    module.load_state_dict(state)


class Pretrained:
    """Mixin: `save_pretrained(dir)` / `from_pretrained(dir)` for a model built from a config."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, directory: str | os.PathLike, **extra: Any) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.state_dict(), directory / WEIGHTS_NAME)
        cfg = {"model_type": self.model_type, "config": dataclasses.asdict(self.config), **extra}
        write_json(directory / CONFIG_NAME, cfg)
        return directory

    @classmethod
    def config_from_dict(cls, raw: dict) -> Any:
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise CheckpointError(
                f"{cls.__name__} config has unknown keys {unknown}: "
                "the checkpoint was written by a newer or different rqgen"
            )
        return cls.config_class(**raw)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu"):
        directory = Path(directory)
        raw = read_config(directory)
        if raw.get("model_type") != cls.model_type:
            raise CheckpointError(
                f"'{directory}' holds a {raw.get('model_type')!r} model, not {cls.model_type!r}: "
                "check which directory you passed"
            )
        model = cls(cls.config_from_dict(raw["config"]))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"'{directory}' has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        load_state_dict_into(model, weights)
        return model.to(map_location).eval()
