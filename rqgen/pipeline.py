"""The one door for sampling: a trained transformer with the VAE it records. `rqgen sample`,
eval-gen, the demo, `rqgen serve` and training's sample grids all draw through it.

from rqgen import RQPipeline
pipe = RQPipeline.from_pretrained("runs/ar")          # RQ- or DQ-Transformer
images = pipe(class_labels=[3, "7"], guidance_scale=2.0, top_k=64, seed=0).images   # PIL
pipe(prompt="a red car", num_images=4)               # text-conditional models
pipe.to("cuda")                                      # or from_pretrained(..., device=, dtype=)

Below the call: `conditions` (a request -> condition tensor), `sample` (conditions -> codes
and pixels, batch by batch), `stream` (the same, written to PNGs as it goes) and `best_of`
(selection by a scorer: rejection sampling, CLIP re-ranking).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from rqgen.checkpoint import read_config
from rqgen.errors import CheckpointError, ConfigError
from rqgen.family import FAMILIES, Family, family_of
from rqgen.hub import resolve
from rqgen.stage1 import load_vae
from rqgen.stage2.guidance import PerSampleSeeds, SamplingConfig
from rqgen.stage2.int8 import quantize_int8
from rqgen.stage2.text import TextTokenizer
from rqgen.utils.device import PRECISIONS, resolve_device, resolve_precision
from rqgen.utils.images import save_image, to_pil

Scorer = Callable[[Tensor, int], Tensor]  # (candidate images, row of cond) -> one score each


@dataclass
class PipelineOutput:
    images: list[Image.Image] | Tensor | np.ndarray  # as output_type asked (PIL by default)
    codes: Tensor  # the sampled code maps (B, H, W, D) (DQ: packed (B, 2Hc, 2Hc, 2))
    pixels: Tensor  # (B, 3, R, R) in [-1, 1], on the CPU
    names: list[str]  # the class name (or "prompt" / "sample") of each image


class RQPipeline:
    """A trained RQ- (or DQ-) Transformer and its VAE, sampled in one call."""

    def __init__(self, model, vae, meta: dict | None = None, tokenizer=None):
        self.model, self.vae, self.meta, self.tokenizer = model, vae, meta or {}, tokenizer
        self.family: Family = family_of(model)
        self.source = ""

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        vae: str | Path | None = None,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        local_files_only: bool = False,
    ) -> RQPipeline:
        """The transformer directory written by `rqgen train-ar`, or a hub repository
        'org/name[@revision]' pushed by `rqgen push` (its VAE is found from what it
        records, or given as `vae`, a directory or repository). `dtype` (fp32, bf16, fp16,
        int8 on CPU, or auto: bf16 on CUDA) is the transformer's: its weights and KV caches
        are cast (int8: its linear layers quantized), logits are sampled in fp32, and the VAE
        decodes in fp32."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        path = resolve(path, local_files_only)
        meta = read_config(path)
        families = {f.transformer.model_type: f for f in FAMILIES}
        if meta.get("model_type") not in families:
            raise CheckpointError(
                f"'{path}' holds a {meta.get('model_type')!r} model, not an RQ- or "
                "DQ-Transformer: pass a directory written by rqgen train-ar"
            )
        family = families[meta["model_type"]]
        model = family.transformer.from_pretrained(path, map_location=dev)
        if vae is None:
            if "vae" not in meta:
                raise CheckpointError(f"'{path}' does not record its VAE: pass --vae DIR")
            vae = Path(path) / meta["vae"]
        vae_model = load_vae(vae, map_location=dev, local_files_only=local_files_only)
        model.check_vae(vae_model)  # before the cast: the fingerprint is of the fp32 codebook
        cast(model, dtype, dev)
        tokenizer = None
        if family.conditioning(model.config) == "text":
            tokenizer = TextTokenizer.load(path, model.config.text_length)
        pipe = cls(model, vae_model, meta, tokenizer)
        pipe.source = str(path)
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    @property
    def conditioning(self) -> str:
        """class | text | none."""
        return self.family.conditioning(self.model.config)

    def to(self, device: str | torch.device, dtype: str | None = None) -> RQPipeline:
        dev = resolve_device(str(device))
        self.vae.to(dev)
        self.model.to(dev)
        if dtype is not None:
            cast(self.model, dtype, dev)
        return self

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int | str | None] | int | str | None = None,
        prompt: str | Sequence[str] | None = None,
        num_images: int | None = None,
        guidance_scale: float = 1.0,
        top_k: int | Sequence[int] | None = None,
        top_p: float | Sequence[float] | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | int | None = None,
        num_images_per_prompt: int | None = None,
        output_type: str = "pil",
        batch_size: int = 64,
        compile: bool = False,
        seed: int | None = None,
        speculative: int = 0,
    ) -> PipelineOutput:
        """Images for `class_labels` (ids or names; one image each, `num_images_per_prompt`
        each, or `num_images` cycled through them), a `prompt` (text models), or
        `num_images` unconditional samples. `generator`: a torch.Generator on the
        pipeline's device, or a seed (`seed` is the same); `output_type` sets what
        `.images` holds: "pil" (PIL images), "pt" ((B, 3, R, R) tensor in [0, 1]) or "np"
        ((B, R, R, 3) float array in [0, 1]). `speculative` = N: speculative Jacobi
        decoding with N positions drafted per pass (RQ; the same distribution)."""
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if temperature <= 0 or guidance_scale < 0:
            raise ConfigError(
                f"temperature={temperature} must be > 0 and guidance_scale={guidance_scale} ≥ 0"
            )
        if output_type not in ("pil", "pt", "np"):
            raise ConfigError(f"output_type={output_type!r}: use pil, pt or np")
        if num_images_per_prompt is not None:
            if num_images is not None:
                raise ConfigError("give num_images or num_images_per_prompt, not both")
            if num_images_per_prompt < 1:
                raise ConfigError(f"num_images_per_prompt={num_images_per_prompt}: must be ≥ 1")
            class_labels, prompt, num_images = _each(class_labels, prompt, num_images_per_prompt)
        cond, names = self.conditions(class_labels, prompt, num_images)
        sampling = SamplingConfig(temperature, top_k, top_p, guidance_scale, compile, speculative)
        codes, pixels = self.sample(cond, sampling, self._generator(generator, seed), batch_size)
        pixels = pixels.float().cpu()
        unit = (pixels + 1) / 2
        images = {
            "pil": lambda: [to_pil(x) for x in pixels],
            "pt": lambda: unit,
            "np": lambda: unit.permute(0, 2, 3, 1).numpy(),
        }[output_type]()
        return PipelineOutput(images, codes.cpu(), pixels, names)

    def _generator(self, generator: torch.Generator | int | None, seed: int | None):
        if generator is not None and seed is not None:
            raise ConfigError("give a generator or a seed, not both")
        if isinstance(generator, torch.Generator):
            return generator
        seed = generator if generator is not None else seed
        g = torch.Generator(self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return g

    # ------------------------------------------------------------------ requests
    def conditions(
        self,
        class_labels: Sequence[int | str] | None = None,
        prompt: str | Sequence[str] | None = None,
        num_images: int | None = None,
    ) -> tuple[Tensor, list[str]]:
        """The condition tensor of a request, on the pipeline's device, and a name per
        sample. Classes are ids or names; without labels a class-conditional model cycles
        through every class (`num_images` images, default one per class)."""
        n = num_images
        if n is not None and n < 1:
            raise ConfigError(f"num_images={n}: must be an integer ≥ 1")
        kind, k = self.conditioning, self.model.config.num_classes
        if kind == "text":
            if prompt is None:
                raise ConfigError("this model is text-conditional: pass a prompt")
            prompts = [prompt] * (n or 1) if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.encode(prompts).to(self.device), ["prompt"] * len(prompts)
        if prompt is not None:
            raise ConfigError("this model is not text-conditional: drop the prompt")
        if kind == "none":
            if class_labels is not None:
                raise ConfigError("this model is unconditional: drop the class labels")
            n = n or 1
            return torch.full((n,), self.model.null_class, device=self.device), ["sample"] * n
        if class_labels is None:  # every class in turn: a balanced set
            ids = [i % k for i in range(n or k)]
        else:
            ids = [_class_id(c, self.classes, k) for c in class_labels]
            if n:  # n images of the given class(es), cycled
                ids = [ids[i % len(ids)] for i in range(n)]
        cond = torch.tensor(ids, dtype=torch.long)
        self.model.check_cond(cond)  # one-line error when an id is out of range
        names = [self._file_name(i) for i in ids]
        return cond.to(self.device), names

    # ------------------------------------------------------------------ drawing
    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | PerSampleSeeds | None = None,
        batch_size: int = 64,
    ) -> tuple[Tensor, Tensor]:
        """Codes sampled and decoded batch by batch: codes (B, H, W, D) (a DQ-Transformer
        gives packed DQ-VAE code maps, (B, 2Hc, 2Hc, 2)), images (B, 3, R, R) in [-1, 1]."""
        sampling = sampling or SamplingConfig()
        self.model.check_vae(self.vae)
        if sampling.compile and not self.family.compiled_sampling:
            raise ConfigError(
                f"--compile is for RQ-Transformers: sample a "
                f"{self.family.name}-Transformer without it"
            )
        was_training = self.model.training
        codes, images = [], []
        for s in range(0, cond.shape[0], batch_size):
            c = self.family.sample(
                self.model, cond[s : s + batch_size], sampling, _part(generator, s, batch_size)
            )
            codes.append(c)
            images.append(self.vae.decode_codes(c).clamp(-1, 1))
        self.model.train(was_training)
        return torch.cat(codes), torch.cat(images)

    def stream(
        self,
        cond: Tensor,
        out: str | Path,
        sampling: SamplingConfig | None = None,
        generator=None,
        batch_size: int = 64,
        indices: Sequence[int] | None = None,
    ) -> Iterator[Tensor]:
        """Sample `cond` batch by batch, write each image to OUT/NNNNNN_<class>.png and yield
        the batch: memory stays at one batch however many samples are drawn. `indices`
        number the files (default 0, 1, ...): a torchrun rank drawing its share names them
        globally."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        indices = list(range(cond.shape[0])) if indices is None else list(indices)
        for s in tqdm(range(0, cond.shape[0], batch_size), desc="sample", leave=False):
            c = cond[s : s + batch_size]
            images = self.sample(c, sampling, _part(generator, s, batch_size), batch_size)[1]
            images = images.cpu()
            for i, (img, k) in enumerate(zip(images, c.tolist())):
                save_image(img, out / f"{indices[s + i]:06d}_{self._file_name(k)}.png")
            yield images

    def _file_name(self, k) -> str:
        if self.conditioning != "class":
            return "text" if self.conditioning == "text" else "sample"
        if k == self.model.config.num_classes:
            return "none"  # the null class: unconditional samples, asked for explicitly
        return self.classes[k] if k < len(self.classes) else str(k)

    @torch.no_grad()
    def best_of(
        self,
        cond: Tensor,
        score: Scorer,
        acceptance: float,
        sampling: SamplingConfig | None = None,
        generator=None,
        batch_size: int = 64,
    ) -> tuple[Tensor, Tensor]:
        """Selection by a scorer: for each distinct condition with n rows in `cond`, draw
        ceil(n / acceptance) candidates and keep the n that `score(images, row)` ranks
        highest (`row` indexes `cond` at one row of that condition). Output follows the
        order of `cond`."""
        if not 0 < acceptance <= 1:
            raise ConfigError(f"acceptance rate must be in (0, 1], got {acceptance}")
        codes = images = None
        groups, inverse = cond.unique(dim=0, return_inverse=True)
        for g in range(len(groups)):
            where = (inverse == g).nonzero().squeeze(1)
            m = math.ceil(len(where) / acceptance - 1e-9)  # 1/3 must give 3n, not 3n+1
            full = cond[where[:1]].expand(m, *cond.shape[1:])
            cand_codes, cand = self.sample(full, sampling, generator, batch_size)
            keep = score(cand, int(where[0])).topk(len(where)).indices
            if images is None:
                codes = cand_codes.new_empty(len(cond), *cand_codes.shape[1:])
                images = cand.new_empty(len(cond), *cand.shape[1:])
            codes[where], images[where] = cand_codes[keep], cand[keep]
        return codes, images

    def rejection_sample(
        self,
        cond: Tensor,
        classifier: torch.nn.Module,
        acceptance: float,
        sampling=None,
        generator=None,
        batch_size: int = 64,
    ):
        """The paper's rejection sampling: of ceil(n / acceptance) candidates per class keep
        the n that `classifier` finds most likely to be the requested class."""

        def score(images: Tensor, row: int) -> Tensor:
            return classifier(images).softmax(-1)[:, int(cond[row])]

        return self.best_of(cond, score, acceptance, sampling, generator, batch_size)

    def clip_rerank(
        self,
        cond: Tensor,
        texts: list[str],
        scorer,
        candidates: int,
        sampling=None,
        generator=None,
        batch_size: int = 64,
    ):
        """CLIP re-ranking (best of `candidates` per image): `texts[i]` describes row i of
        `cond` (its prompt, or a caption built from its class); `scorer` is a CLIPScorer."""
        if candidates < 1:
            raise ConfigError(
                f"CLIP re-ranking needs at least 1 candidate per image, got {candidates}"
            )

        def score(images: Tensor, row: int) -> Tensor:
            return scorer.similarity(images, [texts[row]] * len(images)).to(images.device)

        return self.best_of(cond, score, 1 / candidates, sampling, generator, batch_size)


def _each(class_labels, prompt, per: int):
    """`per` images of each class label or prompt (or `per` unconditional ones)."""
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return class_labels, [p for p in prompts for _ in range(per)], None
    if class_labels is not None:
        return [c for c in class_labels for _ in range(per)], None, None
    return None, None, per


def _class_id(label: int | str | None, classes: Sequence[str], num_classes: int) -> int:
    """A class label -> its id; `None` / "none" -> the null class (unconditional samples
    from a class-conditional model, asked for explicitly). An id past the last class is an
    error, not the null class it happens to index."""
    if isinstance(label, str) and label in classes:  # a class named "none" is that class
        return classes.index(label)
    if label is None or (isinstance(label, str) and label.lower() == "none"):
        return num_classes
    names = ", ".join(f"{i}={name}" for i, name in enumerate(classes[:10])) or "none recorded"
    names += f", ... ({len(classes)} in all)" if len(classes) > 10 else ""
    if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
        i = int(label)
        if 0 <= i < num_classes:
            return i
        raise ConfigError(
            f"class {i} is not one of this model's {num_classes} classes (ids 0.."
            f"{num_classes - 1}: {names}); unconditional samples: class none"
        )
    raise ConfigError(
        f"unknown class {label!r}: use an id 0..{num_classes - 1} or a name ({names})"
    )


def cast(model: torch.nn.Module, dtype: str | None, device: torch.device) -> None:
    """The transformer in the precision `dtype` names (int8: quantized, stage2/int8.py)."""
    if (dtype or "").lower() == "int8":
        quantize_int8(model)
    else:
        model.to(PRECISIONS[resolve_precision(dtype, device)])


def _part(generator, start: int, size: int):
    """What samples start..start+size draw from: their seeds, or the shared generator."""
    if isinstance(generator, PerSampleSeeds):
        return generator[start : start + size]
    return generator
