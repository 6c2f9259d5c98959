"""Device selection (`--device auto|cpu|cuda|cuda:N`) and the process group, with CUDA mocked."""

from datetime import timedelta

import pytest
import torch

from rqgen import distributed as common
from rqgen.errors import DeviceError
from rqgen.utils.device import resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has `n` GPUs; set_device is recorded instead of run."""
    calls = []

    def with_gpus(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
        return calls

    return with_gpus


@pytest.fixture
def torchrun(monkeypatch):
    def env(world: int, local_rank: int):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("RANK", str(local_rank))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return env


def test_auto_is_cpu_without_cuda_and_the_local_gpu_with_it(gpus, torchrun):
    gpus(0)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    gpus(4)
    assert resolve_device("auto") == torch.device("cuda", 0)
    torchrun(4, 3)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")


def test_explicit_gpu_index_in_one_process_and_refused_under_torchrun(gpus, torchrun):
    gpus(2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="only 2 GPU"):
        resolve_device("cuda:2")
    torchrun(2, 1)
    with pytest.raises(DeviceError, match=r"names one GPU for all 2 processes: use --device cuda"):
        resolve_device("cuda:0")
    torchrun(8, 5)  # 8 processes on a 2-GPU node: LOCAL_RANK 5 has no GPU
    with pytest.raises(DeviceError, match="LOCAL_RANK 5 needs GPU 5"):
        resolve_device("cuda")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA"])
def test_cuda_on_a_machine_without_it_is_one_line(gpus, torchrun, name):
    gpus(0)
    with pytest.raises(DeviceError, match="no CUDA device") as e:
        resolve_device(name)
    assert "\n" not in str(e.value) and "--device cpu" in str(e.value)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu0", "cuda:-1"])
def test_unknown_device_names_are_refused(gpus, torchrun, name):
    gpus(1)
    with pytest.raises(DeviceError, match="is not one of auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_process_group_gets_the_backend_device_and_timeout(gpus, torchrun, monkeypatch):
    seen = {}

    def fake_init(backend, timeout=None, device_id=None):
        seen.update(backend=backend, timeout=timeout, device_id=device_id)

    monkeypatch.setattr(common.torch_dist, "init_process_group", fake_init)
    monkeypatch.setattr(common.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(common.torch_dist, "get_rank", lambda: 1)
    set_calls = gpus(2)
    torchrun(2, 1)
    rt = common.init_runtime("auto", timeout_s=90)
    assert rt.device == torch.device("cuda", 1) and rt.rank == 1 and rt.world_size == 2
    assert seen == {"backend": "nccl", "timeout": timedelta(seconds=90),
                    "device_id": torch.device("cuda", 1)}  # fmt: skip
    assert set_calls == [torch.device("cuda", 1)]
    assert torch.backends.cuda.matmul.allow_tf32  # TF32 on for CUDA runs
    torch.backends.cuda.matmul.allow_tf32 = False
    rt = common.init_runtime("cpu", timeout_s=30)
    assert rt.device == torch.device("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"] == timedelta(seconds=30)


def test_the_cli_refuses_cuda_here_in_one_line(gpus, torchrun, tmp_path, capsys):
    from rqgen.cli import main

    gpus(0)
    out = tmp_path / "vae"
    rc = main(["train-vae", "--data", "bundled:digits", "--out", str(out), "--steps", "1",
               "--device", "cuda"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no CUDA device" in err
    assert not out.exists()  # refused before anything was written
    rc = main(["sample", "--model", str(tmp_path), "--out", str(tmp_path / "s.png"),
               "--device", "cuda:1"])  # fmt: skip
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cores, ranks, asked, omp, expected",
    [
        (2, 1, -1, None, (0, 2)),  # a laptop: no workers, both cores compute
        (16, 1, -1, None, (4, 12)),  # a GPU box: a quarter of the cores decode
        (128, 8, -1, None, (4, 12)),  # 8 ranks share 128 cores: 16 each
        (64, 1, -1, None, (8, 56)),  # at most 8 workers
        (2, 2, -1, None, (0, 1)),  # 2 ranks on 2 cores: one thread each
        (2, 1, 2, None, (2, 1)),  # workers asked for: the threads make room
        (8, 1, -1, "3", (2, 3)),  # OMP_NUM_THREADS fixes the threads
    ],
)
def test_cpu_budget_never_oversubscribes(monkeypatch, cores, ranks, asked, omp, expected):
    import rqgen.utils.device as device

    monkeypatch.setattr(device, "available_cores", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    workers, threads = device.cpu_budget(asked, ranks)
    assert (workers, threads) == expected
    if omp is None and asked < 0:
        assert workers + threads <= max(cores // ranks, 1)


@pytest.mark.parametrize(
    "cores, ranks, expected",
    [
        (96, 8, (10, 2)),  # 8 GPUs on 96 cores: each rank's 12 cores decode but two
        (256, 8, (16, 16)),  # at most 16 decoders per GPU
        (4, 1, (2, 2)),
        (2, 1, (0, 2)),  # nothing to spare
    ],
)
def test_gpu_ranks_give_their_cores_to_the_loader(monkeypatch, cores, ranks, expected):
    import rqgen.utils.device as device

    monkeypatch.setattr(device, "available_cores", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    gpu = torch.device("cuda", 0)
    assert device.cpu_budget(-1, ranks, device=gpu) == expected
    assert device.cpu_budget(-1, ranks) != expected or cores < 4  # a CPU rank keeps its cores
