"""Ranks meeting correctly: decisions taken by rank 0, long work outside collectives, each
rank's random streams kept, and the shared-filesystem corner cases (2 gloo CPU ranks)."""

import errno
import os
import threading
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from rqgen.distributed import Runtime, from_rank0, gather_objects, meet_after
from rqgen.errors import ConfigError, RqgenError
from rqgen.train import output as train_output
from rqgen.train import state as train_state
from rqgen.train.features import deal_chunks
from rqgen.utils import files

CPU = torch.device("cpu")


def _on_two_ranks(fn, tmp_path, timeout_s: float = 20.0):
    """fn(rt, tmp_path) on 2 gloo ranks; each rank's return value or error message."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(fn, str(tmp_path), timeout_s, results), nprocs=2)
        return dict(results)


def _rank_main(rank, fn, tmp, timeout_s, results):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
    try:
        results[rank] = fn(Runtime(rank, 2, CPU), tmp)
    except RqgenError as e:
        results[rank] = f"error: {e}"
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ decisions by rank 0


def _meetings(rt, tmp):
    from pathlib import Path

    import torch.distributed as dist

    from rqgen.train.data import run_dataset

    # 1. rank 1 arrives after rank 0 has written the listing: it must still join rank 0's
    # decision, or every later collective pairs with the wrong one
    if rt.rank == 1:
        time.sleep(1.0)
    listed = len(run_dataset(f"{tmp}/photos", 16, 0, Path(tmp) / "out", rt))
    after = gather_objects(f"next collective from rank {rt.rank}", rt)

    # 2. long work on rank 0 (longer than the process group's timeout) is waited out
    def prepare():
        if rt.is_main:
            time.sleep(8.0)
        return rt.rank

    mine = meet_after(rt, prepare)
    told = from_rank0(rt, lambda: {"chunks": [[0, 2], [1]]})
    dist.barrier()  # a quick collective afterwards works

    # 3. rank 0's error reaches every rank
    try:
        from_rank0(rt, lambda: (_ for _ in ()).throw(ConfigError("rank 0 found a bad folder")))
    except RqgenError as e:
        return listed, after, mine, told, str(e)
    return listed, after, mine, told, None


def test_ranks_follow_rank_0s_decisions_and_wait_out_long_work(tmp_path):
    (tmp_path / "out").mkdir()
    for c in ("a", "b"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 9, 9)).save(tmp_path / "photos" / c / f"{i}.png")
    results = _on_two_ranks(_meetings, tmp_path, timeout_s=6.0)
    after = ["next collective from rank 0", "next collective from rank 1"]
    for rank in (0, 1):
        assert results[rank] == (6, after, rank, {"chunks": [[0, 2], [1]]},
                                 "rank 0 found a bad folder")  # fmt: skip


def test_missing_chunks_are_dealt_out_evenly():
    # an extraction interrupted after rank 0 of 2 finished its old share (c % 2 == 0)
    missing = [1, 3, 5, 7]
    shares = deal_chunks(missing, 2)
    assert shares == [[1, 5], [3, 7]]  # before: rank 1 encoded all four while rank 0 waited
    assert sorted(sum(deal_chunks(list(range(10)), 3), [])) == list(range(10))
    assert max(map(len, deal_chunks(list(range(10)), 3))) == 4


def test_single_process_meetings_just_run():
    rt = Runtime(0, 1, CPU)
    assert meet_after(rt, lambda: 3) == 3 and from_rank0(rt, lambda: [1]) == [1]
    with pytest.raises(ConfigError):
        meet_after(rt, lambda: (_ for _ in ()).throw(ConfigError("x")))


# ------------------------------------------------------------------ random streams


class _FakeCuda:
    """A stand-in for one GPU's generator: its state is a byte tensor, as torch's is."""

    def __init__(self):
        self.state = torch.tensor([1, 2, 3], dtype=torch.uint8)

    def get_rng_state(self, device=None):
        return self.state.clone()

    def set_rng_state(self, state, device=None):
        self.state = state.clone()


def test_the_cuda_generator_is_saved_and_restored(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    gpu = torch.device("cuda", 0)
    saved = train_state.rng_state(gpu)
    assert torch.equal(saved["cuda"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    fake.state = torch.tensor([9, 9], dtype=torch.uint8)  # dropout drew meanwhile
    train_state.set_rng_state(saved, gpu)
    assert torch.equal(fake.state, torch.tensor([1, 2, 3], dtype=torch.uint8))
    # each rank restores its own stream at the same world size
    ranks = [{"torch": torch.get_rng_state(), "cuda": torch.tensor([r], dtype=torch.uint8)}
             for r in range(2)]  # fmt: skip
    for r in range(2):
        train_state.restore_rng({"rng_ranks": ranks}, Runtime(r, 2, gpu), seed=0, step=5)
        assert fake.state.tolist() == [r]


def test_a_resume_at_another_world_size_gives_each_rank_its_own_stream():
    saved = {"rng_ranks": [train_state.rng_state(CPU)] * 2}  # written by 2 ranks
    draws = []
    for r in range(4):
        train_state.restore_rng(saved, Runtime(r, 4, CPU), seed=3, step=100)
        draws.append(torch.rand(4))
    assert len({tuple(d.tolist()) for d in draws}) == 4  # no two ranks share dropout masks
    train_state.restore_rng(saved, Runtime(2, 4, CPU), seed=3, step=100)
    assert torch.equal(torch.rand(4), draws[2])  # and the same stream on every rerun
    train_state.restore_rng(saved, Runtime(2, 4, CPU), seed=3, step=101)
    assert not torch.equal(torch.rand(4), draws[2])  # a later resume: fresh numbers


# ------------------------------------------------------------------ filesystems


def test_no_flock_on_the_filesystem_is_not_another_run(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = files.RunLock(tmp_path)
    assert "cannot be locked" in str(caught[0].message)
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    lock.release()


def test_a_token_that_appears_late_is_still_seen(tmp_path):
    path = tmp_path / ".rank0-token"
    threading.Timer(0.4, lambda: path.write_text("abc")).start()  # an NFS client's late view
    assert not path.exists()
    assert train_output.sees_token(path, "abc")
    assert not train_output.sees_token(tmp_path / "never", "abc", attempts=2, wait_s=0.01)


# ------------------------------------------------------------------ numerics


def test_the_codebook_search_runs_without_tf32(monkeypatch):
    from rqgen.quantize.residual import ResidualQuantizer

    seen = []
    addmm = torch.addmm

    def spy(*args, **kw):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return addmm(*args, **kw)

    q = ResidualQuantizer(codebook_size=16, dim=4, depth=2)
    monkeypatch.setattr(torch, "addmm", spy)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as rqgen sets it on a GPU
    try:
        q.quantize(torch.randn(2, 4, 4, 4))
        assert torch.backends.cuda.matmul.allow_tf32  # the rest of the program: as it was
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert seen and not any(seen)  # the search: full fp32


# ------------------------------------------------------------ the quantizer's statistics


def _quantizer_steps(rank: int | None) -> dict:
    """A shared codebook with depth scales trained 4 steps on 2 × 256 vectors: all of them
    on one process (rank None) or one rank's half; its state and codes for fresh vectors."""
    from rqgen.quantize.residual import ResidualQuantizer

    torch.manual_seed(0)
    q = ResidualQuantizer(16, 32, 4, depth_scale=True).train()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(512, 16, generator=g) * torch.linspace(0.1, 2.0, 16)
        q(x if rank is None else x[rank * 256 : (rank + 1) * 256])
    codes, _ = q.eval().quantize(torch.randn(256, 16, generator=g))
    return {**q.state_dict(), "codes": codes}


def _quantizer_on_rank(rt, tmp) -> dict:
    return _quantizer_steps(rt.rank)


def test_depth_scale_statistics_on_two_ranks_equal_one_process(tmp_path):
    """The residual norms behind the depth scales, the EMA sums and the restarts are
    collectives: 2 ranks holding half the batch each end with one process's quantizer."""
    one = _quantizer_steps(None)
    two = _on_two_ranks(_quantizer_on_rank, tmp_path)
    torch.testing.assert_close(two[0], two[1], rtol=0, atol=0)  # ranks agree exactly
    assert torch.equal(two[0].pop("codes"), one.pop("codes"))
    for k, v in one.items():
        torch.testing.assert_close(two[0][k], v, rtol=1e-5, atol=1e-6, msg=k)
