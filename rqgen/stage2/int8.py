"""int8 sampling on CPU: every linear layer of a transformer with int8 weights (one scale per
output channel) and int8 activations quantized per call (dynamic quantization, fbgemm).

Dynamic rather than weight-only: on this project's CPU torch's weight-only int8 product
(`_weight_int8pack_mm`) ran an order of magnitude slower than fp32 in a development
measurement (not kept as a benchmark), while the dynamic one is faster on wide models
(benchmarks/results/int8.md). The cost is accuracy: the logit error is stated and tested
like bf16's (tests/test_rq_transformer.py) and measured in the same results. Inference
only: the quantized weights take no gradient.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from rqgen.errors import ConfigError
from rqgen.stage2.block import CausalSelfAttention


class Int8Linear(nn.Module):
    """y = x·Wᵀ + b with W in int8 (per output channel) and x quantized to 8 bits per call."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        # quantized tensors are deprecated in torch (the pinned release still has them): its
        # notice would repeat for every layer
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation")
            q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(q, b)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        # reduce_range: 7-bit activations, which AVX2's 16-bit accumulation cannot overflow
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, True)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` (in place, CPU) with every nn.Linear swapped for an Int8Linear; each attention
    layer's query, key and value products fused into one (as its fp32 sampling path does)."""
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("int8 sampling runs on the CPU: use bf16 on a GPU")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    model.float().eval()
    for module in list(model.modules()):
        if isinstance(module, CausalSelfAttention):
            lins = (module.query, module.key, module.value)
            module.qkv_int8 = Int8Linear(
                torch.cat([lin.weight for lin in lins]), torch.cat([lin.bias for lin in lins])
            )
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    model.int8 = True
    return model
