"""Generation metrics: streamed statistics, FID / KID / IS, reference files and eval-gen."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from rqgen.data import BundledDigits
from rqgen.errors import CheckpointError
from rqgen.evaluate.generation import Evaluator, build_evaluator
from rqgen.evaluate.stats import (
    FeatureStats,
    StatsAccumulator,
    _Identity,
    frechet_distance,
    inception_score,
    kernel_distance,
    stats_of,
)


def small_evaluator() -> Evaluator:
    """A fixed random conv net: enough to tell image distributions apart."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())  # fmt: skip
    return Evaluator("test-net", net, nn.Linear(128, 10), spatial=net[2])


def digits(n=400) -> torch.Tensor:
    val = BundledDigits(32, "val")
    return torch.stack([val[i][0] for i in range(min(n, len(val)))])


def test_streamed_statistics_equal_the_batch_formula():
    f = torch.randn(1000, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    acc = StatsAccumulator(keep=100)
    for chunk in f.split(77):
        acc.update(chunk)
    s = acc.stats("x")
    np.testing.assert_allclose(s.mu, f.mean(0).numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(s.sigma, np.cov(f.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)
    assert s.n == 1000 and s.subset.shape == (100, 6)
    rows = {tuple(r) for r in f.float().numpy()}  # rows are kept in float32
    assert all(tuple(r) in rows for r in s.subset)  # a subset of the real rows


def test_fid_is_zero_on_itself_matches_torchmetrics_and_grows_with_noise():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ev, x = small_evaluator(), digits()
    ref, _ = stats_of(x.split(64), ev)
    assert abs(frechet_distance(ref, ref)) < 1e-6
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (0.1, 0.3, 0.6):
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        fake, _ = stats_of(noisy.split(64), ev)
        fids.append(frechet_distance(ref, fake))
    assert 0 < fids[0] < fids[1] < fids[2]
    # the same number as torchmetrics' FID on the same features
    tm = FrechetInceptionDistance(feature=_Identity(128))
    tm.update(ev.features(x), real=True)
    tm.update(ev.features(noisy), real=False)
    assert fids[2] == pytest.approx(float(tm.compute()), rel=1e-4)


def test_kid_and_inception_score_behave():
    ev, x = small_evaluator(), digits()
    ref, logits = stats_of(x.split(64), ev, with_logits=True)
    same, _ = kernel_distance(ref, ref, subsets=20, subset_size=100)
    noisy = (x + 0.6 * torch.randn_like(x)).clamp(-1, 1)
    far, _ = kernel_distance(ref, stats_of(noisy.split(64), ev)[0], subsets=20, subset_size=100)
    assert abs(same) < 0.2 * far
    # IS: confident, diverse logits score near the number of classes; uniform ones score 1
    sharp = torch.eye(10).repeat(20, 1) * 30
    assert inception_score(sharp, splits=1)[0] == pytest.approx(10, rel=1e-3)
    assert inception_score(torch.zeros(200, 10))[0] == pytest.approx(1, rel=1e-6)
    assert logits.shape == (len(x), 10)


def test_stats_file_round_trip(tmp_path):
    ev = small_evaluator()
    s, _ = stats_of(digits(100).split(50), ev, source="bundled:digits:val")
    t = FeatureStats.load(s.save(tmp_path / "ref.npz"))
    assert (t.evaluator, t.n, t.source) == ("test-net", 100, "bundled:digits:val")
    np.testing.assert_allclose(t.sigma, s.sigma)
    assert frechet_distance(s, t) == pytest.approx(0, abs=1e-6)


def test_inception_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RQGEN_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(Exception, match="weights-inception-2015-12-05") as e:
        build_evaluator("inception")
    assert isinstance(e.value, CheckpointError) or "torch-fidelity" in str(e.value)


@pytest.mark.slow
def test_eval_gen_cli_balanced_streamed_and_self_consistent(tmp_path, rqgen_cache, class_ar):
    from test_train_vae import rqgen

    env, ar = rqgen_cache, class_ar
    stats = tmp_path / "ref.npz"
    rqgen("fid-stats", "bundled:digits:val", "--out", stats, "--features", "digits",
          "--resolution", 32, env_extra=env)  # fmt: skip
    out = tmp_path / "samples"
    r = rqgen("eval-gen", "--model", ar, "--per-class", 3, "--ref", stats, "--features",
              "digits", "--out", out, "--json", "--batch-size", 7, env_extra=env)  # fmt: skip
    res = json.loads(r.stdout)
    assert res["per_class"] == {str(c): 3 for c in range(10)} and res["n_samples"] == 30
    assert res["fd_digits"] > 0 and "digits-cnn" in res["evaluator"] and "is_digits" in res
    assert "fid" not in res and "inception_score" not in res  # not Inception: not called FID
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 30 and files[0] == "000000_0.png" and files[-1] == "000029_9.png"
    # the held-out digits scored against their own statistics: FID ~ 0
    real = tmp_path / "real"
    val = BundledDigits(32, "val")
    from rqgen.utils.images import save_image

    for i in range(len(val)):
        save_image(val[i][0], real / f"{i:04d}.png")
    r = rqgen("eval-gen", "--samples", real, "--ref", stats, "--features", "digits",
              "--resolution", 32, "--json", env_extra=env)  # fmt: skip
    assert abs(json.loads(r.stdout)["fd_digits"]) < 0.05
    # the ADM protocol: the held-out digits as an ADM reference batch, the samples written as
    # an ADM sample batch, the features behind every score saved
    from rqgen.evaluate.adm import read_batch, write_batch
    from rqgen.utils.images import to_uint8

    held = torch.stack([val[i][0] for i in range(len(val))])
    write_batch(tmp_path / "ref_batch.npz", [to_uint8(held)], len(held), 32)
    r = rqgen("eval-gen", "--model", ar, "--per-class", 3, "--ref", tmp_path / "ref_batch.npz",
              "--features", "digits", "--out", out, "--json", "--protocol", "adm", "--save-npz",
              tmp_path / "s.npz", "--save-features", tmp_path / "f.npz", env_extra=env)  # fmt: skip
    adm = json.loads(r.stdout)
    assert adm["protocol"]["name"] == "adm" and adm["n_reference"] == len(held)
    assert {"fd_digits", "sfd_digits", "is_digits", "precision_digits", "recall_digits"} <= set(adm)
    assert "kd_digits" not in adm and 0 <= adm["precision_digits"] <= 1
    assert adm["fd_digits"] == pytest.approx(res["fd_digits"], rel=0.05)  # ref: 8-bit rounded
    batch = read_batch(tmp_path / "s.npz")
    assert batch.shape == (30, 32, 32, 3) and list(batch.labels) == [c for c in range(10)
                                                                     for _ in range(3)]  # fmt: skip
    from PIL import Image

    first = np.asarray(Image.open(out / "000000_0.png").convert("RGB"))
    assert np.array_equal(next(batch.batches(1))[0], first)  # the PNG, exactly
    # recomputed by independent code from the saved features: pytorch-fid's own Fréchet
    # distance, and precision/recall by brute force in float64
    from test_metrics import pytorch_fid_distance

    with np.load(tmp_path / "f.npz") as f:
        assert f["sample_features"].shape == (30, 128) and f["ref_features"].shape[0] == len(held)
        fd = pytorch_fid_distance()(f["sample_mu"], f["sample_sigma"], f["ref_mu"], f["ref_sigma"])
        assert fd == pytest.approx(adm["fd_digits"], rel=1e-4)
        ref_f, sam_f = (
            torch.from_numpy(f[k]).double() for k in ("ref_features", "sample_features")
        )
        d = lambda u, v: torch.cdist(u, v) ** 2  # noqa: E731
        r_ref, r_sam = d(ref_f, ref_f).sort(1).values[:, 3], d(sam_f, sam_f).sort(1).values[:, 3]
        precision = float((d(sam_f, ref_f) <= r_ref).any(1).double().mean())
        recall = float((d(ref_f, sam_f) <= r_sam).any(1).double().mean())
        assert precision == pytest.approx(adm["precision_digits"], abs=1e-4)
        assert recall == pytest.approx(adm["recall_digits"], abs=1e-4)
        assert json.loads(str(f["scores"]))["fd_digits"] == adm["fd_digits"]
    # an ADM batch of the same images as a folder gives the same numbers as the folder
    scored = ["eval-gen", "--samples", out, "--features", "digits", "--resolution", 32, "--json"]
    as_folder = json.loads(rqgen(*scored, "--ref", real, env_extra=env).stdout)
    as_batch = json.loads(rqgen(*scored, "--ref", tmp_path / "ref_batch.npz", env_extra=env).stdout)
    for key in ("fd_digits", "sfd_digits", "kd_digits", "precision_digits", "recall_digits"):
        assert as_batch[key] == pytest.approx(as_folder[key], rel=1e-6), key
    # statistics from another evaluator are refused
    FeatureStats("other", 2, np.zeros(2), np.eye(2), np.zeros((2, 2))).save(tmp_path / "o.npz")
    r = rqgen("eval-gen", "--samples", real, "--ref", tmp_path / "o.npz", "--features",
              "digits", "--resolution", 32, env_extra=env, check=False)  # fmt: skip
    assert r.returncode == 2 and "recompute it with rqgen fid-stats" in r.stderr


def test_the_digits_evaluator_refuses_pictures_that_are_not_digits(tmp_path, rqgen_cache):
    from test_failures import one_line_error
    from test_train_vae import rqgen

    from rqgen.evaluate.generation import digits_like

    assert digits_like(torch.stack([BundledDigits(32, "val")[i][0] for i in range(64)])) > 0.9
    r = rqgen("fid-stats", "bundled:photos:val", "--out", tmp_path / "p.npz", "--features",
              "digits", check=False, env_extra=rqgen_cache)  # fmt: skip
    one_line_error(r, "only 0% of the first images of bundled:photos:val look like that",
                   "use --features inception")  # fmt: skip
    assert not (tmp_path / "p.npz").exists()


def test_eval_gen_on_two_ranks_gives_the_images_and_scores_of_one_process(
    tmp_path, rqgen_cache, class_ar
):
    import subprocess
    import sys

    from test_train_vae import ENV, rqgen

    common = ["eval-gen", "--model", class_ar, "--num-samples", 13, "--ref", "bundled:digits:val",
              "--features", "digits", "--json", "--device", "cpu"]  # fmt: skip
    one = json.loads(rqgen(*common, "--out", tmp_path / "one", "--batch-size", 5,
                           env_extra=rqgen_cache).stdout)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rqgen", *map(str, common), "--out", str(tmp_path / "two"), "--batch-size", "3"],
        capture_output=True, text=True, env={**ENV, **rqgen_cache}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout[proc.stdout.index("{") :])  # rank 0 alone prints
    assert one["world_size"] == 1 and two["world_size"] == 2
    # the same images, scored in batches of other sizes (the evaluator's float32 rounding
    # depends on the batch) and summed in another order
    for key in ("fd_digits", "sfd_digits", "kd_digits", "is_digits", "precision_digits",
                "recall_digits", "n_samples", "n_reference"):  # fmt: skip
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(files) == 13
    for name in files:  # each sample drawn with its own seed: the same image on any rank
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
