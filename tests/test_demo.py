"""`rqgen demo` (what `make demo` runs), shortened to a few steps: every promised output."""

import json

import pytest
from PIL import Image
from test_train_vae import rqgen

pytestmark = pytest.mark.slow


def test_demo_writes_models_pictures_and_metrics(tmp_path, rqgen_cache):
    out = tmp_path / "demo"
    r = rqgen("demo", "--out", out, "--steps", 2, "--ar-steps", 2, env_extra=rqgen_cache)
    assert "classifier accuracy" in r.stdout
    for d in ("vae", "ar"):
        assert (out / d / "config.json").is_file() and (out / d / "model.safetensors").is_file()
    recon = sorted(p.name for p in (out / "reconstructions").iterdir())
    assert "val00_pair.png" in recon and "val00_coarse_to_fine.png" in recon
    for name in ("samples.png", "samples_cfg2.png"):
        w, h = Image.open(out / name).size
        assert w == h  # 10 classes × 10 samples: one row per class
    m = json.loads((out / "metrics.json").read_text())
    assert m["sampling"]["top_k"] == 64
    for key in ("generation", "generation_without_top_k"):  # the same seeds, with and without
        assert set(m[key]) == {"samples", "samples_cfg2"}
        for s in m[key].values():
            assert 0 <= s["accuracy"] <= 1 and s["frechet_distance"] >= 0
    assert len(m["stage1_heldout"]["per_depth_psnr"]) == 4
    # the models the demo leaves behind are the ones `rqgen sample` loads
    rqgen("sample", "--model", out / "ar", "--n", 2, "--class", "5", "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file()


def test_dq_demo_samples_and_scores_the_same_way(tmp_path, rqgen_cache):
    out = tmp_path / "dq"
    r = rqgen("demo", "--dq", "--out", out, "--steps", 2, "--ar-steps", 2, env_extra=rqgen_cache)
    assert "classifier accuracy" in r.stdout
    assert any(p.name.endswith("_granularity.png") for p in (out / "reconstructions").iterdir())
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["generation"]) == set(m["generation_without_top_k"]) == {"samples", "samples_cfg2"}
    assert 0 <= m["stage1_heldout"]["fine_fraction"] <= 1
    w, h = Image.open(out / "samples.png").size
    assert w == h
