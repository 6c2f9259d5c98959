"""The ADM suite's formulas and formats against independent references: pytorch-fid's
Fréchet distance, hand-computed precision/recall, the ADM .npz layout read and written."""

import ast
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch import nn

from rqgen.errors import DataError
from rqgen.evaluate import manifold
from rqgen.evaluate.adm import (
    center_crop_arr,
    from_uint8_nhwc,
    is_adm_batch,
    read_batch,
    resize_center_crop,
    write_batch,
)
from rqgen.evaluate.generation import SPATIAL_CHANNELS, Evaluator, inception_evaluator
from rqgen.evaluate.manifold import precision_recall
from rqgen.evaluate.protocol import PROTOCOLS, scores
from rqgen.evaluate.stats import FeatureStats, frechet_distance, inception_score_adm, stats_of
from rqgen.utils.images import to_uint8


def pytorch_fid_distance():
    """pytorch-fid's calculate_frechet_distance, compiled from its own source (the module
    imports torchvision, which this CPU environment does not install)."""
    import pytorch_fid

    src = Path(pytorch_fid.__file__).with_name("fid_score.py").read_text()
    name = "calculate_frechet_distance"
    fn = next(n for n in ast.parse(src).body if getattr(n, "name", None) == name)
    ns = {"np": np, "linalg": linalg}
    exec(compile(ast.Module([fn], []), "fid_score.py", "exec"), ns)
    return ns["calculate_frechet_distance"]


def test_frechet_distance_equals_pytorch_fid_on_the_same_statistics():
    reference = pytorch_fid_distance()
    rng = np.random.default_rng(0)
    for d, n in ((8, 50), (64, 40)):  # the second: singular covariances (n < d)
        a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n, d)) @ rng.normal(size=(d, d))
        sa = FeatureStats("x", n, a.mean(0), np.cov(a, rowvar=False), np.zeros((0, d)))
        sb = FeatureStats("x", n, b.mean(0), np.cov(b, rowvar=False), np.zeros((0, d)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=) in theirs
            expected = reference(sa.mu, sa.sigma, sb.mu, sb.sigma)
        assert frechet_distance(sa, sb) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_precision_recall_by_hand_identical_and_disjoint(monkeypatch):
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    samples = torch.tensor([[0.5], [5.0]])
    # k = 1: reference radii² 1 each; 0.5 is inside, 5 is 4 away from 3. The samples' radius²
    # is their distance² 20.25, which covers every reference point.
    assert precision_recall(ref, samples, k=1) == (0.5, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 100) == (0.0, 0.0)
    # blocks smaller than the sets: the same answer as one block, and as brute force
    y = torch.randn(200, 16, generator=g) * 1.3 + 0.4
    whole = precision_recall(x, y)
    monkeypatch.setattr(manifold, "ROWS", 7)
    monkeypatch.setattr(manifold, "COLS", 11)
    assert precision_recall(x, y) == whole
    d = lambda u, v: torch.cdist(u.double(), v.double()) ** 2  # noqa: E731
    rx, ry = d(x, x).sort(1).values[:, 3], d(y, y).sort(1).values[:, 3]
    brute = (float((d(y, x) <= rx).any(1).double().mean()),
             float((d(x, y) <= ry).any(1).double().mean()))  # fmt: skip
    assert whole == pytest.approx(brute, abs=1 / 150)  # fp32 vs fp64 at the ball's edge


def test_adm_sample_batch_round_trip_and_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(10, 3, 8, 8, generator=g) * 2 - 1
    u8 = to_uint8(images)
    path = write_batch(tmp_path / "s.npz", (u8[i : i + 4] for i in range(0, 10, 4)), 10, 8,
                       labels=np.arange(10) % 3)  # fmt: skip
    with np.load(path) as z:  # what the ADM evaluator's np.load sees
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (10, 8, 8, 3)
        np.testing.assert_array_equal(z["arr_0"], u8)
        np.testing.assert_array_equal(z["arr_1"], np.arange(10) % 3)
    batch = read_batch(path)
    assert batch.shape == (10, 8, 8, 3) and is_adm_batch(path)
    np.testing.assert_array_equal(np.concatenate(list(batch.batches(3))), u8)
    assert torch.equal(torch.from_numpy(to_uint8(from_uint8_nhwc(u8))), torch.from_numpy(u8))
    # rqgen's own statistics file is not an ADM batch; a float arr_0 is refused in one line
    FeatureStats("net", 2, np.zeros(2), np.eye(2), np.zeros((2, 2))).save(tmp_path / "r.npz")
    assert not is_adm_batch(tmp_path / "r.npz")
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="uint8 \\(N, H, W, 3\\)"):
        read_batch(tmp_path / "f.npz")
    with pytest.raises(DataError, match="images written"):  # fewer images than announced
        write_batch(tmp_path / "short.npz", [u8[:4]], 10, 8)
    assert not (tmp_path / "short.npz").exists()
    torn = tmp_path / "torn.npz"
    torn.write_bytes(path.read_bytes()[:-900])
    with pytest.raises((DataError, zipfile.BadZipFile)):
        list(read_batch(torn).batches(4))


def test_resize_chains_give_centred_squares_of_the_image():
    x = np.zeros((400, 600, 3), np.uint8)
    x[:, 250:350] = 255  # a white band in the centre
    for chain in (center_crop_arr, resize_center_crop):
        out = chain(Image.fromarray(x), 100)
        assert out.shape == (100, 100, 3) and out.dtype == np.uint8
        assert out[:, 50].min() > 200 and out[:, 5].max() < 30  # the band stays central
        assert np.array_equal(out, out[:, ::-1])  # the scene is mirror-symmetric
    same = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(resize_center_crop(Image.fromarray(same), 64), same)
    assert np.array_equal(center_crop_arr(Image.fromarray(same), 64), same)


class _FakeInception(nn.Module):
    """The attributes inception_evaluator reads from torch-fidelity's network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Conv2d(3, 12, 3, 2, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, u8):
        assert u8.dtype == torch.uint8  # torch-fidelity takes 0..255 integers
        m = self.Mixed_6d.branch1x1(u8.float() / 128 - 1)
        return (m.mean((2, 3)),)


def test_spatial_features_are_the_first_seven_channels_in_tf_order_and_feed_sfid():
    ev = inception_evaluator(_FakeInception())
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    out = ev.outputs(x)
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        m = ev.feature_net.net.Mixed_6d.branch1x1(u8.float() / 128 - 1)
    expected = m[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(6, -1)
    torch.testing.assert_close(out["spatial"], expected.double())
    fc = ev.feature_net.net.fc
    torch.testing.assert_close(out["logits"], (out["pool"].float() @ fc.weight.T).double())
    # sFID: the Fréchet distance of the spatial statistics; 0 against itself
    a, _ = stats_of([x[:3], x[3:]], ev)
    b, _ = stats_of([x.flip(-1)], ev)
    s = expected.double().numpy()
    np.testing.assert_allclose(a.mu_s, s.mean(0), atol=1e-9)
    np.testing.assert_allclose(a.sigma_s, np.cov(s, rowvar=False), atol=1e-9)
    names = ev.score_names()
    res = scores(PROTOCOLS["adm"], names, a, b, None)
    assert res["sfid"] == pytest.approx(frechet_distance(a.spatial(), b.spatial()))
    same = scores(PROTOCOLS["adm"], names, a, a, None)["sfid"]
    assert abs(same) < 1e-5 * np.trace(a.sigma_s)  # singular (6 images, 448-d): sqrtm rounds


def test_adm_inception_score_splits_consecutive_chunks():
    sharp = torch.eye(10).repeat(10, 1) * 50  # confident and diverse: IS = 10
    assert inception_score_adm(sharp, split_size=50) == pytest.approx(10, rel=1e-6)
    one = torch.zeros(100, 10)
    one[:, 3] = 50  # every image the same class: IS = 1
    assert inception_score_adm(one) == pytest.approx(1, rel=1e-6)
    mixed = torch.cat([sharp[:50], one[:50]])  # chunks of 50: (10 + 1) / 2
    assert inception_score_adm(mixed, split_size=50) == pytest.approx(5.5, rel=1e-6)


def test_another_network_s_scores_are_named_by_its_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    ev = Evaluator("n", net, nn.Linear(32, 4), short="digits", spatial=net[1])
    x = torch.rand(20, 3, 16, 16) * 2 - 1
    ref, _ = stats_of([x], ev, keep=None)
    fake, logits = stats_of([x.flip(-2)], ev, keep=None, with_logits=True)
    res = scores(PROTOCOLS["rqgen"], ev.score_names(), ref, fake, logits)
    assert set(res) >= {"fd_digits", "sfd_digits", "kd_digits", "is_digits",
                        "precision_digits", "recall_digits"}  # fmt: skip
    assert "fid" not in res and "precision" not in res
    assert len(ref.subset) == 20  # keep=None: every row
