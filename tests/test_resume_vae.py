"""Resuming stage-1 training through the real CLI: after a kill, with fp16's gradient
scalers, with the weight EMA, from the earlier train-state layout; refused under another
model config; and a resume lists no data again."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_vae import ENV, TINY, metrics, rqgen, train_args, weights

from rqgen.train.state import TrainState

pytestmark = pytest.mark.slow


def test_resume_after_kill_continues_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rqgen(*train_args(straight, 30))

    cmd = [sys.executable, "-m", "rqgen", *map(str, train_args(killed, 30))]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # kill hard between two checkpoints (the first is written at step 5)
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and len(metrics(killed)) >= 7:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((killed / "train_state" / "meta.json").read_text())
    assert 5 <= state["step"] < 30, "the run must be killed mid-way"

    rqgen(*train_args(killed, 30))
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_resume_opens_no_image_to_list_the_data(tmp_path, monkeypatch):
    """The folder is listed once into OUT/data_listing.json (no image opened); a resume
    reads that list and opens only the images its steps load."""
    import PIL.Image

    data = tmp_path / "imgs" / "cats"
    data.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (40, 36), (40 * i, 100, 200)).save(data / f"{i}.png")
    out = tmp_path / "out"
    rqgen(*train_args(out, 2, "train.batch_size=4", data=tmp_path / "imgs"))
    listing = json.loads((out / "data_listing.json").read_text())["listing"]
    assert listing["files"] == [f"cats/{i}.png" for i in range(6)]
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(
        PIL.Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k)
    )
    rqgen(*train_args(out, 3, "train.batch_size=4", data=tmp_path / "imgs"))
    assert len(opened) == 4  # the one step's batch of 4, nothing to list the folder


def test_resuming_with_another_model_config_is_refused(tmp_path):
    out = tmp_path / "r"
    rqgen(*train_args(out, 5))
    proc = rqgen(*train_args(out, 8, "model.code_depth=2"), check=False)
    assert proc.returncode == 2 and "different model config (code_depth)" in proc.stderr


def test_fp16_with_gradient_scalers_resumes_exactly(tmp_path):
    """fp16 autocast with the GAN and clipping: both gradient scalers are saved, and a run
    resumed from step 2 ends where an unbroken one does. A constant learning rate: the
    first run's cosine schedule would end at its own step 2."""
    fp16 = ["train.precision=fp16", "train.disc_start=0", "train.disc_ndf=8", "train.grad_clip=1",
            "train.lr_schedule=constant"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rqgen(*train_args(straight, 4, *fp16))
    rqgen(*train_args(resumed, 2, *fp16))
    state = TrainState(resumed).counters()
    assert state["scaler"]["scale"] > 0 and state["scaler_d"]["scale"] > 0
    at_2 = weights(resumed)
    rqgen(*train_args(resumed, 4, *fp16))
    rows = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("d_loss" in r for r in rows)
    a, b = weights(straight), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(at_2["decoder.conv_out.weight"], b["decoder.conv_out.weight"])  # stepped
    bad = rqgen(*train_args(tmp_path / "bad", 1, "train.precision=fp8"), check=False)
    assert bad.returncode == 2 and "train.precision=fp8: must be one of" in bad.stderr


def test_resume_check_treats_fields_added_later_as_defaults(tmp_path):
    import dataclasses

    from rqgen.distributed import Runtime
    from rqgen.errors import ConfigError
    from rqgen.stage1.rqvae import RQVAEConfig
    from rqgen.train.state import TrainState, rng_state

    state = TrainState(tmp_path)
    old = dataclasses.asdict(RQVAEConfig(ch=32))
    del old["norm_groups"]  # a run saved before the field existed
    cpu = torch.device("cpu")
    state.save(Runtime(0, 1, cpu), {}, {}, {}, {"step": 1}, [rng_state(cpu)],
               {"experiment": {"model": old}})  # fmt: skip
    state.check_same_model(RQVAEConfig(ch=32))  # same model: resumes
    with pytest.raises(ConfigError, match="norm_groups"):
        state.check_same_model(RQVAEConfig(ch=32, norm_groups=32))
    with pytest.raises(ConfigError, match=r"\(ch\)"):
        state.check_same_model(RQVAEConfig(ch=64))


def test_a_train_state_of_the_earlier_layout_still_resumes_exactly(tmp_path):
    """model.safetensors + state.pt (tensors and plain containers), as rqgen wrote them
    before train states were sharded: a resume from it ends where an unbroken run does."""
    from rqgen.checkpoint import save_state_dict

    straight, old = tmp_path / "straight", tmp_path / "old"
    const = "train.lr_schedule=constant"  # the schedule then does not depend on --steps
    rqgen(*train_args(straight, 6, const))
    rqgen(*train_args(old, 5, const))  # a checkpoint at step 5, in today's layout
    state = TrainState(old)
    d = state.dir
    trainer_rng = load_file(str(d / "rng.safetensors"))
    from rqgen.configs import load_vae_experiment
    from rqgen.distributed import Runtime
    from rqgen.train.vae import VAETrainer

    exp = load_vae_experiment("tiny32", [*TINY, const, "train.steps=5"])
    trainer = VAETrainer(exp, "bundled:digits", old, Runtime(0, 1, torch.device("cpu")), quiet=True)
    legacy = {"opt": trainer.opt.state_dict(), "step": 5, "scaler": {}, "scaler_d": {},
              "rng": {"torch": trainer_rng["0.torch"]}}  # fmt: skip
    modules = {"model": trainer.model}
    if trainer.disc is not None:
        legacy["opt_d"], modules["disc"] = trainer.opt_d.state_dict(), trainer.disc
    for name in ("shards", "rng.safetensors", "state.json"):
        path = d / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name, module in modules.items():
        save_state_dict(module.state_dict(), d / f"{name}.safetensors")
    torch.save(legacy, d / "state.pt")
    del trainer
    rqgen(*train_args(old, 6, const))
    assert (d / "state.json").is_file()  # saved again in today's layout
    a, b = weights(straight), weights(old)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_restores_the_weight_ema_exactly(tmp_path):
    """The EMA lives in the sharded train state as plain tensors, loaded in place."""
    args = ["train.lr_schedule=constant", "train.ema_decay=0.9"]  # schedule: not by --steps
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rqgen(*train_args(straight, 6, *args))
    rqgen(*train_args(resumed, 5, *args))
    rqgen(*train_args(resumed, 6, *args))
    a, b = weights(straight), weights(resumed)  # the public model holds the EMA weights
    assert all(torch.equal(a[k], b[k]) for k in a)
