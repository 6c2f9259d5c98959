"""CLIP image-text similarity from local weights: re-ranking (best of N) and CLIP score.

The model is read with huggingface `transformers` (`CLIPModel` + its tokenizer) from a
directory in the `save_pretrained` layout, or from the huggingface hub cache. Nothing is
downloaded: without local weights the error names what to fetch and where to put it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rqgen.errors import CheckpointError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# OpenAI CLIP's input normalisation; a preprocessor_config.json next to the weights overrides it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _missing(where: str) -> CheckpointError:
    return CheckpointError(
        f"no CLIP weights at {where}: on a machine with network run `huggingface-cli download "
        f"{DEFAULT_CLIP} --local-dir DIR` (config.json, model.safetensors, tokenizer files), "
        "then pass --clip DIR or set RQGEN_CLIP=DIR"
    )


class CLIPScorer:
    """Cosine similarity between images in [-1, 1] and captions, by a local CLIP."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, device="cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.image_size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, path: str | Path | None = None, device="cpu") -> CLIPScorer:
        """From `path`, else $RQGEN_CLIP, else the hub cache entry of DEFAULT_CLIP."""
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as e:
            raise CheckpointError(
                "CLIP needs the transformers package: pip install 'rqgen[clip]'"
            ) from e
        source = path or os.environ.get("RQGEN_CLIP") or DEFAULT_CLIP
        if (path or os.environ.get("RQGEN_CLIP")) and not Path(source).is_dir():
            raise _missing(f"'{source}' (not a directory)")
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except OSError as e:
            raise _missing(f"'{source}'") from e
        mean, std = CLIP_MEAN, CLIP_STD
        pre = Path(source) / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        return cls(model, tokenizer, mean, std, device)

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images -> CLIP input: shorter side resized to the model's size, centre crop."""
        x = (images.to(self.device, torch.float32) + 1) / 2
        h, w = x.shape[-2:]
        s = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * s)), max(self.image_size, round(w * s)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def similarity(self, images: Tensor, texts: list[str]) -> Tensor:
        """(B,) cosine similarity of image i with text i."""
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} texts")
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        img = self.model.get_image_features(pixel_values=self.preprocess(images))
        txt = self.model.get_text_features(**tok)
        img, txt = _embeds(img), _embeds(txt)
        return F.cosine_similarity(img, txt, dim=-1)

    def clip_score(
        self, images: Tensor, texts: list[str], torchmetrics_scale: bool = False
    ) -> float:
        """Mean cosine similarity, as the paper's Table 3 reports it (0.26 on CC-3M); with
        `torchmetrics_scale`, 100 · mean(max(cos, 0)) as torchmetrics' CLIPScore reports it."""
        s = self.similarity(images, texts)
        return float(100 * s.clamp(min=0).mean()) if torchmetrics_scale else float(s.mean())


def _embeds(out) -> Tensor:
    # transformers < 5 returns the projected tensor; newer versions may wrap it in an output.
    return out if isinstance(out, Tensor) else out.pooler_output
