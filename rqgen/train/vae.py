"""Stage-1 training: RQ-VAE with MSE + β·commitment + LPIPS + PatchGAN (paper §3.1, Eq. 6-7).

    rqgen train-vae --data bundled:photos --out runs/vae --config tiny32
    torchrun --nproc_per_node 2 -m rqgen train-vae --data DIR --out runs/vae

`--out DIR` is always a loadable `save_pretrained` directory (refreshed at each checkpoint);
`DIR/train_state/` holds what resuming needs, and a rerun of the same command resumes.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import IterableDataset

from rqgen.card import command
from rqgen.configs import DQVAEExperiment, VAEExperiment
from rqgen.configs.validate import check_run
from rqgen.data import build_dataset, describe
from rqgen.distributed import Runtime, from_rank0, init_runtime, meet_after
from rqgen.evaluate import psnr
from rqgen.family import family_of
from rqgen.stage1 import load_vae
from rqgen.stage1.losses import LPIPS, NLayerDiscriminator, Stage1Loss
from rqgen.train.data import run_dataset
from rqgen.train.ema import WeightEMA
from rqgen.train.metrics import MetricsLog
from rqgen.train.output import claim_output
from rqgen.train.parallel import no_sync
from rqgen.train.state import TrainState, seed_everything
from rqgen.train.trainer import Trainer, scheduled_lr
from rqgen.utils.images import make_grid, save_image


def fit_entropy_router(
    model, dataset, rt: Runtime, seed: int, max_images: int = 50_000
) -> tuple[float, int]:
    """Fit the entropy router's threshold once, on rank 0, over a fixed-seed pass of the
    training images (its crops depend neither on the rank nor on the run's RNG, which is
    left as it was), then broadcast it: every rank routes every region alike."""
    streamed = isinstance(dataset, IterableDataset)  # tar shards: the first images, in order
    n = max_images if streamed else min(len(dataset), max_images)
    used = 0

    def batches():
        nonlocal used
        items = iter(dataset) if streamed else (dataset[i] for i in range(n))
        images = itertools.islice((x for x, _ in items), n)
        while chunk := list(itertools.islice(images, 256)):
            used += len(chunk)
            yield torch.stack(chunk)

    def fit() -> None:  # long work on rank 0: the others wait in the store
        if rt.is_main:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model.fit_router(batches())

    meet_after(rt, fit)
    if rt.world_size > 1:
        torch.distributed.broadcast(model.router.threshold, 0)
    return float(model.router.threshold), used


def default_val_source(data: str) -> str | None:
    """Bundled sets have held-out splits; folders are scored only when --val-data is given."""
    return f"{data}:val" if data in ("bundled:photos", "bundled:digits") else None


class VAETrainer(Trainer):
    name = "train-vae"

    def __init__(
        self,
        exp: VAEExperiment | DQVAEExperiment,
        data: str,
        out: str | Path,
        rt: Runtime,
        val_data: str | None = None,
        quiet: bool = False,
    ):
        self.exp, self.data, self.out, self.rt, self.quiet = exp, data, Path(out), rt, quiet
        t, m = exp.train, exp.model
        self._set_precision(t.precision)
        self.scaler_d = self._new_scaler()  # the discriminator's losses have their own scale
        check_run(exp, rt.world_size)
        self.micro_batch = t.batch_size // (rt.world_size * t.grad_accum)
        self.state = TrainState(self.out)
        self.resume_changes = from_rank0(
            rt, lambda: self.state.check_resume(exp, data) if self.state.exists() else []
        )

        seed_everything(t.seed)  # identical init on every rank, and across reruns
        self.family = family_of(m)
        self.model = self.family.vae(m).to(rt.device)
        self.model.quantizer.frozen = t.freeze_codebook
        lpips = LPIPS.from_pretrained().to(rt.device) if t.perceptual_weight > 0 else None
        self.use_gan = t.adversarial_weight > 0
        self.disc = (
            NLayerDiscriminator(m.in_channels, t.disc_ndf, t.disc_layers).to(rt.device)
            if self.use_gan
            else None
        )
        self.loss = Stage1Loss(t.perceptual_weight, t.adversarial_weight, lpips, self.disc)
        adam = dict(
            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=rt.device.type == "cuda"
        )
        self.opt = torch.optim.Adam(self.model.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), **adam) if self.use_gan else None
        self.ema = WeightEMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.step = 0
        self.resume_or_seed()  # every rank's RNG too: a resumed run continues its streams
        ddp = rt.world_size > 1
        dev_ids = [rt.device.index] if rt.device.type == "cuda" else None
        # Codebook buffers are synchronised by the quantizer itself: no buffer broadcast.
        self.model_ddp = DDP(self.model, dev_ids, broadcast_buffers=False) if ddp else self.model
        self.disc_ddp = (
            DDP(self.disc, dev_ids, broadcast_buffers=False) if ddp and self.use_gan else self.disc
        )
        self.train_set = run_dataset(data, m.resolution, t.seed, self.out, rt)
        val_src = val_data or default_val_source(data)
        self.val_set = build_dataset(val_src, m.resolution, "val") if val_src else None
        if isinstance(self.val_set, IterableDataset):  # shards: the first images, kept
            n = t.val_batches * self.micro_batch * rt.world_size
            self.val_set = list(itertools.islice(self.val_set, n))
        self.log = MetricsLog(self.out, rt.is_main)
        if not self.family.residual and self.model.needs_router_fit:
            self._fit_entropy_router()

    def _fit_entropy_router(self, max_images: int = 50_000) -> None:
        """DQ-VAE's entropy threshold, from the training images: see fit_entropy_router."""
        th, n = fit_entropy_router(
            self.model, self.train_set, self.rt, self.exp.train.seed, max_images
        )
        if self.rt.is_main and not self.quiet:
            print(
                f"rqgen: entropy router threshold {th:.4f} nats (fine fraction "
                f"{self.exp.model.fine_fraction} on {n} training images)"
            )

    # ------------------------------------------------------------------ checkpoints
    def state_modules(self) -> dict:
        return {"model": self.model, **({"disc": self.disc} if self.disc is not None else {})}

    def state_optimizers(self) -> dict:
        gan = {"opt_d": (self.disc, self.opt_d)} if self.opt_d is not None else {}
        return {"opt": (self.model, self.opt), **gan}

    def state_counters(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "scaler_d": self.scaler_d.state_dict()}

    def restore(self, s: dict) -> None:
        if "opt" in s:  # the earlier layout: optimizers and EMA in state.pt
            self.opt.load_state_dict(s["opt"])
            if self.opt_d is not None and "opt_d" in s:
                self.opt_d.load_state_dict(s["opt_d"])
            if self.ema is not None and "ema" in s:
                self.ema.shadow = {k: v.to(self.rt.device) for k, v in s["ema"].items()}
        self._load_scaler(self.scaler, s.get("scaler"))
        self._load_scaler(self.scaler_d, s.get("scaler_d"))

    def export(self) -> None:
        """The public checkpoint: EMA weights when enabled (usually the better model),
        written by rank 0 while the others wait in the store."""
        meet_after(self.rt, self._write_public)

    def _write_public(self) -> None:
        if self.rt.is_main:
            self.public_model().save_pretrained(
                self.out,
                train=dataclasses.asdict(self.exp.train),
                data=self.data,
                step=self.step,
                command=command(),
            )

    # ------------------------------------------------------------------ one step
    def train_step(self, batches) -> dict[str, torch.Tensor]:
        t = self.exp.train
        gan_on = self.use_gan and self.step >= t.disc_start
        for g in self.opt.param_groups:
            g["lr"] = scheduled_lr(self.step, t.lr, t.warmup_steps, t.steps, t.lr_schedule)
        totals: dict[str, torch.Tensor] = {}  # on the device: read at logging steps only
        recons = []
        self.opt.zero_grad(set_to_none=True)
        for i, (x, _) in enumerate(batches):
            x = x.to(self.rt.device, non_blocking=True)
            with no_sync(self.model_ddp, i == len(batches) - 1), self._autocast():
                out = self.model_ddp(x)
                loss, parts = self.loss(x, out, self.model.last_layer, gan_on)
                self.scaler.scale(loss / len(batches)).backward()
            recons.append((x, out.reconstruction.detach().float()))
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v.float() / len(batches)
        self._stop_if_nonfinite(totals["loss"])
        if t.grad_clip > 0:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.opt)  # fp16: skipped when a gradient overflowed
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)

        if gan_on:
            self.opt_d.zero_grad(set_to_none=True)
            for i, (x, xr) in enumerate(recons):
                last = i == len(recons) - 1
                with no_sync(self.disc_ddp, last), self._autocast():
                    d_loss = self.loss.discriminator_loss(self.disc_ddp, x, xr)
                    self.scaler_d.scale(d_loss / len(recons)).backward()
                totals["d_loss"] = totals.get("d_loss", 0.0) + d_loss.detach() / len(recons)
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
        return totals

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR of held-out reconstructions (eval mode: the codebook is not touched), the
        batches split over the ranks and the sums all-reduced: every rank gets the same
        numbers, and none idles while another scores the whole split."""
        if self.val_set is None:
            return {}
        rt, mb = self.rt, self.micro_batch
        model = self.public_model().eval()
        sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # Σ PSNR, Σ fine, count
        first = None
        # val_batches global micro-batches: the same images whatever the number of ranks
        n = min(len(self.val_set), self.exp.train.val_batches * mb * rt.world_size)
        for s in list(range(0, n, mb))[rt.rank :: rt.world_size]:
            x = torch.stack([self.val_set[i][0] for i in range(s, min(n, s + mb))])
            x = x.to(rt.device)
            with self._autocast():  # as training computes it
                out = model(x)
            xr = out.reconstruction.float().clamp(-1, 1)
            sums[0] += psnr(xr, x).double().sum()
            if not self.family.residual:  # the share of fine cells
                sums[1] += out.fine_mask.flatten(1).double().mean(1).sum()
            sums[2] += len(x)
            if first is None:
                first = (x[:16], xr[:16])
        if rt.world_size > 1:
            torch.distributed.all_reduce(sums)
        self.model.train()
        if first is not None and rt.is_main:  # rank 0's first batch is the split's first
            grid = make_grid(torch.cat(first), nrow=len(first[0]))  # row 1 real, row 2 decoded
            save_image(grid, self.out / "samples" / f"recon_{self.step:07d}.png")
            self.log.image("reconstructions", grid, self.step)
        result = {"val_psnr": float(sums[0] / sums[2])}
        if not self.family.residual:
            result["val_fine_fraction"] = float(sums[1] / sums[2])
        return result

    def codebook_sync_error(self) -> float:
        """Largest codebook difference between this rank and rank 0 (0.0 = in sync)."""
        if self.rt.world_size == 1:
            return 0.0
        cb = self.model.quantizer.codebook.detach().clone()
        ref = cb.clone()
        torch.distributed.broadcast(ref, 0)
        err = (cb - ref).abs().max().reshape(1)
        torch.distributed.all_reduce(err, op=torch.distributed.ReduceOp.MAX)
        return float(err)

    # ------------------------------------------------------------------ loop hooks
    def init_source(self, name: str) -> torch.nn.Module:
        return load_vae(name, map_location=self.rt.device)

    def describe(self) -> str:
        m = self.exp.model
        what = f"RQ-VAE {m.code_shape}"
        if not self.family.residual:
            what = (
                f"DQ-VAE coarse {m.coarse_size}² / fine {m.fine_size}² ({m.router} router, "
                f"r={m.fine_fraction})"
            )
        return f"{what} K={m.codebook_size} on {describe(self.data)}"

    def log_extra(self) -> dict[str, float]:
        extra = {"codebook_sync_err": self.codebook_sync_error()}
        failed = getattr(self.train_set, "failures", None)  # unreadable, replaced
        if failed is not None and failed.value:
            extra["skipped_images"] = failed.value
        return extra

    def periodic(self, last: bool, bar) -> bool:
        if self.step % self.exp.train.sample_every == 0 or last:
            val = self.validate()  # every rank scores its share
            if val and self.rt.is_main:
                self.log.log(self.step, **val)
                bar.set_postfix(**{k: f"{v:.2f}" for k, v in val.items()})
        return False


def train_vae(
    exp: VAEExperiment | DQVAEExperiment,
    data: str,
    out: str | Path,
    val_data: str | None = None,
    device: str | None = None,
    quiet: bool = False,
) -> Path:
    """Train (or resume) an RQ-VAE or DQ-VAE; returns the `save_pretrained` directory."""
    rt = init_runtime(device, exp.train.dist_timeout)
    with claim_output(Path(out), rt, ("rqvae", "dqvae"), "VAE"):
        return VAETrainer(exp, data, out, rt, val_data=val_data, quiet=quiet).fit()
