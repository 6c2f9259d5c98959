"""End to end through the real CLI: training, DDP, bad input, eval (resuming is in
test_resume_vae.py); the `rqgen` helper the other CLI tests import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rqgen import RQVAE
from rqgen.train.state import TrainState

pytestmark = pytest.mark.slow

TINY = [
    "model.ch=16",
    "model.ch_mult=[1,2,2]",
    "model.z_channels=16",
    "model.embed_dim=16",
    "model.codebook_size=32",
    "train.batch_size=8",
    "train.num_workers=0",
    "train.log_every=1",
    "train.ckpt_every=5",
    "train.sample_every=10",
    "train.val_batches=1",
    "train.warmup_steps=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def rqgen(*args, check=True, env_extra=None, isolated=False) -> subprocess.CompletedProcess:
    """Run the CLI as a user would and return its exit code, stdout and stderr. In this
    process by default (a new interpreter would only pay ~2 s to import torch again), with
    one torch thread, the subprocess's environment and warnings printed to stderr, an
    unexpected exception becoming a traceback on stderr and exit code 1; `isolated` runs
    `python -m rqgen` in a fresh process instead."""
    argv = [str(a) for a in args]
    if isolated:
        proc = subprocess.run([sys.executable, "-m", "rqgen", *argv], capture_output=True,
                              text=True, env={**ENV, **(env_extra or {})}, timeout=300)  # fmt: skip
    else:
        proc = _in_process(argv, env_extra or {})
    if check and proc.returncode != 0:
        raise AssertionError(f"rqgen {argv} failed:\n{proc.stderr[-3000:]}")
    return proc


def _in_process(argv: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import traceback
    import warnings

    from rqgen.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update({"OMP_NUM_THREADS": "1", **env_extra})  # as ENV: one thread per run
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():  # fmt: skip
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: err.write(
                warnings.formatwarning(m, c, f, n, line)
            )
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, rc or 0, out.getvalue(), err.getvalue())


def train_args(out, steps, *extra, data="bundled:digits"):
    return ["train-vae", "--data", data, "--out", out, "--steps", steps, "--device", "cpu",
            *TINY, *extra]  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "run"
    rqgen(*train_args(out, 10))
    return out


def test_training_writes_a_loadable_model_logs_and_grids(trained):
    vae = RQVAE.from_pretrained(trained)
    assert vae.config.codebook_size == 32
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["step"] == 10 and cfg["data"] == "bundled:digits"
    rows = metrics(trained)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 11))
    assert all(r["codebook_sync_err"] == 0.0 for r in rows if "loss" in r)
    assert any("val_psnr" in r for r in rows)
    assert sorted(p.name for p in (trained / "samples").iterdir()) == ["recon_0000010.png"]


def test_eval_vae_prints_one_json_object(trained):
    proc = rqgen("eval-vae", "--vae", trained, "--data", "bundled:digits:val", "--limit", 20,
                 "--json", "--device", "cpu")  # fmt: skip
    result = json.loads(proc.stdout)  # the whole stdout is one JSON object
    assert result["n_images"] == 20
    for key in ("psnr", "ssim", "codebook_usage", "perplexity", "unquantized_psnr"):
        assert isinstance(result[key], float)
    assert len(result["per_depth_psnr"]) == 4
    assert 0 < result["codebook_usage"] <= 1 and 1 <= result["perplexity"] <= 32
    assert result["rfid"] is None and "Inception" in result["rfid_note"] + "inception"


def test_eval_vae_names_its_protocol_and_saves_what_it_scored(trained, tmp_path):
    from rqgen.evaluate.adm import read_batch
    from rqgen.evaluate.protocol import ResizedFiles
    from rqgen.evaluate.stats import FeatureStats, frechet_distance
    from rqgen.utils.images import to_uint8

    rng = np.random.default_rng(0)
    for i in range(6):  # wide photos: the crop chain decides what is scored
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    args = ["eval-vae", "--vae", trained, "--data", tmp_path, "--json", "--features", "digits",
            "--batch-size", 4]  # fmt: skip
    res = json.loads(rqgen(*args, "--protocol", "adm", "--save-recons", tmp_path / "r.npz",
                           "--save-features", tmp_path / "f.npz").stdout)  # fmt: skip
    assert (
        "center_crop_arr" in res["protocol"]["resize"] and "data range 1" in res["ssim_convention"]
    )
    assert res["lpips"] is None and "vgg16-397923af.pth" in res["lpips_note"]
    vae = RQVAE.from_pretrained(trained).eval()
    x = torch.stack(
        [ResizedFiles(sorted(tmp_path.glob("*.png")), 32, "adm")[i][0] for i in range(6)]
    )
    with torch.no_grad():
        xr = vae.decode_codes(vae.encode_to_codes(x)).clamp(-1, 1)
    saved = next(read_batch(tmp_path / "r.npz").batches(6))
    assert np.abs(saved.astype(int) - to_uint8(xr).astype(int)).max() <= 1  # float rounding
    with np.load(tmp_path / "f.npz") as f:
        a = FeatureStats("d", 6, f["ref_mu"], f["ref_sigma"], f["ref_features"])
        b = FeatureStats("d", 6, f["sample_mu"], f["sample_sigma"], f["sample_features"])
        assert frechet_distance(a, b) == pytest.approx(res["rfd_digits"], rel=1e-9)
    official = json.loads(rqgen(*args, "--protocol", "official").stdout)
    assert "Resize" in official["protocol"]["resize"] and official["psnr"] != res["psnr"]


def test_reconstruct_writes_pairs_and_coarse_to_fine_strips(trained, tmp_path):
    img = tmp_path / "photo.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(img)
    rqgen("reconstruct", "--vae", trained, "--input", img, "--out", tmp_path / "rec")
    pair = Image.open(tmp_path / "rec" / "photo_pair.png")
    strip = Image.open(tmp_path / "rec" / "photo_coarse_to_fine.png")
    assert strip.width > 2 * pair.width  # original + D = 4 partial reconstructions
    rqgen("reconstruct", "--vae", trained, "--input", "bundled:digits:val", "--limit", 3,
          "--out", tmp_path / "rec2")  # fmt: skip
    assert len(list((tmp_path / "rec2").glob("*_coarse_to_fine.png"))) == 3


def test_ddp_two_processes_match_one_process_and_share_the_codebook(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Conv biases in front of per-channel GroupNorm get pure rounding-noise gradients, which
    # Adam with eps 1e-8 turns into ±lr steps; a larger eps keeps the comparison meaningful.
    # With depth scales on: their statistics are collectives too.
    eps = ["train.adam_eps=1e-6", "model.depth_scale=true"]
    rqgen(*train_args(one, 6, *eps))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rqgen", *map(str, train_args(two, 6, *eps))],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics(two) if "loss" in r]
    assert len(rows) == 6 and all(r["codebook_sync_err"] == 0.0 for r in rows)
    losses = [r["loss"] for r in metrics(one) if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-4)
    a, b = weights(one), weights(two)
    for k in a:  # same global batch of 8: DDP's 2 × 4 equals one process's 8
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)
    # validation split over the ranks: the same held-out images, the same score
    val1, val2 = ([r["val_psnr"] for r in metrics(d) if "val_psnr" in r] for d in (one, two))
    assert len(val1) == 1 and val2 == pytest.approx(val1, abs=1e-3)


def test_ddp_with_the_gan_and_a_dq_vae_keeps_codebooks_identical(tmp_path):
    """DQ-VAE with the learned router: weighted codebook statistics, router and GAN under DDP."""
    out = tmp_path / "gan"
    dq = ["model.decoder_ch_mult=[1,2]", "model.router=learned",
          "model.decoder_attn_resolutions=[]", "train.disc_start=1",
          "train.disc_ndf=8"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rqgen", "train-vae", "--config", "dq-tiny32",
         *map(str, train_args(out, 4, *dq)[1:])],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "dqvae"
    rows = [r for r in metrics(out) if "loss" in r]
    assert all(r["codebook_sync_err"] == 0.0 for r in rows)
    assert all("d_loss" in r and "adaptive_w" in r for r in rows[1:])
    assert all(0 <= r["fine_fraction"] <= 1 and "budget" in r for r in rows)


def test_corrupt_image_is_skipped_with_a_warning(tmp_path):
    data = tmp_path / "imgs" / "cats"
    data.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (40, 36), (40 * i, 100, 200)).save(data / f"{i}.png")
    (data / "broken.jpg").write_bytes(b"not an image at all")
    proc = rqgen(*train_args(tmp_path / "out", 2, data=tmp_path / "imgs"))
    assert "skipped unreadable image" in proc.stderr and "broken.jpg" in proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert max(r.get("skipped_images", 0) for r in metrics(tmp_path / "out")) >= 1


def test_empty_folder_fails_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = rqgen(*train_args(tmp_path / "out", 2, data=tmp_path / "empty"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rqgen: error: no readable images")


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan"
    rqgen(*train_args(out, 5))
    before = weights(out)
    # the resumed run's reconstruction loss turns NaN (as diverging training does)
    monkeypatch.setattr("rqgen.stage1.losses.F.mse_loss", lambda a, b: (a - b).sum() * float("nan"))
    proc = rqgen(*train_args(out, 12), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("rqgen: error: loss became nan")
    after = weights(out)  # the last good checkpoint is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_weight_ema_and_grad_accumulation(tmp_path):
    out = tmp_path / "opts"
    rqgen(*train_args(out, 3, "train.precision=bf16", "train.ema_decay=0.5", "train.grad_accum=2"))
    exported = weights(out)  # the public checkpoint holds the EMA weights
    raw = TrainState(out).tensors("model")
    k = "decoder.conv_out.weight"
    assert not torch.equal(exported[k], raw[k])
    assert torch.equal(exported["quantizer.codebook"], raw["quantizer.codebook"])  # buffers copied
    rows = [r for r in metrics(out) if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # finite under bf16
    RQVAE.from_pretrained(out)


def test_the_batch_sampler_draws_one_permutation_per_epoch_and_resumes_anywhere(monkeypatch):
    from rqgen.train.data import ShardedBatchSampler

    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or real(*a, **k))
    s = ShardedBatchSampler(100, 10, 0, 1, seed=3, start=0)
    it = iter(s)
    batches = [next(it) for _ in range(25)]  # 2.5 epochs of 10 batches
    assert len(calls) == 3  # one permutation per epoch, not one per step
    assert sorted(sum(batches[:10], [])) == list(range(100))  # an epoch sees every item once
    for start in (0, 7, 10, 23):  # a resumed stream continues exactly
        resumed = iter(ShardedBatchSampler(100, 10, 0, 1, seed=3, start=start))
        assert [next(resumed) for _ in range(25 - start)] == batches[start:]
    # two ranks share each global batch between them
    r0, r1 = (iter(ShardedBatchSampler(100, 10, r, 2, seed=3, start=0)) for r in (0, 1))
    assert [next(r0) + next(r1) for _ in range(25)] == batches


def test_learning_rate_schedules_warm_up_then_hold_or_decay():
    import math

    from rqgen.train.trainer import scheduled_lr

    warm = [scheduled_lr(s, 1.0, 4, 20, "constant") for s in range(4)]
    assert warm == [0.25, 0.5, 0.75, 1.0]
    assert all(scheduled_lr(s, 1.0, 4, 20, "constant") == 1.0 for s in range(4, 40))
    cos = [scheduled_lr(s, 1.0, 4, 20, "cosine", 0.1) for s in range(4, 21)]
    assert cos[0] == 1.0 and math.isclose(cos[-1], 0.1) and cos == sorted(cos, reverse=True)
    assert math.isclose(scheduled_lr(12, 1.0, 4, 20, "cosine"), 0.5)  # half-way: half


def count_host_reads(monkeypatch) -> list[str]:
    """Patch the tensor methods that read a value back to the host; record each call made
    from rqgen's own code (on a GPU each one waits for the queued kernels)."""
    import rqgen

    package = str(Path(rqgen.__file__).parent) + "/"
    calls: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                calls.append(f"{_name} in {Path(caller).name}")
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_a_stage1_step_reads_from_the_device_once(tmp_path, monkeypatch):
    from rqgen.configs import load_vae_experiment
    from rqgen.distributed import Runtime
    from rqgen.train.data import batch_stream
    from rqgen.train.vae import VAETrainer

    overrides = [*TINY, "train.grad_accum=2", "train.grad_clip=1.0", "train.ema_decay=0.9"]
    exp = load_vae_experiment("tiny32", overrides)
    rt = Runtime(0, 1, torch.device("cpu"))
    trainer = VAETrainer(exp, "bundled:digits", tmp_path / "vae", rt, quiet=True)
    stream = batch_stream(trainer.train_set, trainer.micro_batch, rt, 0, 0, 0)
    trainer.train_step(trainer.fetch(stream, 2))  # the first step initialises the codebook
    batches = trainer.fetch(stream, 2)
    calls = count_host_reads(monkeypatch)
    trainer.train_step(batches)  # with code restarts: the tiny codebook has dead codes
    assert calls == ["tolist in trainer.py"]
