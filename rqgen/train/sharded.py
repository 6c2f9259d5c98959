"""Training tensors as sharded safetensors files (torch.distributed.checkpoint).

Each rank writes the shards it holds (FSDP: its slice of every weight and AdamW moment;
DDP: its share of the replicated tensors, each written once) and reads back only the
slices it needs, so no GPU ever holds the full state and a run resumes at any number of
ranks: the files record each shard's offsets, and a rank reads the overlap with its own.
The format is safetensors with JSON headers (torch's Hugging Face storage): reading a
state runs no unpickler.

Names in the files: `<module>.<parameter>`, `<optimizer>.<parameter>.<exp_avg|...>` and
`<group>.<key>` for plain tensors (an EMA); what is not a tensor (optimizer hyper-
parameters) is returned for the caller to keep as JSON.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rqgen.checkpoint import current_name, save_state_dict

Optimizers = dict[str, tuple[nn.Module, torch.optim.Optimizer]]
SINGLE_FILE = "shard-00001-model-00001-of-00001.safetensors"  # the name DCP gives rank 0's
# how the optimizer is run, not what it learned: the resuming run's own choice wins
RUNTIME_KEYS = ("foreach", "fused", "capturable", "differentiable")


def _tensors(
    modules: dict[str, nn.Module], optimizers: Optimizers, plain: dict[str, dict[str, Tensor]]
) -> tuple[dict[str, Tensor], dict]:
    """Flat {name: tensor} of everything (sharded where the model is), and the optimizers'
    param groups."""
    flat: dict[str, Tensor] = {}
    groups: dict[str, list] = {}
    for name, module in modules.items():
        flat |= {f"{name}.{k}": v for k, v in get_model_state_dict(module).items()}
    for name, (module, opt) in optimizers.items():
        sd = get_optimizer_state_dict(module, opt)  # initialises an empty state first
        for param, state in sd["state"].items():
            flat |= {f"{name}.{param}.{k}": v for k, v in state.items()}
        groups[name] = sd["param_groups"]
    for name, tensors in plain.items():
        flat |= {f"{name}.{k}": v for k, v in tensors.items()}
    return flat, groups


def nbytes(modules: dict[str, nn.Module], optimizers: Optimizers, plain: dict) -> int:
    """Bytes this rank would write."""
    flat, _ = _tensors(modules, optimizers, plain)
    return sum(_local(t).numel() * t.element_size() for t in flat.values())


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def save(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: Optimizers,
    plain: dict[str, dict[str, Tensor]],
    distributed: bool,
) -> dict:
    """Every rank: write this rank's shards into the directory `path`. Returns the
    optimizers' param groups (JSON-able) for the caller to keep."""
    flat, groups = _tensors(modules, optimizers, plain)
    if distributed:
        writer = HuggingFaceStorageWriter(str(path), save_distributed=True)
        dcp.save(flat, storage_writer=writer)
    else:  # one process holds every tensor whole: the same file format, written directly
        path.mkdir(parents=True, exist_ok=True)
        save_state_dict(flat, path / SINGLE_FILE)  # atomic, with the user's umask
    return {name: [_jsonable(g) for g in gs] for name, gs in groups.items()}


def load(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: Optimizers,
    plain: dict[str, dict[str, Tensor]],
    groups: dict,
    distributed: bool,
) -> None:
    """Every rank: read into `modules`, `optimizers` and the `plain` tensors in place, each
    rank only its own slices. A parameter that had no optimizer state when saved (it never
    had a gradient) gets none now."""
    reader = HuggingFaceStorageReader(str(path))
    saved = set(reader.read_metadata().state_dict_metadata)
    flat, _ = _tensors(modules, optimizers, plain)
    stored = _stored_names(flat, saved, [*modules.values(), *(m for m, _ in optimizers.values())])
    missing = sorted(k for k in flat if stored[k] not in saved and not _is_optim(k, optimizers))
    if missing:
        raise KeyError(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    wanted = {k: v for k, v in flat.items() if stored[k] in saved}
    files = sorted(path.glob("*.safetensors"))
    whole = None if distributed or len(files) != 1 else load_file(str(files[0]))
    if whole is not None and all(whole[stored[k]].shape == v.shape for k, v in wanted.items()):
        for k, v in wanted.items():  # one file of whole tensors, read by one process
            v.copy_(whole[stored[k]])
    else:  # slices of several ranks' files, each rank reading the overlap with its own
        with _single_process_quiet():
            by_file = {stored[k]: v for k, v in wanted.items()}
            dcp.load(by_file, storage_reader=reader, no_dist=not distributed)
    del whole
    # The plain tensors (an EMA) were the load's targets themselves; the modules' state
    # dicts may be views or copies depending on the wrapper, so they go through torch's door.
    options = StateDictOptions(strict=True)
    for name, module in modules.items():
        prefix = f"{name}."
        sd = {k[len(prefix) :]: v for k, v in wanted.items() if k.startswith(prefix)}
        set_model_state_dict(module, sd, options=options)
    for name, (module, opt) in optimizers.items():
        _restore_optimizer(module, opt, wanted, name, groups[name])


def _stored_names(flat: dict, saved: set[str], models: list[nn.Module]) -> dict[str, str]:
    """The name each tensor has in the state: its own, or the one it had before a module
    was renamed (a state written before the rename resumes)."""
    former: dict[str, str] = {}
    for m in models:
        former |= getattr(m, "former_names", {})
    back = {new: old for old, new in former.items()}
    return {k: k if k in saved else current_name(k, back) for k in flat}


# DCP logs a debug event per tensor and call to a logger it sets to DEBUG: thousands of
# records per checkpoint that nobody reads
logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.WARNING)


def read_full(path: Path, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor under `prefix` as a full tensor, in this process (inspecting or
    converting a state; training reads its own slices through `load`)."""
    reader = HuggingFaceStorageReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix)
    }
    with _single_process_quiet():
        dcp.load(out, storage_reader=reader, no_dist=True)
    return {k[len(prefix) :]: v for k, v in out.items()}


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save and load that it is single-process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _restore_optimizer(
    module: nn.Module, opt: torch.optim.Optimizer, loaded: dict, name: str, groups: list[dict]
) -> None:
    """The optimizer's own state tensors were the targets of the load (loaded in place):
    only the parameters that had no saved state lose theirs, and the hyper-parameters come
    from `groups`. No second copy of the moments is made."""
    params = dict(module.named_parameters())
    current = get_optimizer_state_dict(module, opt)
    in_place = all(
        fqn in params and all(v is opt.state[params[fqn]].get(k) for k, v in entries.items())
        for fqn, entries in current["state"].items()
    )
    if not in_place:  # an optimizer that hands out copies: load them through torch's door
        state = {
            fqn: {k: loaded[f"{name}.{fqn}.{k}"] for k in entries}
            for fqn, entries in current["state"].items()
            if all(f"{name}.{fqn}.{k}" in loaded for k in entries)
        }
        param_groups = [
            {**_from_json(g), **{k: cur[k] for k in (*RUNTIME_KEYS, "params") if k in cur}}
            for g, cur in zip(groups, current["param_groups"])
        ]
        opt.state.clear()
        set_optimizer_state_dict(module, opt, {"state": state, "param_groups": param_groups})
        return
    for fqn, entries in current["state"].items():
        if not all(f"{name}.{fqn}.{k}" in loaded for k in entries):
            opt.state.pop(params[fqn], None)  # it never had a gradient when saved
    for group, saved in zip(opt.param_groups, groups):
        group.update(
            {k: v for k, v in _from_json(saved).items() if k != "params" and k not in RUNTIME_KEYS}
        )


def _is_optim(key: str, optimizers: Optimizers) -> bool:
    return any(key.startswith(f"{name}.") for name in optimizers)


def _jsonable(group: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}


def _from_json(group: dict) -> dict:
    return {k: (tuple(v) if k == "betas" else v) for k, v in group.items()}
