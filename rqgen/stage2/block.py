"""The causal `Transformer` every autoregressive model here is built of (the spatial and
depth transformers of RQ-Transformer, the flat VQ baseline, DQ-Transformer): pre-LN blocks
with SDPA attention, and the two KV caches the samplers use (growing, and static for the
compiled sampler). Module names follow the
official RQ-Transformer (`ln1, ln2, attn.{query,key,value,proj}, mlp.0, mlp.2`) so its weights
map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def row_linear(x: Tensor, weight: Tensor, bias: Tensor | None, owner) -> Tensor:
    """F.linear, except for one or two rows on CPU without autograd (a batch-1 sampling
    step, or batch 1 with guidance): there a weight at least as wide as it is deep goes
    through a cached (in, out) copy, which the BLAS matrix-vector product reads faster than
    nn.Linear's (out, in) layout on the CPUs measured (benchmarks/results/design_notes.md;
    narrow weights are slower that way and keep theirs). The copy lives on `owner`, rebuilt
    when the weight changes."""
    if (
        x.device.type != "cpu"
        or weight.shape[0] < weight.shape[1]
        or x.numel() > 2 * x.shape[-1]
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return F.linear(x, weight, bias)
    key = (weight.data_ptr(), weight._version)
    cached = owner.__dict__.get("_row_weight")
    if cached is None or cached[0] != key:
        cached = owner.__dict__["_row_weight"] = (key, weight.t().contiguous())
    rows = x.reshape(-1, x.shape[-1])
    y = rows @ cached[1] if bias is None else torch.addmm(bias, rows, cached[1])
    return y.view(*x.shape[:-1], weight.shape[0])


class RowLinear(nn.Linear):
    """nn.Linear (same parameters and keys) whose one- or two-row inference products take
    the faster layout of `row_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return row_linear(x, self.weight, self.bias, self)


class KVCache:
    """Keys and values of one attention layer, allocated once for the whole sequence.

    Growing a cache by torch.cat copies it at every step (quadratic traffic); writing into
    a preallocated buffer is a single small copy per step. Keys and values share one buffer
    (2, B, heads, max_len, head_dim) so that each step is one copy, not two.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.kv = torch.empty((2, batch, heads, max_len, head_dim), device=device, dtype=dtype)
        self.pos = 0

    def append(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """kv: (2, B, heads, n, head_dim) -> all keys and values so far."""
        n = kv.shape[3]
        if self.pos + n > self.kv.shape[3]:
            raise RuntimeError(f"KV cache of length {self.kv.shape[3]} is full")
        self.kv[:, :, :, self.pos : self.pos + n] = kv
        self.pos += n
        return self.kv[0, :, :, : self.pos], self.kv[1, :, :, : self.pos]

    def reset(self) -> None:
        self.pos = 0


class _LayerKV(nn.Module):
    def __init__(self, shape: tuple[int, ...], device, dtype):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), False)


class StaticKVCache(nn.Module):
    """Keys and values of every layer of a `Transformer` in fixed-size buffers, written at
    positions given as a tensor, attended to in full under a mask.

    Every decoding step then has the same shapes and no Python-side position, so one
    compiled step (and, on GPU, one CUDA graph of it) serves the whole sequence. Each layer's
    keys and values are buffers of their own: a compiled step writes the new rows in place
    (an indexed store into a view of one shared buffer was compiled into a copy of all of it,
    5x slower). Zero-filled, not empty: masked positions get weight 0, and 0 × NaN is NaN.
    """

    def __init__(
        self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, device, dtype
    ):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.layers = nn.ModuleList(_LayerKV(shape, device, dtype) for _ in range(layers))

    def layer(self, i: int, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What layer i's attention receives: its key and value buffers (B, H, L, Dh) and the
        position of the first new token (0-dim long tensor, or (B,): one per row)."""
        return self.layers[i].k, self.layers[i].v, pos


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.resid_drop = nn.Dropout(dropout)
        self._fused: tuple | None = None  # (version key, W_qkv, b_qkv) for inference
        self.qkv_int8: nn.Module | None = None  # the fused product in int8 (stage2/int8.py)

    def _split(self, y: Tensor) -> Tensor:
        b, t, c = y.shape
        return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, H, T, Dh)

    def _fused_qkv(self, x: Tensor) -> Tensor:
        """(3, B, H, T, Dh) by one matmul with the three projections concatenated (rebuilt
        when a weight changes). Used without autograd: sampling runs one token at a time,
        where each op dispatched costs about as much as its arithmetic."""
        b, t, c = x.shape
        if self.qkv_int8 is not None:
            y = self.qkv_int8(x)
            return y.view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        lins = (self.query, self.key, self.value)
        key = tuple((p.data_ptr(), p._version) for lin in lins for p in (lin.weight, lin.bias))
        if self._fused is None or self._fused[0] != key:
            w = torch.cat([lin.weight for lin in lins])
            self._fused = (key, w, torch.cat([lin.bias for lin in lins]))
        y = row_linear(x, self._fused[1], self._fused[2], self)  # (B, T, 3C)
        return y.view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: Tensor, cache: KVCache | tuple[Tensor, ...] | None = None) -> Tensor:
        b, t, c = x.shape
        # compiled code: the three projections as they are (the compiler fuses them; the
        # weight cache below would be a graph break)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            q, k, v = (self._split(lin(x)) for lin in (self.query, self.key, self.value))
            kv = None
        else:
            qkv = self._fused_qkv(x)
            q, kv = qkv[0], qkv[1:]
            k, v = kv[0], kv[1]
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif isinstance(cache, tuple):  # StaticKVCache: fixed shapes, position as a tensor
            k_buf, v_buf, pos = cache
            keys = torch.arange(k_buf.shape[2], device=x.device)
            if pos.dim() == 0:
                idx = pos + torch.arange(t, device=x.device)  # positions of the new tokens
                k_buf[:, :, idx] = k  # indexed stores: in place under torch.compile
                v_buf[:, :, idx] = v
                visible = keys[None, :] <= idx[:, None]
            else:  # a position per row: rows that advance at their own pace (speculative)
                idx = pos[:, None] + torch.arange(t, device=x.device)  # (B, t)
                rows = torch.arange(b, device=x.device)[:, None]
                k_buf[rows, :, idx] = k.transpose(1, 2)
                v_buf[rows, :, idx] = v.transpose(1, 2)
                visible = (keys[None, None, :] <= idx[:, :, None])[:, None]  # (B, 1, t, L)
            y = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=visible, dropout_p=p)
        else:
            start = cache.pos
            k, v = cache.append(torch.stack([k, v]) if kv is None else kv)
            if t == 1:  # one new token sees the whole cache: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:  # new token i sees cached positions and new tokens up to i
                i = torch.arange(t, device=x.device)[:, None] + start
                mask = torch.arange(k.shape[2], device=x.device)[None, :] <= i
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """x + Attn(LN(x)); x + MLP(LN(x)) with a 4× GELU MLP (GPT-2 / official layout)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            RowLinear(width, 4 * width),
            nn.GELU(),
            nn.Linear(4 * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, cache: KVCache | tuple[Tensor, ...] | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A causal stack of `Block`s, with or without a KV cache per layer.

    With `checkpointing` on, training keeps only each block's input and recomputes the block
    in the backward pass (its dropout masks too: the RNG state is replayed), trading ~30%
    more compute for activations that no longer grow with the number of layers."""

    def __init__(self, width: int, layers: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.width, self.heads = width, heads
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.checkpointing = False

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        if len(self.blocks) == 0:  # e.g. the flat baseline's empty depth transformer
            return []
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        hd = self.width // self.heads
        return [KVCache(batch, self.heads, max_len, hd, device, dtype) for _ in self.blocks]

    def new_static_cache(self, batch: int, max_len: int) -> StaticKVCache:
        p = next(self.parameters(), None)
        device, dtype = (p.device, p.dtype) if p is not None else ("cpu", torch.float32)
        return StaticKVCache(
            len(self.blocks), batch, self.heads, max_len, self.width // self.heads, device, dtype
        )

    def forward(
        self,
        x: Tensor,
        cache: list[KVCache] | StaticKVCache | None = None,
        pos: Tensor | None = None,
    ) -> Tensor:
        """x (B, t, C); with a list of `KVCache`s the t tokens follow those cached, with a
        `StaticKVCache` they sit at positions pos.. (pos: 0-dim long tensor, or one per row)."""
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, use_reentrant=False)
            elif isinstance(cache, StaticKVCache):
                x = block(x, cache.layer(i, pos))
            else:
                x = block(x, None if cache is None else cache[i])
        return x


def gpt_init(module: nn.Module, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by
    1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02
            if name.endswith("attn.proj") or name.endswith("mlp.2"):
                std = 0.02 / (2 * n_layers) ** 0.5
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
