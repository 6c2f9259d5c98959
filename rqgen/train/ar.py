"""Stage-2 training: RQ-Transformer on the codes of a frozen RQ-VAE (paper §3.2, Eq. 14-15).

    rqgen train-ar --vae runs/vae --data bundled:digits --out runs/ar --config ar-tiny
    torchrun --nproc_per_node 2 -m rqgen train-ar --vae runs/vae --data DIR --out runs/ar

Encoder features Z are extracted once, split over the ranks, into a feature store
(OUT/features, or train.features; see train/features.py); codes are drawn from them at every
step, so stochastic sampling (Eq. 15) gives fresh codes every epoch.
OUT ends as a `save_pretrained` directory (the best model on the validation split) that
`rqgen sample --model OUT` loads together with the VAE it records.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.distributed as torch_dist

from rqgen.card import command
from rqgen.checkpoint import current_name, current_names
from rqgen.configs import ARExperiment
from rqgen.configs.validate import check_family, check_run
from rqgen.data import describe
from rqgen.distributed import Runtime, from_rank0, init_runtime, meet_after
from rqgen.errors import ConfigError
from rqgen.family import family_of
from rqgen.pipeline import RQPipeline
from rqgen.quantize import dynamic
from rqgen.stage1 import load_vae
from rqgen.stage2.guidance import SamplingConfig
from rqgen.stage2.rq_transformer import codebook_fingerprint
from rqgen.train.ar_data import build_ar_data, list_ar_data
from rqgen.train.ema import WeightEMA
from rqgen.train.metrics import MetricsLog
from rqgen.train.output import claim_output
from rqgen.train.parallel import (
    full_model_state,
    is_sharded,
    load_full_optimizer_state,
    local_value,
    no_sync,
    wrap,
)
from rqgen.train.state import TrainState, seed_everything
from rqgen.train.trainer import Trainer, scheduled_lr
from rqgen.utils.images import make_grid, save_image


class ARTrainer(Trainer):
    name = "train-ar"

    def __init__(
        self,
        exp: ARExperiment,
        vae_dir: str | Path,
        data: str,
        out: str | Path,
        rt: Runtime,
        captions: str | None = None,
        quiet: bool = False,
    ):
        self.exp, self.data, self.out, self.rt, self.quiet = exp, data, Path(out), rt, quiet
        self._set_precision(exp.train.precision)
        check_run(exp, rt.world_size, captions)
        self.micro_batch = exp.train.batch_size // (rt.world_size * exp.train.grad_accum)
        self._load_vae(Path(vae_dir))
        self.out.mkdir(parents=True, exist_ok=True)
        self.dataset = list_ar_data(exp, self.vae, data, self.out, rt, quiet)
        self._check_resume()
        self._build_data(captions)
        self._build_model()
        self._build_optimizer()
        self.step, self.best, self.bad_evals = 0, math.inf, 0
        self.resume_or_seed()
        self.log = MetricsLog(self.out, rt.is_main)

    def _load_vae(self, vae_dir: Path) -> None:
        """The frozen VAE and its family."""
        self.vae_dir = vae_dir
        self.vae = load_vae(vae_dir).to(self.rt.device).eval()
        self.family = family_of(self.vae)
        check_family(self.exp, self.family)
        self.code_depth = self.family.code_depth(self.vae, self.exp.model)  # d ≤ D
        self.vae_fingerprint = codebook_fingerprint(self.vae.quantizer.codebook)

    def _check_resume(self) -> None:
        """Whether OUT holds a run of this experiment on this VAE (rank 0 decides, before
        any extraction)."""
        self.state = TrainState(self.out)
        ident = {"vae_fingerprint": self.vae_fingerprint}
        self.resume_changes = from_rank0(
            self.rt,
            lambda: (
                self.state.check_resume(self.exp, self.data, ident) if self.state.exists() else []
            ),
        )

    def _build_data(self, captions: str | None) -> None:
        """The feature store, the train / validation split, classes, tokenizer and τ."""
        d = build_ar_data(
            self.exp,
            self.vae,
            self.dataset,
            self.data,
            self.out,
            self.rt,
            captions,
            self.quiet,
            self.code_depth,
        )
        self.train_data, self.store = d, d.store
        self.train_set, self.val_set = d.train_set, d.val_set
        self.classes, self.tokenizer, self.taus = d.classes, d.tokenizer, d.taus

    def _build_model(self) -> None:
        """The family's transformer (the same init on every rank), its EMA and its wrapper."""
        t = self.exp.train
        seed_everything(t.seed)
        model = self.family.build(
            self.exp.model, self.vae, self.train_data.num_classes, self.tokenizer
        )
        self.model = model.to(self.rt.device)
        self.model.conditions_checked = True  # labels checked at the store
        self.model_class = type(self.model)  # FSDP swaps the class for a sharded subclass
        self.ema = WeightEMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.model_ddp = wrap(
            self.model, self.rt, t.fsdp, t.activation_checkpointing, self.precision
        )
        # train.compile: the forward compiled (the backward follows through AOTAutograd)
        self.forward = torch.compile(self.model_ddp) if t.compile else self.model_ddp

    def _build_optimizer(self) -> None:
        """AdamW, weight decay on matrices but not on embeddings, norms and biases (built
        after wrapping: FSDP replaces the parameters by their shards)."""
        t = self.exp.train
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "emb" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2 or "emb" in n]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            fused=self.rt.device.type == "cuda",
        )

    # ------------------------------------------------------------------ checkpoints
    def state_counters(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "best": self.best, "bad": self.bad_evals}

    def state_meta(self) -> dict:
        return {"vae_fingerprint": self.vae_fingerprint}

    def restore(self, s: dict) -> None:
        """Counters of a loaded state; from the earlier layout also the optimizer (sharded
        or not, as it was saved) and the EMA."""
        if "opt" in s or "opt_full" in s:
            sharded = is_sharded(self.model)
            if ("opt_full" in s) != sharded:  # the two layouts of the optimizer state
                was = "sharded (FSDP)" if "opt_full" in s else "unsharded (one process or DDP)"
                how = "with" if "opt_full" in s else "without"
                raise ConfigError(
                    f"{self.out} holds a run whose optimizer state is {was}: "
                    f"resume it {how} train.fsdp=true under torchrun, or "
                    "choose a new --out"
                )
            former = getattr(self.model, "former_names", {})
            if sharded:
                opt = s["opt_full"]
                groups = [
                    {**g, "params": [current_name(p, former) for p in g["params"]]}
                    for g in opt["param_groups"]
                ]
                state = current_names(opt["state"], former)
                load_full_optimizer_state(
                    self.model, self.opt, {"state": state, "param_groups": groups}
                )
            else:
                self.opt.load_state_dict(s["opt"])
            if self.ema is not None and "ema" in s:
                ema = current_names(s["ema"], former)
                self.ema.shadow = {k: v.to(self.rt.device) for k, v in ema.items()}
        self._load_scaler(self.scaler, s.get("scaler"))
        self.best, self.bad_evals = float(s["best"]), int(s["bad"])

    def save_public(self) -> None:
        """The best model so far, with what `rqgen sample` needs to find the VAE. Every rank
        calls it: under FSDP the tensors are gathered (one at a time), then rank 0 writes
        while the others wait in the store."""
        full = full_model_state(self.model) if is_sharded(self.model) else None

        def write() -> None:
            if not self.rt.is_main:
                return
            if full is not None:
                model = self.model_class(self.model.config)
                model.load_state_dict(full)
            else:
                model = self.public_model()
            vae = os.path.relpath(self.vae_dir.resolve(), self.out.resolve())
            model.save_pretrained(
                self.out,
                vae=vae,
                classes=self.classes,
                conditioning=self.exp.model.conditioning,
                train=dataclasses.asdict(self.exp.train),
                data=self.data,
                data_fingerprint=self.store.meta["key"]["source"],
                command=command(),
                step=self.step,
                val_loss=self.best,
            )

        meet_after(self.rt, write)

    # ------------------------------------------------------------------ step
    def _codes_and_targets(self, z: torch.Tensor, generator, argmin: bool = False) -> tuple:
        """The first d codes for this step (argmin, or drawn from Q_τ) and soft targets (Eq.
        15); `argmin`: argmin codes only (validation). A DQ item already is its token
        streams: trimmed to the longest sequence of the batch."""
        d = self.code_depth
        if self.store.meta["kind"] == "codes":  # hard labels: the stored argmin codes
            return z[..., :d], None
        if self.store.meta["kind"] == "dq":  # token streams
            pad = self.model.config.vocab.content_pad
            length = int((z[:, 0] != pad).sum(1).max())
            return z[:, :, :length], None
        t, q, mean_depth = self.exp.train, self.vae.quantizer, self.exp.model.mean_depth
        taus = self.taus if t.stochastic_codes and not argmin else None
        codes, residuals = q.quantize(z, taus, generator, depth=d)  # the first d codes only
        if mean_depth:  # dynamic depth: the stacks cut where the residuals are smallest
            codes = dynamic.stacks(q, codes, residuals, mean_depth)
        soft = None
        if t.soft_labels and not argmin:
            soft = torch.stack(
                [q.soft_labels(residuals[..., i, :], i, self.taus[i]) for i in range(d)], -2
            )
        return codes, soft

    def _drop_cond(self, cond: torch.Tensor, generator) -> torch.Tensor:
        p = self.exp.train.cond_dropout
        if p <= 0 or self.exp.model.conditioning == "none":
            return cond
        drop = torch.rand(cond.shape[0], device=cond.device, generator=generator) < p
        text = self.exp.model.conditioning == "text"
        null = self.model.config.text_pad_id if text else self.model.null_class
        if cond.dim() == 2:
            return torch.where(drop[:, None], torch.full_like(cond, null), cond)
        return torch.where(drop, torch.full_like(cond, null), cond)

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        t = self.exp.train
        for g in self.opt.param_groups:
            g["lr"] = scheduled_lr(
                self.step, t.lr, t.warmup_steps, t.steps, "cosine", t.min_lr_ratio
            )
        gen = torch.Generator(self.rt.device).manual_seed(
            t.seed * 1_000_003 + self.step * 101 + self.rt.rank
        )
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}  # on the device: read at logging steps only
        for i, (z, cond) in enumerate(batches):
            z = z.to(self.rt.device, non_blocking=True)
            cond = cond.to(self.rt.device, non_blocking=True)
            codes, soft = self._codes_and_targets(z, gen)
            with no_sync(self.model_ddp, i == len(batches) - 1), self._autocast():
                loss, parts = self._loss(codes, self._drop_cond(cond, gen), soft)
                self.scaler.scale(loss / len(batches)).backward()
            for k, v in {**parts, "loss": loss.detach()}.items():
                totals[k] = totals.get(k, 0.0) + v.float() / len(batches)
        self._stop_if_nonfinite(totals["loss"])
        if t.grad_clip > 0:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not the scaled ones
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            totals["grad_norm"] = local_value(norm)
        self.scaler.step(self.opt)  # fp16: skipped when a gradient overflowed
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return totals

    def _loss(self, codes, cond, soft):
        # the forward through the wrapper that owns the gradients; the loss on the plain model
        return self.model.loss_from_logits(*self.forward(codes, cond), codes, cond, soft)

    @torch.no_grad()
    def validate(self) -> float:
        """Hard-label NLL of the argmin codes of the held-out features, the batches split over
        the ranks (every rank returns the same number). Under FSDP each forward is a
        collective, so a rank without a batch left scores one with weight 0."""
        rt, n = self.rt, len(self.val_set)
        if n == 0:
            return math.nan
        model = (self.model if is_sharded(self.model) else self.public_model()).eval()
        starts = list(range(0, n, self.micro_batch))
        sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # Σ loss·n, Σ n
        for i in range(math.ceil(len(starts) / rt.world_size)):
            j = i * rt.world_size + rt.rank
            s = starts[min(j, len(starts) - 1)]
            z, cond = self.val_set.batch(s, s + self.micro_batch)
            z, cond = z.to(rt.device), cond.to(rt.device)
            codes = self._codes_and_targets(z, None, argmin=True)[0]
            with self._autocast():  # as training computes it
                loss, _ = model.loss(codes, cond)
            if j < len(starts):
                sums += torch.stack(
                    [
                        loss.detach().double() * len(z),
                        torch.tensor(len(z), dtype=torch.float64, device=rt.device),
                    ]
                )
        if rt.world_size > 1:
            torch_dist.all_reduce(sums)
            torch_dist.broadcast(sums, 0)  # bit-identical on every rank: same decisions
        self.model.train()
        return float(sums[0] / sums[1])

    # ------------------------------------------------------------------ loop hooks
    def init_source(self, name: str) -> torch.nn.Module:
        return self.family.transformer.from_pretrained(name, map_location=self.rt.device)

    def describe(self) -> str:
        return (
            f"{self.family.describe(self.model)} on {describe(self.data)} codes, "
            f"{len(self.train_set)} train / {len(self.val_set)} val"
        )

    def periodic(self, last: bool, bar) -> bool:
        t = self.exp.train
        stop = False
        if self.step % t.eval_every == 0 or last:
            stop = self._evaluate(bar)
        if self.step % t.sample_every == 0 or last:
            meet_after(self.rt, self.write_samples)  # rank 0 samples, the others wait
        if stop and self.rt.is_main and not self.quiet:
            print(
                f"rqgen: early stop at step {self.step}: no better val loss in "
                f"{t.patience} evaluations (best {self.best:.4f})"
            )
        return stop

    @torch.no_grad()
    def write_samples(self, per_row: int = 8) -> None:
        """A grid sampled from the current weights, one row per class (the first 8; one row
        per caption of the first held-out images for text models), to OUT/samples and
        TensorBoard. Main process only; skipped under FSDP, whose weights are sharded."""
        if not self.rt.is_main or is_sharded(self.model):
            return
        pipe = RQPipeline(self.public_model(), self.vae, {"classes": self.classes}, self.tokenizer)
        if pipe.conditioning == "text":  # the held-out captions, already tokenized
            cond = self.val_set.cond[:4].repeat_interleave(per_row, 0).to(self.rt.device)
        elif pipe.conditioning == "class":
            rows = min(self.model.config.num_classes, 8)
            cond, _ = pipe.conditions([c for c in range(rows) for _ in range(per_row)])
        else:
            cond, _ = pipe.conditions(num_images=2 * per_row)
        gen = torch.Generator(self.rt.device).manual_seed(0)  # the same noise at every step
        _, images = pipe.sample(cond, SamplingConfig(), gen)
        self.model.train()
        grid = make_grid(images.cpu(), nrow=per_row)
        save_image(
            grid,
            self.out / "samples" / f"samples_{self.step:07d}.png",
            upscale=max(1, 128 // self.vae.config.resolution),
        )
        self.log.image("samples", grid, self.step)

    def _evaluate(self, bar) -> bool:
        """Validate on every rank, keep the best model public; returns True to stop early.
        Every rank sees the same loss, so all take the same decisions without a broadcast."""
        t = self.exp.train
        val = self.validate()
        if self.rt.is_main:
            self.log.log(self.step, val_loss=val)
            bar.set_postfix(val=f"{val:.3f}")
        if not val < self.best and math.isfinite(val):
            self.bad_evals += 1
        else:
            self.best, self.bad_evals = (val if math.isfinite(val) else self.best), 0
            self.save_public()
        return t.patience > 0 and self.bad_evals >= t.patience


def train_ar(
    exp: ARExperiment,
    vae: str | Path,
    data: str,
    out: str | Path,
    captions: str | None = None,
    device: str | None = None,
    quiet: bool = False,
) -> Path:
    rt = init_runtime(device, exp.train.dist_timeout)
    with claim_output(Path(out), rt, ("rq_transformer", "dq_transformer"), "transformer"):
        return ARTrainer(exp, vae, data, out, rt, captions=captions, quiet=quiet).fit()
