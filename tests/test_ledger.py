"""The benchmarks' run records: a kept run is found again only under the same resolved
config and data, so a study never reuses a run that trained something else."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ledger  # noqa: E402
import rate_distortion as rd  # noqa: E402


def test_key_is_the_resolved_config_and_data():
    key = ledger.run_key("tiny32", ["train.seed=1", "model.code_depth=4"], "photos")
    # the preset's defaults spelled out, in another order: the same run
    same = ledger.run_key("tiny32", ["model.gradient_estimator=ste", "train.seed=1"], "photos")
    assert key == same
    assert key != ledger.run_key("tiny32", ["train.seed=2"], "photos")
    assert key != ledger.run_key("tiny32", ["train.seed=1"], "fashion-mnist")
    assert key != ledger.run_key("tiny32", ["train.seed=1", "train.steps=999"], "photos")


def test_records_round_trip_and_refuse_another_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "RUNS", tmp_path)
    key = ledger.run_key("tiny32", ["train.seed=0"], "photos")
    assert ledger.get(key) is None
    kept = ledger.put(key, {"psnr": 30.5, "variant": "RQ 8x8x4", "seed": 0}, trained_at="abc")
    assert ledger.get(key) == kept == {"psnr": 30.5, "commit": "abc"}
    # the same run scored again later keeps its record; a changed score replaces it
    assert ledger.put(key, {"psnr": 30.5}, trained_at="later")["commit"] == "abc"
    assert ledger.put(key, {"psnr": 30.6}, trained_at="later")["commit"] == "later"
    assert ledger.get(key) == {"psnr": 30.6, "commit": "later"}
    (path,) = tmp_path.iterdir()
    record = json.loads(path.read_text())
    record["key"]["config"]["train"]["seed"] = 5  # a record edited by hand
    path.write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="holds another run"):
        ledger.get(key)


def test_records_are_not_ignored_by_git():
    """Records are kept by committing them: an ignore rule would drop them silently."""
    probe = ledger.RUNS / "0123456789abcdef0123.json"
    root = Path(__file__).resolve().parents[1]
    found = subprocess.run(["git", "-C", str(root), "rev-parse"], capture_output=True)
    if found.returncode != 0:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(probe)])
    assert ignored.returncode == 1  # 1: not ignored


def test_only_trains_its_subset_and_keeps_the_other_recorded_variants(tmp_path, monkeypatch):
    """A table rebuilt with --only keeps every variant recorded at every seed, trains none."""
    monkeypatch.setattr(ledger, "RUNS", tmp_path)
    trained = []
    monkeypatch.setattr(rd, "one", lambda name, o, a, c, seed, keep: trained.append(name)
                        or {"psnr": 1.0, "variant": name, "seed": seed})  # fmt: skip
    args = argparse.Namespace(steps=10, data="photos", only=["a"], seed=0, jobs=1)
    variants = {n: ("tiny32", [f"model.code_depth={d}"]) for n, d in [("a", 1), ("b", 2), ("c", 4)]}
    for seed in (0, 1):  # b recorded at both seeds, c at one only
        ledger.put(rd.run_key("tiny32", variants["b"][1], args, seed), {"psnr": 2.0 + seed})
    ledger.put(rd.run_key("tiny32", variants["c"][1], args, 0), {"psnr": 3.0})
    got = {(r["variant"], r["seed"]): r["psnr"] for r in rd.train_all(variants, args, [0, 1])}
    assert trained == ["a", "a"]
    assert got == {("a", 0): 1.0, ("a", 1): 1.0, ("b", 0): 2.0, ("b", 1): 3.0}


def test_train_curve_averages_each_interval_between_evaluations(tmp_path):
    rows = [{"step": s, "rec": s / 10, "commit": 1.0} for s in (10, 20, 30, 40)]
    rows.insert(2, {"step": 20, "val_psnr": 25.0})
    rows.append({"step": 40, "val_psnr": 26.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert rd.train_curve(tmp_path) == [[20, 1.5, 1.0], [40, 3.5, 1.0]]
    assert rd.val_curve(tmp_path) == [[20, 25.0], [40, 26.0]]
    assert rd.train_curve(tmp_path / "absent") == []
