"""Checkpoint directories: `config.json` + `model.safetensors`, written atomically.

Every model class mixes in `Pretrained`, which gives `save_pretrained(dir)` and
`from_pretrained(dir)`. Files are written to a temporary name and renamed into place, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from rqgen.card import write_card
from rqgen.errors import CheckpointError, ConfigError
from rqgen.hub import resolve
from rqgen.utils.files import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def read_config(directory: str | os.PathLike) -> dict:
    """`config.json` of a model directory: a JSON object with a `model_type` and a `config`
    mapping, else one line naming the file."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"'{directory}' is not a model directory (no {CONFIG_NAME}): "
            "pass a directory written by save_pretrained or by rqgen training"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise CheckpointError(
            f"{path} is not an rqgen model config (no 'config' mapping); the checkpoint is "
            "corrupt or was written by another program"
        )
    return raw


_KINDS = {  # an annotation -> what a value read from JSON must be
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, (list, tuple)),
    "tuple": lambda v: isinstance(v, (list, tuple)),
}


def _check_types(config, source: Path) -> None:
    """Each field of a config read from JSON has the type its annotation names (a NaN, a
    string or a list where a number belongs would fail deep inside the model, or not at all)."""
    for f in dataclasses.fields(config):
        kind, value = str(f.type).split(" |")[0].split("[")[0], getattr(config, f.name)
        if value is None and "None" in str(f.type):
            continue
        if not _KINDS.get(kind, lambda v: True)(value):
            raise CheckpointError(
                f"{source}: {f.name}={value!r} is not a valid {kind}; the "
                "checkpoint is corrupt or was edited by hand"
            )


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda tmp: save_file(tensors, tmp), needed_bytes=size)


def current_name(key: str, former: dict[str, str]) -> str:
    """`key` with the module names a model has since renamed (`former`: old -> new, matched
    as whole dotted segments anywhere in the key, so prefixed keys of a train state too)."""
    return ".".join(former.get(p, p) for p in key.split(".")) if former else key


def current_names(state: dict, former: dict[str, str]) -> dict:
    return {current_name(k, former): v for k, v in state.items()}


def load_state_dict_into(module: torch.nn.Module, path: str | os.PathLike, apply=None) -> None:
    """Strict load that names what does not match instead of a wall of text. `apply(state)`
    replaces `module.load_state_dict` (a sharded model loads through its own door)."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"cannot read weights {path}: {e}") from e
    state = current_names(state, getattr(module, "former_names", {}))
    own = module.state_dict()
    optional = set(getattr(module, "optional_state", ()))  # may be absent from older files
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    common = set(own) & set(state)
    wrong = sorted(k for k in common if own[k].shape != state[k].shape)
    # load_state_dict would cast an integer tensor into a float parameter without a word
    kind = sorted(k for k in common if own[k].is_floating_point() != state[k].is_floating_point())
    if missing or unexpected or wrong or kind:
        parts = []
        for name, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with another shape", wrong),
            ("of another dtype kind (integer vs float)", kind),
        ):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {keys[0]})")
        raise CheckpointError(
            f"weights in {path} do not match the config next to them: "
            + "; ".join(parts)
            + ": the directory mixes files from different models"
        )
    bad = next(
        (k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None
    )
    if bad is not None:
        raise CheckpointError(
            f"weights in {path} hold NaN or infinite values (e.g. {bad}): the run diverged "
            "or the file is corrupt; use an earlier checkpoint"
        )
    if apply is not None:
        apply(state)
        return
    module.load_state_dict(state, strict=not (optional & (set(own) - set(state))))


class Pretrained:
    """Mixin: `save_pretrained(dir)` / `from_pretrained(dir)` for a model built from a config."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, directory: str | os.PathLike, **extra: Any) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.state_dict(), directory / WEIGHTS_NAME)
        cfg = {"model_type": self.model_type, "config": dataclasses.asdict(self.config)}
        cfg = {**cfg, "parameters": sum(p.numel() for p in self.parameters()), **extra}
        write_json(directory / CONFIG_NAME, cfg)
        write_card(directory)  # and again by each evaluation, from config.json
        return directory

    @classmethod
    def config_from_dict(cls, raw: dict, source: Path | str = "config") -> Any:
        """The config dataclass from its JSON form, with every field's type checked and,
        where the field has a validation rule, its range (`source` names the file)."""
        # here, not at the top: the configs import the models, which import this module
        from rqgen.configs.validate import RULES, check_fields

        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise CheckpointError(
                f"{source}: {cls.__name__} config has unknown keys {unknown}: "
                "the checkpoint was written by a newer or different rqgen"
            )
        config = cls.config_class(**raw)
        _check_types(config, source)
        if type(config).__name__ in RULES:
            try:
                check_fields(config, "config")
            except ConfigError as e:
                raise CheckpointError(f"{source}: {e}") from e
        return config

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str = "cpu", local_files_only: bool = False
    ):
        """A model directory written by `save_pretrained`, or a hub repository 'org/name'
        (optionally '@revision'), read through huggingface_hub's cache."""
        directory = resolve(directory, local_files_only)
        raw = read_config(directory)
        if raw.get("model_type") != cls.model_type:
            raise CheckpointError(
                f"'{directory}' holds a {raw.get('model_type')!r} model, not {cls.model_type!r}: "
                "check which directory you passed"
            )
        source = directory / CONFIG_NAME
        config = cls.config_from_dict(raw["config"], source)
        try:
            model = cls(config)
        except (ValueError, TypeError, RuntimeError) as e:  # a combination no model allows
            raise CheckpointError(f"{source} does not describe a valid model: {e}") from e
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"'{directory}' has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        load_state_dict_into(model, weights)
        return model.to(map_location).eval()
