"""Fine-tuning starts: the weights of `train.init_from` (a model directory or hub repository,
rqgen's own or a converted official one) copied into a freshly built model, before the first
step. The optimizer, schedule and step count start over; a shape that cannot carry over is
refused in one line naming the tensor.

Stage 2 adapts one thing: the condition embedding. A new number of classes re-initialises
the class rows and keeps the learned null row (the unconditional start, and the null of
classifier-free guidance); `model.conditioning=none` keeps the null row alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rqgen.errors import ConfigError
from rqgen.train.parallel import is_sharded, load_state


def start_from(model: nn.Module, source: nn.Module, name: str, adapt: bool = False) -> None:
    """Copy `source`'s weights into `model` (every rank: each keeps its shard under FSDP).
    With `adapt`, the condition embedding may change its number of rows; the transformer's
    frozen copy of the VAE codebook is never taken from `source` (it is the current VAE's)."""
    if source.model_type != model.model_type:
        raise ConfigError(
            f"train.init_from={name} holds a {source.model_type}, not a {model.model_type}: "
            "start from a model of the same kind"
        )
    own = model.state_dict()
    theirs = source.state_dict()
    state: dict[str, Tensor] = {}
    for key, mine in own.items():
        if adapt and key == "codebook":
            state[key] = _full(mine)
            continue
        if key not in theirs:
            raise ConfigError(f"train.init_from={name} has no tensor {key}: not the same model")
        value = theirs[key]
        if tuple(value.shape) != tuple(mine.shape):
            if adapt and key == "cond_emb.weight" and value.shape[1:] == mine.shape[1:]:
                value = _new_classes(_full(mine), value)
            else:
                raise ConfigError(
                    f"train.init_from={name}: {key} is {tuple(value.shape)} there but "
                    f"{tuple(mine.shape)} here: give the same model.* settings as that model"
                )
        state[key] = value.to(mine.dtype)
    extra = sorted(set(theirs) - set(own))
    if extra:
        raise ConfigError(f"train.init_from={name} has a tensor {extra[0]} this model lacks")
    if is_sharded(model):
        load_state(model, state)
    else:
        with torch.no_grad():
            model.load_state_dict({k: v.to(own[k].device) for k, v in state.items()})


def _new_classes(fresh: Tensor, learned: Tensor) -> Tensor:
    """The fresh class rows of this model with the learned null row (the last) of the old."""
    out = fresh.clone()
    out[-1] = learned[-1].to(out.dtype)
    return out


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()
