"""Exponential moving average of a model's weights: the public model of a run with EMA."""

from __future__ import annotations

import torch
from torch import nn


class WeightEMA:
    """θ_ema ← θ_ema + (1 - decay)(θ - θ_ema) for floating parameters, in one fused call per
    step; buffers (e.g. the codebook) and integer tensors are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        averaged, current = [], []
        for k, v in model.state_dict().items():
            if k in params and v.dtype.is_floating_point:
                averaged.append(self.shadow[k])
                current.append(v)
            else:
                self.shadow[k].copy_(v)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1 - self.decay)
