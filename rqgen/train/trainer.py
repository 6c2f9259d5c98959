"""The one training loop of both stages (nanoGPT's train.py, as a class).

`Trainer.fit` owns what every run does: resume or seed, the step loop, stop signals, the
NaN stop, logging, the evaluation and checkpoint cadence. A stage supplies hooks:

    describe()          the line printed when training starts
    train_step(batches) one optimizer step; losses as device tensors (no host sync)
    periodic(last, bar) evaluation / samples at their cadence; True stops early
    state_*()           what the train state holds: modules, optimizers, plain tensors
                        (EMA), JSON counters, identity for meta.json
    restore(saved)      the counters of a loaded state
    export()            refresh the public model directory after a checkpoint
    log_extra()         metrics only known at logging steps
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm import tqdm

from rqgen.distributed import Runtime, from_rank0, gather_objects, meet_after
from rqgen.errors import Interrupted, TrainingError
from rqgen.hub import resolve
from rqgen.train.data import batch_stream
from rqgen.train.ema import WeightEMA
from rqgen.train.init import start_from
from rqgen.train.metrics import MetricsLog
from rqgen.train.state import (
    TrainState,
    rank_seed,
    restore_rng,
    rng_state,
    seed_everything,
    set_rng_state,
)
from rqgen.utils.device import PRECISIONS, resolve_precision, use_cpu_budget


def scheduled_lr(
    step: int,
    base: float,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    min_ratio: float = 0.0,
) -> float:
    """Linear warm-up over `warmup` steps, then constant (the paper's stage 1) or a cosine
    decay to base·min_ratio at step `total` (its stage 2)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StopWhileLoading(Exception):
    """A stop signal arrived while a single-process run was loading its next batches."""


class Trainer:
    name = "train"  # the progress bar's label
    exp: object
    data: str
    out: Path
    rt: Runtime
    quiet: bool = False
    model: nn.Module
    opt: torch.optim.Optimizer
    ema: WeightEMA | None = None
    state: TrainState
    log: MetricsLog
    train_set: object
    micro_batch: int
    step: int = 0
    precision: str = "fp32"
    scaler: torch.amp.GradScaler
    resume_changes: tuple[str, ...] | list[str] = ()  # train.x: old -> new, when resumed
    stop_requested: str | None = None  # the stop signal received, if any
    stop_agreed: bool = False  # every rank saves and stops after this step
    _loading: bool = False  # fetching the next batches (see fetch)

    # ------------------------------------------------------------------ hooks
    def describe(self) -> str:
        raise NotImplementedError

    def train_step(self, batches: list) -> dict[str, Tensor]:
        raise NotImplementedError

    def periodic(self, last: bool, bar) -> bool:
        return False

    def state_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def state_optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        return {"opt": (self.model, self.opt)}

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {"ema": self.ema.shadow} if self.ema is not None else {}

    def state_counters(self) -> dict:
        """What else a resume needs, as JSON (scaler states, best loss...)."""
        return {"scaler": self.scaler.state_dict()}

    def state_meta(self) -> dict:
        return {}

    def restore(self, saved: dict) -> None:
        """The counters (and, from an earlier layout, the optimizers) of a loaded state."""
        self._load_scaler(self.scaler, saved.get("scaler"))

    def export(self) -> None:
        pass

    def log_extra(self) -> dict[str, float]:
        return {}

    # ------------------------------------------------------------------ set-up
    def _set_precision(self, name: str) -> None:
        """Autocast dtype for forward passes, and a gradient scaler for fp16 (whose 5-bit
        exponent underflows small gradients without it; bf16 and fp32 need none)."""
        self.precision = resolve_precision(name, self.rt.device)
        self.scaler = self._new_scaler()

    def _new_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.rt.device.type, enabled=self.precision == "fp16")

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=PRECISIONS[self.precision])

    @staticmethod
    def _load_scaler(scaler: torch.amp.GradScaler, state: dict | None) -> None:
        """A scaler state is only written by an fp16 run (a disabled scaler's is empty)."""
        if scaler.is_enabled() and state:
            scaler.load_state_dict(state)

    def resume_or_seed(self) -> None:
        """Continue the saved run (weights, optimizers, counters, every rank's RNG), or
        seed a fresh one: rank 0 draws as a single process would, the others differently.
        Rank 0 decides which, for every rank."""
        seed = self.exp.train.seed
        if not from_rank0(self.rt, self.state.exists):
            seed_everything(rank_seed(seed, self.rt.rank, 0))
            self._start_weights()
            return
        saved = self.state.load(
            self.rt, self.state_modules(), self.state_optimizers(), self.state_tensors()
        )
        self.restore(saved)
        self.step = int(saved["step"])
        restore_rng(saved, self.rt, seed, self.step)

    def _start_weights(self) -> None:
        """Fine-tuning: the weights of train.init_from into the fresh model. Rank 0 fetches
        it first (a hub model is downloaded once), then every rank reads its own copy; an
        error on any rank stops every rank."""
        name = self.exp.train.init_from
        if not name:
            return
        meet_after(self.rt, lambda: resolve(name) if self.rt.is_main else None)
        source = meet_after(self.rt, lambda: self.init_source(name))
        start_from(self.model, source, name, adapt=self.name == "train-ar")
        if self.ema is not None:  # the average starts at the starting weights
            self.ema = WeightEMA(self.model, self.ema.decay)
        if self.rt.is_main and not self.quiet:
            print(f"rqgen: starting from the weights of {name} (fresh optimizer, step 0)")

    def init_source(self, name: str) -> nn.Module:
        """The model train.init_from names (each trainer knows its kind)."""
        raise NotImplementedError

    def public_model(self) -> nn.Module:
        """The model to save and score: a copy holding the EMA weights when EMA is on."""
        if self.ema is None:
            return self.model
        m = type(self.model)(self.model.config).to(self.rt.device)
        m.load_state_dict(self.ema.shadow)
        return m

    # ------------------------------------------------------------------ checkpoints
    def save(self, rng: dict | None = None) -> None:
        """Every rank writes its shards and its RNG state (as the training stream left
        it); rank 0 writes the rest; then the public directory is refreshed."""
        rngs = gather_objects(rng or rng_state(self.rt.device), self.rt)
        meta = {
            "experiment": dataclasses.asdict(self.exp),
            "data": self.data,
            "step": self.step,
            **self.state_meta(),
        }
        self.state.save(
            self.rt,
            self.state_modules(),
            self.state_optimizers(),
            self.state_tensors(),
            {**self.state_counters(), "step": self.step},
            rngs,
            meta,
        )
        self.export()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        t, rt = self.exp.train, self.rt
        workers, threads = use_cpu_budget(t.num_workers, rt.device)
        if rt.is_main and not self.quiet:
            print(
                f"rqgen: training {self.describe()} -> {self.out} (step {self.step} to "
                f"{t.steps}, {rt.world_size} process(es), micro-batch {self.micro_batch}, "
                f"{workers} loader worker(s), {threads} thread(s))"
            )
        self.announce_resume()
        stream = batch_stream(
            self.train_set,
            self.micro_batch * rt.world_size,
            rt,
            t.seed,
            self.step * t.grad_accum,
            workers,
        )
        self.model.train()
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            desc=self.name,
            dynamic_ncols=True,
            disable=not rt.is_main or self.quiet,
        )
        try:
            with self.stop_signals():
                self._loop(stream, bar)
        finally:  # also on errors, so the bar does not swallow the error line
            bar.close()
            self.log.close()
        return self.out

    def _loop(self, stream: Iterator, bar) -> None:
        t = self.exp.train
        t0, logged = time.time(), self.step
        while self.step < t.steps:
            try:
                batches = self.fetch(stream, t.grad_accum)
            except StopWhileLoading:  # nothing of this step happened: save the last one's
                self.save()
                raise self.stopped() from None
            metrics = self.train_step(batches)
            self.step += 1
            bar.update(1)
            last = self.step == t.steps
            if self.step % t.log_every == 0 or last:
                metrics = self.mean_over_ranks(metrics)
                metrics["sec_per_step"] = (time.time() - t0) / (self.step - logged)
                metrics["lr"] = self.opt.param_groups[0]["lr"]
                metrics |= self.log_extra()
                t0, logged = time.time(), self.step
                self.log.log(self.step, **metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            # The training stream's RNG as the step left it: evaluation, samples and
            # checkpoints (FSDP's gathering draws from it) must not change what training draws.
            rng = rng_state(self.rt.device)
            stop = self.periodic(last, bar)
            if self.step % t.ckpt_every == 0 or last or self.stop_agreed or stop:
                self.save(rng)
            set_rng_state(rng, self.rt.device)
            if self.stop_agreed:
                raise self.stopped()
            if stop:
                break

    # ------------------------------------------------------------------ signals
    def announce_resume(self) -> None:
        """Settings a resumed run changed (e.g. more steps): said once and logged."""
        if self.resume_changes and self.rt.is_main:
            if not self.quiet:
                print(f"rqgen: resuming at step {self.step} with " + "; ".join(self.resume_changes))
            self.log.log(self.step, resumed_with=self.resume_changes)

    @contextlib.contextmanager
    def stop_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM ask the loop to save a checkpoint at the end of the
        current step and stop (`stop_agreed`); a second signal stops at once. Outside the
        main thread (where signals cannot be caught) nothing changes."""
        self.stop_requested, self.stop_agreed = None, False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_requested is not None:
                raise KeyboardInterrupt  # the second signal: no checkpoint, stop now
            self.stop_requested = signal.Signals(signum).name
            if self._loading:
                raise StopWhileLoading

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def fetch(self, stream: Iterator, n: int) -> list:
        """The step's n micro-batches. Loading can take seconds (large files, a slow disk):
        in a single-process run a stop signal meanwhile abandons the half-loaded step at once
        (StopWhileLoading) instead of waiting for it, with the RNG put back as the step found
        it, so that the checkpoint saved then equals one saved at the step boundary. Several
        ranks must agree on the step they stop after, so they stop at its end."""
        if self.rt.world_size > 1:
            return [next(stream) for _ in range(n)]
        before = rng_state(self.rt.device)
        self._loading = True
        try:
            return [next(stream) for _ in range(n)]
        except StopWhileLoading:
            set_rng_state(before, self.rt.device)
            raise
        finally:
            self._loading = False

    def stopped(self) -> Interrupted:
        return Interrupted(
            f"interrupted ({self.stop_requested or 'signal on another rank'}) at step "
            f"{self.step}: checkpoint saved in {self.out}; rerun the same command to resume"
        )

    # ------------------------------------------------------------------ across ranks
    def _stop_if_nonfinite(self, loss: Tensor) -> None:
        """Stop before the optimizer step, on every rank at once (no rank left waiting).
        The same collective carries a pending stop signal, so every rank stops after the
        same step even when the signal reached them at different moments. This is the
        step's one host synchronisation."""
        stop = torch.tensor(float(self.stop_requested is not None), device=loss.device)
        flag = torch.stack([(~torch.isfinite(loss.detach())).float(), stop])
        if self.rt.world_size > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        diverged, stop_agreed = flag.tolist()
        self.stop_agreed = stop_agreed > 0
        if diverged > 0:
            raise TrainingError(
                f"loss became {float(loss)} at step {self.step + 1}; the last checkpoint in "
                f"{self.out} is intact: lower train.lr, set train.grad_clip, or check the data"
            )

    def mean_over_ranks(self, metrics: dict[str, Tensor | float]) -> dict[str, float]:
        """Logged losses describe the global batch, not rank 0's share of it; read from the
        device once."""
        keys = sorted(metrics)
        values = torch.stack(
            [torch.as_tensor(metrics[k], device=self.rt.device).double().reshape(()) for k in keys]
        )
        if self.rt.world_size > 1:
            torch_dist.all_reduce(values)
            values = values / self.rt.world_size
        return dict(zip(keys, values.tolist()))
