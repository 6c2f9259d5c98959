"""Data parallelism for the stage-2 transformers: DDP, or FSDP2 (`fully_shard`) with every
transformer block its own shard unit, optionally with activation checkpointing per block.

Under FSDP each rank holds 1/N of the weights, gradients and AdamW state; a block's weights
are gathered just before its forward / backward and freed after. Training states are sharded
(train/sharded.py: each rank writes and reads its own slices); the public model directory
is written from full tensors gathered to rank 0 one at a time, so an FSDP run leaves the
same loadable model directory as any other.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from rqgen.checkpoint import load_state_dict_into
from rqgen.errors import ConfigError
from rqgen.stage2.block import Transformer
from rqgen.utils.device import PRECISIONS

try:  # FSDP2 is public from torch 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    FSDPModule = MixedPrecisionPolicy = fully_shard = None


def transformers(model: nn.Module) -> list[Transformer]:
    return [m for m in model.modules() if isinstance(m, Transformer)]


def mixed_precision(precision: str) -> MixedPrecisionPolicy | None:
    """FSDP's own mixed precision for bf16 / fp16 runs: each block is gathered once in the
    compute dtype (half the bytes of fp32 on the wire, no second cast by autocast) and
    gradients are reduced in fp32, which keeps the sum of many ranks' gradients exact."""
    if precision == "fp32" or MixedPrecisionPolicy is None:
        return None
    return MixedPrecisionPolicy(param_dtype=PRECISIONS[precision], reduce_dtype=torch.float32)


def hybrid_mesh(rt) -> DeviceMesh:
    """HSDP's 2-D mesh: replicate across nodes, shard over the LOCAL_WORLD_SIZE ranks of a
    node (torchrun's), so each all-gather and reduce-scatter stays inside a node and only
    the gradient all-reduce of the replicas crosses nodes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    if local < 1 or rt.world_size % local:
        raise ConfigError(
            f"train.fsdp=hybrid needs the same number of processes on every node "
            f"({rt.world_size} processes, {local} on this node)"
        )
    shape = (rt.world_size // local, local)
    return init_device_mesh(rt.device.type, shape, mesh_dim_names=("replicate", "shard"))


def wrap(
    model: nn.Module, rt, fsdp: bool | str, checkpointing: bool, precision: str = "fp32"
) -> nn.Module:
    """The module to train: `model` itself (one process, or FSDP, which shards in place) or
    its DDP wrapper. Call before creating the optimizer: FSDP replaces the parameters."""
    for t in transformers(model):
        t.checkpointing = checkpointing
    if fsdp:
        if fully_shard is None:
            raise ConfigError(f"train.fsdp needs torch >= 2.6 (this is {torch.__version__})")
        if rt.world_size > 1:
            kw = {"mp_policy": mp} if (mp := mixed_precision(precision)) is not None else {}
            if fsdp == "hybrid":
                kw["mesh"] = hybrid_mesh(rt)
            for t in transformers(model):
                for block in t.blocks:
                    fully_shard(block, **kw)
            fully_shard(model, **kw)  # the embeddings and heads: one more unit
        return model
    if rt.world_size > 1:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        # gradients as views of DDP's buckets: no second copy of every gradient
        return DDP(model, ids, gradient_as_bucket_view=True)
    return model


def is_sharded(model: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(model, FSDPModule)


def no_sync(module: nn.Module, last_micro_batch: bool):
    """Gradient accumulation: DDP reduces gradients on the last micro-batch only. FSDP
    reduce-scatters on every micro-batch: skipping it would keep each block's gradient
    unsharded (4 bytes per parameter on every GPU) until the last one, and `rqgen plan`
    counts sharded gradients."""
    if last_micro_batch or not isinstance(module, DDP):
        return contextlib.nullcontext()
    return module.no_sync()


def local_value(x) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. the gradient norm of sharded parameters)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _options(**kw) -> StateDictOptions:
    return StateDictOptions(**{"full_state_dict": True, "cpu_offload": True, **kw})


def load_weights(model: nn.Module, path: Path) -> None:
    """A safetensors file of full tensors into `model`, sharded or not (each FSDP rank
    keeps its shard)."""
    if not is_sharded(model):
        load_state_dict_into(model, path)
        return
    load_state_dict_into(model, path, apply=lambda sd: load_state(model, sd))


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full tensors (the same on every rank) into a sharded model: each rank keeps its shard."""
    set_model_state_dict(model, state, options=_options(cpu_offload=False))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on the CPU of rank 0, gathered one tensor at a time (no
    GPU holds more than one full tensor). A collective under FSDP: every rank must call
    it; ranks other than 0 get an empty dict."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    main = torch.distributed.get_rank() == 0
    out = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if main:
            out[name] = full.detach().cpu()
        del full
    return out


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state`: each rank keeps its shard."""
    set_optimizer_state_dict(model, opt, state, options=_options(cpu_offload=False))
