"""Failure behaviour: one run per output directory, permissions, a full disk, unreadable or
refused files, and output paths checked before any work."""

import errno
import os
import pickle

import pytest
import torch
from test_train_vae import metrics, rqgen, train_args, weights

from rqgen.utils.files import RunLock


def one_line_error(r, *expected):
    """Exit 2, no traceback, and the error in one line (after any progress bar output)."""
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line and "it/s" not in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for text in expected:
        assert text in errors[0], errors[0]


def test_a_second_run_into_the_same_out_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)  # as a running training would hold it
    try:
        r = rqgen(*train_args(out, 2), check=False)
        one_line_error(r, f"another rqgen run (PID {os.getpid()}) is training into {out}")
        assert not (out / "metrics.jsonl").exists()
    finally:
        lock.release()
    rqgen(*train_args(out, 2))  # released: the directory is usable again
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]


def test_model_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        rqgen(*train_args(out, 1))
    finally:
        os.umask(old)
    shards = [p.relative_to(out) for p in (out / "train_state" / "shards").iterdir()]
    for name in ("model.safetensors", "config.json", "train_state/state.json", *shards):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_a_full_disk_is_one_line_leaves_no_temporary_files_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    rqgen(*train_args(out, 5))  # a checkpoint at step 5
    before = weights(out)

    def full_disk(tensors, filename, *a, **kw):
        with open(filename, "wb") as fh:
            fh.write(b"partial")  # a half-written shard, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rqgen.checkpoint.save_file", full_disk)
    r = rqgen(*train_args(out, 10), check=False)
    one_line_error(
        r, "no space left while writing", "MiB needed", "the previous checkpoint) is intact"
    )
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == [] and not (out / "train_state.tmp").exists()
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the old model intact
    monkeypatch.undo()
    rqgen(*train_args(out, 10))  # space again: the rerun resumes and finishes
    assert max(r["step"] for r in metrics(out) if "loss" in r) == 10


def test_an_os_error_writing_safetensors_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"

    def no_space(tensors, filename, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    monkeypatch.setattr("rqgen.checkpoint.save_file", no_space)
    r = rqgen(*train_args(out, 1), check=False)
    one_line_error(r, "no space left while writing")
    assert not [p for p in out.rglob("*.tmp")]


def test_a_refused_pickle_in_the_training_state_is_one_line(tmp_path):
    out = tmp_path / "run"
    rqgen(*train_args(out, 2))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (out / "train_state" / "state.json").unlink()  # the earlier layout: a pickled state.pt
    with open(out / "train_state" / "state.pt", "wb") as f:
        pickle.dump({"step": Evil()}, f)
    r = rqgen(*train_args(out, 4), check=False)
    one_line_error(r, "state.pt is not a training state rqgen can read", "remove")
    assert not (tmp_path / "pwned").exists()


def test_bad_yaml_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ch: [1, 2\ntrain: {")
    r = rqgen("train-vae", "--data", "bundled:digits", "--out", tmp_path / "o", "--config", bad,
              check=False)  # fmt: skip
    one_line_error(r, f"cannot read the config file {bad}")
    tagged = tmp_path / "stage1"
    tagged.mkdir()
    (tagged / "config.yaml").write_text("arch: !!python/object/apply:os.system ['echo hi']\n")
    (tagged / "model.pt").write_bytes(b"")
    r = rqgen("convert-official", "--stage1", tagged, "--out", tmp_path / "c", check=False)
    one_line_error(r, "cannot read the official config file")


@pytest.mark.parametrize("case", ["file", "other_model"])
def test_out_is_checked_before_training(tmp_path, case, vae):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("not a directory")
        r = rqgen(*train_args(out, 1), check=False)
        one_line_error(r, "is a file, not a directory")
    else:  # a transformer run pointed at a VAE directory must not overwrite it
        r = rqgen("train-ar", "--vae", vae, "--data", "bundled:digits", "--out", vae,
                  "--steps", 1, check=False)  # fmt: skip
        one_line_error(r, "holds a 'rqvae' model, not a transformer")


def test_sample_checks_its_output_paths_before_sampling(class_ar, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    r = rqgen("sample", "--model", class_ar, "--n", 2, "--out", blocker / "sub" / "x.png",
              check=False)  # fmt: skip
    one_line_error(r, "cannot write to")
    r = rqgen("sample", "--model", class_ar, "--n", 2, "--out", tmp_path, check=False)
    assert r.returncode == 0  # a directory: one PNG per sample
    (tmp_path / "grid_dir.png").mkdir()
    r = rqgen("sample", "--model", class_ar, "--n", 2, "--out", tmp_path / "grid_dir.png",
              check=False)  # fmt: skip
    one_line_error(r, "is a directory: give a file name")


def test_resume_refuses_what_would_make_it_another_run_and_applies_the_rest(tmp_path):
    out = tmp_path / "run"
    rqgen(*train_args(out, 2, "train.batch_size=4"))
    # a forgotten override: the preset's batch would silently make it another run
    r = rqgen(*train_args(out, 4), check=False)
    one_line_error(r, "was trained with train.batch_size=4", "add train.batch_size=4")
    r = rqgen(*train_args(out, 4, "train.batch_size=4", data="bundled:photos"), check=False)
    one_line_error(r, "was trained on --data bundled:digits, not bundled:photos")
    # more steps and another logging interval: applied, said and logged
    r = rqgen(*train_args(out, 4, "train.batch_size=4", "train.log_every=2"))
    assert "resuming at step 2 with train.steps: 2 -> 4; train.log_every: 1 -> 2" in r.stdout
    rows = metrics(out)
    assert any(row.get("resumed_with") for row in rows)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 4]


def test_train_ar_resumed_with_another_vae_is_refused(vae, tmp_path):
    from test_train_ar import train_ar

    ar = tmp_path / "ar"
    train_ar(vae, ar, 2)
    other = tmp_path / "other_vae"
    rqgen(*train_args(other, 1, "train.seed=5"))
    r = train_ar(other, ar, 4, check=False)
    one_line_error(r, "was trained with another vae fingerprint")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_at_the_next_step_and_resume_continues(tmp_path, sig):
    import json
    import signal
    import subprocess
    import sys
    import time

    from test_train_vae import ENV

    out = tmp_path / "run"
    args = train_args(out, 500, "train.ckpt_every=1000", "train.sample_every=1000")
    proc = subprocess.Popen([sys.executable, "-m", "rqgen", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:  # well into training, long before any checkpoint
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
            break
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10  # one step and one checkpoint, not the remaining 490
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert lines[-1].startswith(f"rqgen: interrupted ({sig}) at step ")
    step = int(lines[-1].split(" at step ")[1].split(":")[0])
    meta = json.loads((out / "train_state" / "meta.json").read_text())
    assert meta["step"] == step and 3 <= step < 500
    rqgen(*train_args(out, step + 2, "train.ckpt_every=1000", "train.sample_every=1000"))
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, step + 3))  # nothing lost, nothing repeated


def test_non_finite_weights_and_bad_stats_files_are_one_line(vae, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "vae"
    shutil.copytree(vae, broken)
    w = load_file(str(broken / "model.safetensors"))
    w["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(w, str(broken / "model.safetensors"))
    r = rqgen("eval-vae", "--vae", broken, "--data", "bundled:digits:val", "--limit", 4,
              check=False)  # fmt: skip
    one_line_error(r, "hold NaN or infinite values (e.g. decoder.conv_out.weight)")
    stats = tmp_path / "stats.npz"
    stats.write_bytes(b"PK\x03\x04 not really a zip")
    r = rqgen("eval-gen", "--samples", tmp_path, "--ref", stats, "--features", "digits",
              check=False)  # fmt: skip
    one_line_error(r, "is not a statistics file written by rqgen fid-stats")


def test_a_signal_while_loading_stops_at_once_and_the_resume_is_exact(tmp_path, monkeypatch):
    """Loading a step's images can take seconds: Ctrl-C then stops within 2 s, saving the
    last finished step, and the resumed run equals one never interrupted (random crops
    included: the RNG is put back as the abandoned step found it)."""
    import signal
    import threading
    import time

    import numpy as np
    from PIL import Image

    import rqgen.data.folder as folder

    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    # constant lr: the resume below asks for other --steps, and a cosine decay depends on them
    extra = ("train.ckpt_every=1000", "train.sample_every=1000", "train.lr_schedule=constant")
    out, ref = tmp_path / "run", tmp_path / "ref"
    real_load = folder.ImageFolder._load
    monkeypatch.setattr(folder.ImageFolder, "_load",
                        lambda self, p: time.sleep(0.5) or real_load(self, p))  # fmt: skip
    sent = []

    def interrupt():
        while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 2:
            time.sleep(0.02)
        time.sleep(0.3)  # early in the next step: its 4 s of loading would miss 2 s
        sent.append(time.time())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    r = rqgen(*train_args(out, 40, *extra, data=data), check=False)
    assert time.time() - sent[0] < 2.0 and r.returncode == 130, r.stderr
    step = int(r.stderr.strip().splitlines()[-1].split(" at step ")[1].split(":")[0])
    assert 2 <= step < 40
    monkeypatch.setattr(folder.ImageFolder, "_load", real_load)
    rqgen(*train_args(out, step + 2, *extra, data=data))
    rqgen(*train_args(ref, step + 2, *extra, data=data))  # never interrupted
    a, b = weights(out), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _shared_output_rank(rank: int, store: str, outs: list, results) -> None:
    import torch.distributed as dist

    from rqgen.distributed import Runtime
    from rqgen.errors import ConfigError
    from rqgen.train.output import check_shared_output

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_shared_output(outs[rank], Runtime(rank, 2, torch.device("cpu")))
        results[rank] = "ok"
    except ConfigError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_ranks_that_do_not_see_rank_0s_out_are_refused_in_one_line(tmp_path, shared):
    import torch.multiprocessing as mp

    a, b = tmp_path / "node0", tmp_path / "node1"  # node-local disks: two different folders
    a.mkdir(), b.mkdir()
    outs = [a, a if shared else b]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_shared_output_rank, args=(str(tmp_path / "store"), outs, results), nprocs=2)
        results = dict(results)
    if shared:
        assert results == {0: "ok", 1: "ok"} and not list(a.iterdir())  # the token is removed
    else:
        assert all("rank(s) [1] do not see what rank 0 writes" in r for r in results.values())


def test_an_error_raised_in_a_data_loader_worker_is_still_one_line():
    from torch.utils.data import DataLoader, IterableDataset

    from rqgen.cli import one_line
    from rqgen.errors import DataError

    class Unreadable(IterableDataset):
        def __iter__(self):
            raise DataError("no readable image sample in the shards of --data x.tar")
            yield  # a generator

    with pytest.raises(DataError) as caught:  # torch adds the worker's traceback to it
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert one_line(caught.value) == "no readable image sample in the shards of --data x.tar"
    assert one_line(DataError("plain")) == "plain"
