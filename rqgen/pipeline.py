"""The one door for sampling from Python: a trained transformer with the VAE it records.

from rqgen import RQPipeline
pipe = RQPipeline.from_pretrained("runs/ar")          # RQ- or DQ-Transformer
images = pipe(class_labels=[3, "7"], cfg=2.0, top_k=64, seed=0).images   # PIL images
pipe(prompt="a red car", num_images=4)               # text-conditional models
pipe.to("cuda")                                      # or from_pretrained(..., device=, dtype=)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from rqgen.errors import ConfigError
from rqgen.stage2.sampling import SamplingConfig, generate, load_for_sampling
from rqgen.utils.device import PRECISIONS, resolve_device, resolve_precision
from rqgen.utils.images import to_pil


@dataclass
class PipelineOutput:
    images: list[Image.Image]  # one PIL image per sample
    codes: Tensor  # the sampled code maps (B, H, W, D) (DQ: packed (B, 2Hc, 2Hc, 2))
    pixels: Tensor  # (B, 3, R, R) in [-1, 1], on the CPU
    names: list[str]  # the class name (or "prompt" / "sample") of each image


def conditions(model, classes: Sequence[str], tokenizer, n: int | None,
               labels: Sequence[int | str] | None, prompt: str | Sequence[str] | None,
               ) -> tuple[Tensor, list[str]]:  # fmt: skip
    """The condition tensor for a request, and a name per sample. Classes are ids or names;
    without labels a class-conditional model cycles through every class (`n` images)."""
    c = model.config
    if getattr(c, "text_vocab_size", 0):
        if prompt is None:
            raise ConfigError("this model is text-conditional: pass a prompt")
        prompts = [prompt] * (n or 1) if isinstance(prompt, str) else list(prompt)
        return tokenizer.encode(prompts), ["prompt"] * len(prompts)
    if prompt is not None:
        raise ConfigError("this model is not text-conditional: drop the prompt")
    if not c.num_classes:
        if labels is not None:
            raise ConfigError("this model is unconditional: drop the class labels")
        n = n or 1
        return torch.full((n,), model.null_class, dtype=torch.long), ["sample"] * n
    if labels is None:  # every class in turn: a balanced set
        ids = [i % c.num_classes for i in range(n or c.num_classes)]
    else:
        ids = [_class_id(k, classes, c.num_classes) for k in labels]
        if n:  # n images of the given class(es), cycled
            ids = [ids[i % len(ids)] for i in range(n)]
    cond = torch.tensor(ids, dtype=torch.long)
    model.check_cond(cond)  # one-line error when an id is out of range
    return cond, [classes[i] if i < len(classes) else str(i) for i in ids]


def _class_id(label: int | str, classes: Sequence[str], num_classes: int) -> int:
    if isinstance(label, str) and label in classes:
        return classes.index(label)
    if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
        return int(label)
    names = ", ".join(f"{i}={name}" for i, name in enumerate(classes)) or "none recorded"
    raise ConfigError(f"unknown class {label!r}: use an id 0..{num_classes - 1} or a name "
                      f"({names})")  # fmt: skip


class RQPipeline:
    """A trained RQ- (or DQ-) Transformer and its VAE, sampled in one call."""

    def __init__(self, model, vae, meta: dict, tokenizer=None):
        self.model, self.vae, self.meta, self.tokenizer = model, vae, meta, tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, vae: str | Path | None = None,
                        device: str = "auto", dtype: str = "auto") -> RQPipeline:  # fmt: skip
        """The transformer directory written by `rqgen train-ar` (its VAE is found from what
        it records, or given as `vae`); dtype is the transformer's (auto: bf16 on CUDA)."""
        dev = resolve_device(device)
        return cls(*load_for_sampling(path, vae, dev, dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    def to(self, device: str | torch.device, dtype: str | None = None) -> RQPipeline:
        dev = resolve_device(str(device))
        self.vae.to(dev)
        self.model.to(dev)
        if dtype is not None:
            self.model.to(PRECISIONS[resolve_precision(dtype, dev)])
        return self

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int | str] | int | str | None = None,
        prompt: str | Sequence[str] | None = None,
        num_images: int | None = None,
        cfg: float = 1.0,
        top_k: int | Sequence[int] | None = None,
        top_p: float | Sequence[float] | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
        batch_size: int = 64,
        compile: bool = False,
    ) -> PipelineOutput:
        """Images for `class_labels` (ids or names; one image each, or `num_images` cycled
        through them), a `prompt` (text models), or `num_images` unconditional samples."""
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if num_images is not None and num_images < 1:
            raise ConfigError(f"num_images={num_images}: must be an integer ≥ 1")
        if temperature <= 0 or cfg < 0:
            raise ConfigError(f"temperature={temperature} must be > 0 and cfg={cfg} ≥ 0")
        cond, names = conditions(self.model, self.classes, self.tokenizer, num_images,
                                 class_labels, prompt)  # fmt: skip
        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        codes, pixels = generate(self.vae, self.model, cond.to(self.device),
                                 SamplingConfig(temperature, top_k, top_p, cfg, compile),
                                 generator, batch_size)  # fmt: skip
        pixels = pixels.float().cpu()
        return PipelineOutput([to_pil(x) for x in pixels], codes.cpu(), pixels, names)


class DQPipeline(RQPipeline):
    """The same door for a DQ-Transformer (`RQPipeline` loads either kind)."""
