"""Stage 2 end to end through the CLI: each conditioning path trains and samples."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_vae import TINY, count_host_reads, rqgen

pytestmark = pytest.mark.slow

AR_TINY = [
    "model.width=32", "model.heads=2", "model.spatial_layers=1", "model.depth_layers=1",
    "train.batch_size=16", "train.log_every=1", "train.eval_every=4", "train.ckpt_every=4",
    "train.warmup_steps=2", "model.text_vocab_size=64", "model.text_length=6",
]  # fmt: skip


def train_ar(vae, out, steps, *extra, check=True):
    return rqgen("train-ar", "--vae", vae, "--data", "bundled:digits", "--out", out, "--steps",
                 steps, "--device", "cpu", *AR_TINY, *extra, check=check)  # fmt: skip


@pytest.mark.parametrize("conditioning", ["class", "none", "text"])
def test_each_conditioning_trains_and_samples(vae, tmp_path, conditioning):
    ar = tmp_path / "ar"
    train_ar(vae, ar, 8, f"model.conditioning={conditioning}")
    meta = json.loads((ar / "config.json").read_text())
    assert meta["conditioning"] == conditioning and meta["vae"]
    rows = [json.loads(r) for r in (ar / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    args = ["sample", "--model", ar, "--n", 4, "--device", "cpu", "--top-k", "8,8,4,4"]
    if conditioning == "text":
        args += ["--prompt", "a handwritten digit three"]
    if conditioning == "class":
        args += ["--cfg", "2.0", "--class", "3"]
    rqgen(*args, "--out", tmp_path / "grid.png", "--save-codes", tmp_path / "codes.npy")
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (4, 8, 8, 4) and codes.max() < 32
    assert Image.open(tmp_path / "grid.png").size[0] > 128
    rqgen(*args, "--out", tmp_path / "dir")
    files = sorted(p.name for p in (tmp_path / "dir").iterdir())
    assert len(files) == 5 and "grid.png" in files


def test_same_seed_same_samples_and_classes_named(class_ar, tmp_path):
    ar = class_ar
    for name in ("a", "b"):
        rqgen("sample", "--model", ar, "--n", 10, "--seed", 5, "--device", "cpu",
              "--out", tmp_path / name, "--save-codes", tmp_path / f"{name}.npy")  # fmt: skip
    assert (np.load(tmp_path / "a.npy") == np.load(tmp_path / "b.npy")).all()
    names = sorted(p.name for p in (tmp_path / "a").glob("0*.png"))
    assert names[:3] == ["00000_0.png", "00001_1.png", "00002_2.png"]  # every class in turn


def test_bad_class_long_prompt_and_wrong_vae_are_clear(vae, class_ar, tmp_path):
    ar = class_ar
    p = rqgen("sample", "--model", ar, "--n", 2, "--class", "12", "--out", tmp_path / "x.png",
              check=False)  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "rqgen: error: class 12 is not one of this model's 10 classes (ids 0..9: 0=0, 1=1, 2=2, "
        "3=3, 4=4, 5=5, 6=6, 7=7, 8=8, 9=9); unconditional samples: class none"
    )
    other = tmp_path / "other_vae"
    rqgen("train-vae", "--data", "bundled:digits", "--out", other, "--steps", 1, "--device", "cpu",
          *TINY, "train.seed=3")  # fmt: skip
    p = rqgen("sample", "--model", ar, "--vae", other, "--n", 2, "--out", tmp_path / "y.png",
              check=False)  # fmt: skip
    assert p.returncode == 2 and "trained with another RQ-VAE" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

    text = tmp_path / "text"
    train_ar(vae, text, 4, "model.conditioning=text")
    long = "a handwritten digit three written very carefully on a page"
    p = rqgen("sample", "--model", text, "--n", 1, "--prompt", long, "--out", tmp_path / "z.png")
    assert "longer than 6 tokens were truncated" in p.stderr


def test_resume_continues_from_the_checkpoint(vae, tmp_path):
    ar = tmp_path / "ar"
    train_ar(vae, ar, 4)
    train_ar(vae, ar, 8)
    rows = [json.loads(r) for r in (ar / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))
    assert json.loads((ar / "train_state" / "meta.json").read_text())["step"] == 8


def test_rejection_sampling_from_the_cli(class_ar, tmp_path, rqgen_cache):
    args = ["--n", 4, "--class", "7", "--accept", "0.5", "--device", "cpu"]
    rqgen("sample", "--model", class_ar, *args, "--out", tmp_path / "r.png", "--save-codes",
          tmp_path / "r.npy", env_extra=rqgen_cache)  # fmt: skip
    assert np.load(tmp_path / "r.npy").shape == (4, 8, 8, 4)
    cached = Path(rqgen_cache["RQGEN_CACHE"]) / "classifiers" / "digit_classifier.safetensors"
    assert cached.is_file()


def test_ddp_training_of_the_transformer(vae, tmp_path):
    import subprocess
    import sys

    from test_train_vae import ENV

    ar = tmp_path / "ar"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rqgen", "train-ar", "--vae", str(vae), "--data", "bundled:digits", "--out",
           str(ar), "--steps", "4", "--device", "cpu", *AR_TINY]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(r) for r in (ar / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    rqgen("sample", "--model", ar, "--n", 2, "--device", "cpu", "--out", tmp_path / "s.png")


def test_sampling_in_bf16_and_compiled_from_the_cli(class_ar, tmp_path):
    args = ["sample", "--model", class_ar, "--n", 4, "--class", "3", "--device", "cpu"]
    codes = {}
    runs = (("eager", []), ("bf16", ["--dtype", "bf16"]), ("int8", ["--dtype", "int8"]),
            ("compiled", ["--compile"]))  # fmt: skip
    for name, flags in runs:
        rqgen(*args, *flags, "--out", tmp_path / f"{name}.png", "--save-codes",
              tmp_path / f"{name}.npy")  # fmt: skip
        img = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert img.ndim == 3 and img.std() > 0  # an image, not a blank
        codes[name] = np.load(tmp_path / f"{name}.npy")
        assert (
            codes[name].shape == (4, 8, 8, 4) and 0 <= codes[name].min() <= codes[name].max() < 32
        )
    assert (codes["compiled"] == codes["eager"]).all()  # fp32: compiling changes no code
    rqgen(*args, "--speculative", 4, "--out", tmp_path / "spec.png", "--save-codes",
          tmp_path / "spec.npy")  # fmt: skip
    assert np.load(tmp_path / "spec.npy").shape == (4, 8, 8, 4)  # its law: tests/test_speculative
    p = rqgen(*args, "--speculative", 4, "--compile", "--out", tmp_path / "x.png", check=False)
    assert p.returncode == 2 and p.stderr.strip() == (
        "rqgen: error: speculative sampling runs eagerly: drop --compile"
    )


def test_compiled_training_step_matches_eager(vae, tmp_path):
    train_ar(vae, tmp_path / "eager", 2, "model.dropout=0")
    train_ar(vae, tmp_path / "compiled", 2, "model.dropout=0", "train.compile=true")
    rows = {d: [json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("eager", "compiled")}  # fmt: skip
    losses = {d: [r["loss"] for r in rs if "loss" in r] for d, rs in rows.items()}
    assert len(losses["compiled"]) == 2
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


def test_grids_put_one_class_per_row():
    import torch

    from rqgen.utils.images import class_rows

    images = torch.arange(10, 17, dtype=torch.float).view(7, 1, 1, 1).expand(7, 3, 2, 2)
    shown, width = class_rows(images, [0, 1, 2, 0, 1, 2, 0])  # 7 samples cycling 3 classes
    assert width == 3 and len(shown) == 9
    rows = shown[:, 0, 0, 0].view(3, 3).tolist()
    assert rows == [[10, 13, 16], [11, 14, 1], [12, 15, 1]]  # class c in row c; white pads


def test_tau_in_quantization_error_units_is_measured_once_per_run(vae, tmp_path):
    ar = tmp_path / "ar"
    train_ar(vae, ar, 2, "train.tau_unit=quantization_error")
    saved = json.loads((ar / "quantization_error.json").read_text())
    errs = saved["per_depth"]
    assert len(errs) == 4 and all(e > 0 for e in errs)
    (ar / "quantization_error.json").write_text(json.dumps({**saved, "per_depth": [7.0] * 4}))
    train_ar(vae, ar, 3, "train.tau_unit=quantization_error")  # the resume reads, not measures
    assert json.loads((ar / "quantization_error.json").read_text())["per_depth"] == [7.0] * 4


def test_a_training_step_reads_from_the_device_once(vae, tmp_path, monkeypatch):
    import torch

    from rqgen.configs import load_ar_experiment
    from rqgen.distributed import Runtime
    from rqgen.train.ar import ARTrainer
    from rqgen.train.data import batch_stream

    overrides = [*AR_TINY, "train.grad_accum=2", "train.grad_clip=1.0", "train.ema_decay=0.9",
                 "train.stochastic_codes=true", "train.soft_labels=true"]  # fmt: skip
    exp = load_ar_experiment("ar-tiny", overrides)
    rt = Runtime(0, 1, torch.device("cpu"))
    trainer = ARTrainer(exp, vae, "bundled:digits", tmp_path / "ar", rt, quiet=True)
    stream = batch_stream(trainer.train_set, trainer.micro_batch, trainer.rt, 0, 0, 0)
    batches = trainer.fetch(stream, 2)
    calls = count_host_reads(monkeypatch)
    metrics = trainer.train_step(batches)
    assert calls == ["tolist in trainer.py"]  # the NaN / stop flag, once per optimizer step
    logged = trainer.mean_over_ranks(metrics)  # at logging steps: one more read, of all
    assert len(calls) == 2 and set(logged) >= {"loss", "img_loss", "grad_norm"}


def test_a_folder_without_classes_trains_an_unconditional_model_and_resumes(vae, tmp_path):
    walls = tmp_path / "walls"
    walls.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(walls / f"{i}.png")
    r = rqgen("train-ar", "--vae", vae, "--data", walls, "--out", tmp_path / "ar", "--steps", 2,
              "--device", "cpu", *AR_TINY)  # fmt: skip
    assert "has no class labels (no subfolders): training an unconditional model" in r.stdout
    assert "12 images: stage 2 stores the centre and 63 random crops/flips of each" in r.stdout
    seen = re.search(
        r"training sees (\d+) distinct (?:code|feature) maps \((\d+) images × 64 view", r.stdout
    )
    assert seen and int(seen[1]) > 4 * int(seen[2]), r.stdout  # many more code maps than images
    assert json.loads((tmp_path / "ar" / "config.json").read_text())["conditioning"] == "none"
    again = rqgen("train-ar", "--vae", vae, "--data", walls, "--out", tmp_path / "ar", "--steps",
                  4, "--device", "cpu", *AR_TINY)  # fmt: skip
    assert "resuming at step" in again.stdout  # the same decision: the run continues


def assert_first_sample_decodes(vae, codes, folder) -> None:
    """The first PNG `sample` wrote is what the VAE decodes the first saved code map to."""
    from rqgen.stage1 import load_vae

    pixels = load_vae(vae).decode_codes(codes).clamp(-1, 1)
    png = np.asarray(Image.open(sorted(folder.glob("00000_*.png"))[0]))[::4, ::4]
    expected = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    assert np.abs(png.astype(int) - expected.astype(int)).max() <= 1


def test_dynamic_depth_trains_and_samples_stacks_that_end(vae, tmp_path):
    """model.mean_depth=2 on a depth-4 tokenizer: the transformer models where stacks end
    (stop code K = 32); its samples are stacks of 1..4 codes, decoded each from its own Ẑ(d).
    A mean depth the stacks cannot hold is refused."""
    import torch

    ar = tmp_path / "ar"
    train_ar(vae, ar, 4, "model.mean_depth=2")
    assert json.loads((ar / "config.json").read_text())["config"]["stop_code"] is True
    rqgen("sample", "--model", ar, "--n", 3, "--device", "cpu", "--out", tmp_path / "s",
          "--save-codes", tmp_path / "codes.npy")  # fmt: skip
    codes = torch.from_numpy(np.load(tmp_path / "codes.npy"))
    stop = codes == 32
    assert codes.shape == (3, 8, 8, 4) and not stop[..., 0].any()
    assert (stop[..., :-1] <= stop[..., 1:]).all()  # once ended, a stack stays ended
    assert_first_sample_decodes(vae, codes, tmp_path / "s")
    p = train_ar(vae, tmp_path / "bad", 1, "model.mean_depth=4.5", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "rqgen: error: model.mean_depth=4.5: a stack holds 1..4 codes, so choose a mean "
        "depth in 1..4 (0: every stack full)"
    )


def test_a_prefix_of_the_tokenizers_depth_trains_and_samples(vae, tmp_path):
    """model.code_depth=2 on a depth-4 tokenizer: the transformer models the first two codes
    of each stack and its samples decode from Ẑ(2); a depth the tokenizer lacks is refused."""
    import torch

    ar = tmp_path / "ar"
    train_ar(vae, ar, 4, "model.code_depth=2")
    assert json.loads((ar / "config.json").read_text())["config"]["code_shape"] == [8, 8, 2]
    rqgen("sample", "--model", ar, "--n", 3, "--device", "cpu", "--out", tmp_path / "s",
          "--save-codes", tmp_path / "codes.npy")  # fmt: skip
    codes = torch.from_numpy(np.load(tmp_path / "codes.npy"))
    assert codes.shape == (3, 8, 8, 2)
    assert_first_sample_decodes(vae, codes, tmp_path / "s")  # from Ẑ(2)
    p = train_ar(vae, tmp_path / "bad", 1, "model.code_depth=5", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "rqgen: error: model.code_depth=5, but the RQ-VAE has 4 codes per position: choose "
        "model.code_depth in 1..4 (0 for all)"
    )
