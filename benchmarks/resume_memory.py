"""Memory per rank when an FSDP run resumes: the sharded train state (each rank reads its
own slices) against the earlier layout (every rank reads the full weights and the full
AdamW state, then keeps its shard), on 2 gloo CPU ranks.

    python benchmarks/resume_memory.py [--width 1024]   # -> results/resume_memory.md

An RQ-Transformer (12 + 4 layers, 8×8×4 codes, K 2048) is sharded over 2 ranks and takes
one AdamW step; its train state is then written in both layouts. Each resume runs in fresh
processes that build and shard the model and the optimizer, reset the peak resident set
(/proc/self/clear_refs), load, and report per rank what the load added: to the peak
resident set, to the peak of anonymous memory (sampled every millisecond) and to the
anonymous memory that stays.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from rqgen.checkpoint import save_state_dict, write_json  # noqa: E402
from rqgen.distributed import Runtime, gather_objects  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig  # noqa: E402
from rqgen.train.parallel import full_model_state, load_full_optimizer_state, wrap  # noqa: E402
from rqgen.train.state import TrainState, rng_state  # noqa: E402

MIB = 2**20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class _AnonPeak:
    """The largest anonymous resident set (RssAnon: allocations, not mapped files), sampled
    every millisecond by a thread until stop()."""

    def __init__(self):
        self.peak, self.running = _status("RssAnon"), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _status("RssAnon"))


def _model(rt: Runtime, width: int):
    cfg = RQTransformerConfig(codebook_size=2048, code_shape=[8, 8, 4], embed_dim=64,
                              width=width, heads=width // 64, spatial_layers=12,
                              depth_layers=4, num_classes=10, shared_codebook=True)  # fmt: skip
    torch.manual_seed(0)
    model = RQTransformer(cfg, torch.randn(1, 2048, 64))
    wrap(model, rt, True, False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), cfg


def _rank(rank: int, phase: str, tmp: str, width: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-{phase}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(minutes=30))  # fmt: skip
    rt = Runtime(rank, 2, torch.device("cpu"))
    model, opt, cfg = _model(rt, width)
    new, legacy = TrainState(Path(tmp) / "new"), TrainState(Path(tmp) / "legacy")
    if phase == "save":
        codes = torch.randint(cfg.codebook_size, (2, cfg.T, cfg.D))
        model.loss(codes, torch.tensor([1, 2]))[0].backward()
        opt.step()
        rngs = gather_objects(rng_state(rt.device), rt)
        counters = {"step": 1, "best": 0.0, "bad": 0, "scaler": {}}
        new.save(rt, {"model": model}, {"opt": (model, opt)}, {}, counters, rngs, {})
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = full_model_state(model)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        opt_full = get_optimizer_state_dict(model, opt, options=options)
        if rt.is_main:  # the earlier layout, as train/state.py wrote it
            legacy.dir.mkdir(parents=True)
            save_state_dict(full, legacy.dir / "model.safetensors")
            torch.save({"opt_full": opt_full, **counters, "rng": rngs[0], "rng_ranks": rngs},
                       legacy.dir / "state.pt")  # fmt: skip
            write_json(legacy.dir / "meta.json", {})
        results[rank] = sum(p.numel() for p in model.parameters())  # DTensors: global numel
    else:
        state = new if phase == "sharded" else legacy
        before, anon_before = _status("VmRSS"), _status("RssAnon")
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
        anon = _AnonPeak()
        saved = state.load(rt, {"model": model}, {"opt": (model, opt)}, {})
        if "opt_full" in saved:
            load_full_optimizer_state(model, opt, saved["opt_full"])
        results[rank] = (_status("VmHWM") - before, anon.stop() - anon_before,
                         _status("RssAnon") - anon_before)  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args()
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        for phase in ("save", "sharded", "legacy"):
            results = manager.dict()
            mp.spawn(_rank, args=(phase, tmp, args.width, results), nprocs=2)
            peaks[phase] = [results[r] for r in range(2)]
    params = peaks["save"][0]

    def row(name: str, key: str) -> str:
        cells = [" / ".join(f"{r[i] / MIB:,.0f}" for r in peaks[key]) for i in range(3)]
        return f"| {name} | " + " | ".join(cells) + " |"

    body = "\n".join([
        "# Memory per rank at an FSDP resume", "",
        __doc__.split("\n\n")[2].replace("\n", " "), "",
        f"Model: width {args.width}, {params / 1e6:.1f}M parameters; fp32 weights + AdamW "
        f"moments: {12 * params / MIB:,.0f} MiB in all ({6 * params / MIB:,.0f} MiB per rank "
        "when sharded over 2). The peak resident set counts the safetensors files' pages that "
        "a rank maps while reading its slices (page cache, shared and reclaimable); the "
        "anonymous peak counts allocations only; what stays is the loaded optimizer state "
        "the run needs anyway (AdamW's moments of the rank's shard).", "",
        "| train state | peak resident set, MiB (rank 0 / rank 1) | anonymous peak | "
        "anonymous after |", "|---|---|---|---|",
        row("sharded (this layout)", "sharded"),
        row("earlier layout (full state on every rank)", "legacy"),
    ])  # fmt: skip
    write_results("resume_memory", body, {"params": params, "peak_extra_bytes": peaks})
    print(body)


if __name__ == "__main__":
    main()
