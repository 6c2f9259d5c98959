"""How many GPUs does an RQ-Transformer need? Bytes per GPU of weights, gradients, optimizer
state and activations under DDP or FSDP, with and without activation checkpointing, and the
largest micro-batch that fits (`rqgen plan`).

The model: training keeps fp32 master weights (4 bytes / parameter), fp32 gradients (4) and
AdamW's two moments (8); DDP replicates all 16 bytes on every GPU, FSDP shards them over the
GPUs and gathers one block at a time (two in flight with prefetch). Activations are what
autograd saves per token and per block of `Block` (pre-LN attention + 4× GELU MLP):

    fp32 LayerNorm inputs (2 × C, autocast keeps LayerNorm in fp32),
    LN outputs 2C, q k v 3C, attention output C, GELU input and output 8C    (14 C, in act dtype)
    dropout masks 2C bytes when dropout > 0,

with fused SDPA attention (flash / memory-efficient kernels keep O(tokens) statistics, no
tokens² matrix). The spatial transformer sees cond_length + T - 1 tokens, the depth
transformer T·D; the classifier's logits (T·D·K) are saved in the activation dtype, cast to
fp32 for the loss, and its log-softmax and gradient are fp32 (plus fp32 soft targets).
Checkpointing keeps only each block's input and recomputes one block at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig

GiB = 1024**3
RESERVE_BYTES = 1.5 * GiB  # CUDA context, NCCL buffers, kernels' workspaces
USABLE_FRACTION = 0.92  # the caching allocator's fragmentation


def count_params(cfg: RQTransformerConfig) -> tuple[int, int]:
    """Trainable parameters of the whole model, and of its largest block (meta device: no
    memory is allocated, so the 3.8B model costs nothing to count)."""
    with torch.device("meta"):
        model = RQTransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = max(
        sum(p.numel() for p in b.parameters())
        for t in (model.spatial_transformer, model.depth_transformer)
        for b in t.blocks
    )
    return total, block


@dataclass
class Strategy:
    name: str
    state_bytes: float  # weights + gradients + optimizer (+ gathered blocks) per GPU
    activation_bytes: float  # per sample

    def max_micro_batch(self, gpu_bytes: float) -> int:
        free = gpu_bytes * USABLE_FRACTION - RESERVE_BYTES - self.state_bytes
        return max(0, int(free // self.activation_bytes))


def activation_bytes(
    cfg: RQTransformerConfig, precision: str, soft_labels: bool, checkpointing: bool
) -> float:
    """Bytes per sample of one training step's saved activations."""
    act = 4 if precision == "fp32" else 2
    C = cfg.width
    masks = 2 * C if cfg.dropout > 0 else 0
    per_token_block = 2 * C * 4 + 14 * C * act + masks
    spatial = cfg.cond_length + cfg.T - 1
    depth = cfg.T * cfg.D
    tokens_x_layers = spatial * cfg.spatial_layers + depth * cfg.depth_layers
    logits = cfg.T * cfg.D * cfg.codebook_size * (act + 4 + 4 + 4 + (4 if soft_labels else 0))
    if cfg.text_vocab_size:
        logits += (cfg.text_length - 1) * cfg.text_vocab_size * (act + 12)
    embed = (spatial + depth) * C * (4 + act)  # embedding sums and depth inputs
    if not checkpointing:
        return tokens_x_layers * per_token_block + logits + embed
    # block inputs only, then one block recomputed at a time (its full activations again)
    kept = tokens_x_layers * C * 4
    recompute = max(spatial, depth) * per_token_block
    return kept + logits + embed + recompute


def plan(
    cfg: RQTransformerConfig,
    gpus: int,
    gpu_mem_gb: float,
    precision: str = "bf16",
    soft_labels: bool = True,
) -> dict:
    """Every strategy's bytes per GPU and largest micro-batch for `gpus` GPUs of
    `gpu_mem_gb` GiB."""
    params, block = count_params(cfg)
    state = 16 * params
    act_dtype = 4 if precision == "fp32" else 2
    # FSDP: a gathered block in the compute dtype, prefetch of the next, and its unsharded
    # gradient before the reduce-scatter
    gathered = 2 * block * (act_dtype + 4)
    strategies = []
    options = (
        ("DDP", False, False),
        ("DDP + checkpointing", False, True),
        ("FSDP", True, False),
        ("FSDP + checkpointing", True, True),
    )
    for name, sharded, ckpt in options:
        per_sample = activation_bytes(cfg, precision, soft_labels, ckpt)
        st = state / gpus + gathered if sharded else state
        strategies.append(Strategy(name, st, per_sample))
    gpu_bytes = gpu_mem_gb * GiB
    return {
        "params": params,
        "weights_bytes": 4 * params,
        "grads_bytes": 4 * params,
        "optimizer_bytes": 8 * params,
        "strategies": [
            {
                "name": s.name,
                "state_bytes_per_gpu": s.state_bytes,
                "activation_bytes_per_sample": s.activation_bytes,
                "max_micro_batch": s.max_micro_batch(gpu_bytes),
            }
            for s in strategies
        ],
    }


def recommend(result: dict, gpus: int, global_batch: int | None) -> str:
    """The simplest strategy that fits: DDP before FSDP, no checkpointing before
    checkpointing, at the micro-batch that reaches `global_batch` with the least
    gradient accumulation."""
    fitting = [s for s in result["strategies"] if s["max_micro_batch"] >= 1]
    if not fitting:
        return "does not fit even one sample per GPU: use more GPUs, or GPUs with more memory"
    if global_batch:
        per_gpu = math.ceil(global_batch / gpus)
        for s in fitting:
            if s["max_micro_batch"] >= per_gpu:
                return f"{s['name']}, micro-batch {per_gpu} per GPU, no gradient accumulation"
        best = max(fitting, key=lambda s: s["max_micro_batch"])
        accum = math.ceil(per_gpu / best["max_micro_batch"])
        return (
            f"{best['name']}, train.grad_accum={accum} (micro-batch "
            f"{math.ceil(per_gpu / accum)} per GPU)"
        )
    s = fitting[0]
    return f"{s['name']}, up to {s['max_micro_batch']} samples per GPU"
