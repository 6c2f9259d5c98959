"""The GPU paths on a real CUDA device. Skipped where torch sees none (CI, this project's CPU
machines); on a GPU machine `pytest tests/test_cuda.py` runs them, and
benchmarks/results/gpu.md records the last such run. What the CPU suite cannot show:
training steps in bf16 / fp16 (with its gradient scaler) on the GPU, the samplers drawing on
the GPU what they draw on the CPU, and the compiled sampler (CUDA graphs) drawing what the
eager one draws, with no host synchronisation inside its loop."""

import copy
import math
import warnings

import pytest
import torch
from test_rq_transformer import make
from test_train_ar import AR_TINY
from test_train_vae import TINY, metrics, rqgen

from rqgen import RQVAE
from rqgen.quantize.residual import ResidualQuantizer
from rqgen.stage2.guidance import PerSampleSeeds, SamplingConfig
from rqgen.stage2.sampling import sample_codes

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: run tests/test_cuda.py on a GPU"
)


@pytest.fixture(autouse=True)
def exact_fp32():
    """Plain fp32 products: the CLI's runs switch TF32 on for the whole process, and TF32's
    10-bit mantissa would make GPU and CPU logits differ by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_stage1_trains_on_the_gpu_in_each_precision(tmp_path, precision):
    out = tmp_path / "vae"
    rqgen("train-vae", "--data", "bundled:digits", "--out", out, "--steps", 6, "--device",
          "cuda", *TINY, f"train.precision={precision}")  # fmt: skip
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    vae = RQVAE.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in vae.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_stage2_trains_and_samples_on_the_gpu(vae, tmp_path, precision):
    out = tmp_path / "ar"
    rqgen("train-ar", "--vae", vae, "--data", "bundled:digits", "--out", out, "--steps", 4,
          "--device", "cuda", *AR_TINY, f"train.precision={precision}")  # fmt: skip
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    grid = tmp_path / "samples.png"
    rqgen("sample", "--model", out, "--out", grid, "--n", 8, "--device", "cuda", "--dtype",
          precision)  # fmt: skip
    assert grid.stat().st_size > 0


def test_quantizer_finds_the_same_codes_on_the_gpu():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=16, codebook_size=64, depth=4).eval()
    z = torch.randn(4096, 16)
    with torch.no_grad():
        codes_cpu = q(z).codes
        codes_gpu = copy.deepcopy(q).cuda()(z.cuda()).codes
    # a tie between two codes may break either way under another summation order
    assert (codes_gpu.cpu() == codes_cpu).float().mean() > 0.999


SAMPLERS = [
    pytest.param(dict(shared_codebook=True, shape=(2, 3, 4)), id="shared"),
    pytest.param(dict(shared_codebook=False, shape=(2, 3, 4)), id="separate"),
    pytest.param(dict(num_classes=0, text_vocab_size=20, shape=(2, 2, 2)), id="text"),
]


def conditions(m, device):
    if m.config.text_vocab_size:
        return torch.randint(1, 20, (3, 5), generator=torch.Generator().manual_seed(0)).to(device)
    return torch.tensor([0, 1, 2], device=device)


@pytest.mark.parametrize("kw", SAMPLERS)
def test_gpu_sampler_draws_what_the_cpu_sampler_draws(kw):
    m = make(**kw)
    # per-sample seeds: the same uniforms on either device (generators differ per device)
    seeds = PerSampleSeeds([11, 12, 13])
    cfg = SamplingConfig(temperature=1.5, top_k=8, guidance_scale=2.0)
    cpu = sample_codes(m, conditions(m, "cpu"), cfg, seeds)
    gpu = sample_codes(m.cuda(), conditions(m, "cuda"), cfg, seeds)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("kw", SAMPLERS)
def test_compiled_sampler_replays_cuda_graphs_without_host_syncs(kw):
    from torch._dynamo.utils import counters

    m = make(**kw).cuda()
    cond = conditions(m, "cuda")
    eager = SamplingConfig(temperature=1.5, guidance_scale=2.0)
    compiled = SamplingConfig(temperature=1.5, guidance_scale=2.0, compile=True)
    ref = sample_codes(m, cond, eager, torch.Generator("cuda").manual_seed(3))
    counters.clear()
    first = sample_codes(m, cond, compiled, torch.Generator("cuda").manual_seed(3))
    torch.cuda.synchronize()
    # the second call only replays: count the synchronising calls (.item(), a copy to the
    # host, a data-dependent shape); the class-id check before the loop is the one allowed
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            again = sample_codes(m, cond, compiled, torch.Generator("cuda").manual_seed(3))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in syncs if "synchroniz" in str(w.message)]
    assert len(syncs) <= (1 if m.config.num_classes else 0), [str(w.message) for w in syncs]
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert torch.equal(first, ref) and torch.equal(again, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_on_the_gpu_stay_within_tolerance_of_fp32(dtype):
    # the tolerance of the CPU test of the same name (5% of the fp32 spread, TV 0.02)
    m = make(K=64, shape=(4, 4, 4), shared_codebook=False).cuda()
    codes = torch.randint(64, (3, 16, 4), generator=torch.Generator().manual_seed(0)).cuda()
    cond = torch.tensor([0, 1, 3], device="cuda")
    with torch.no_grad():
        ref, _ = m(codes, cond)
        low, _ = copy.deepcopy(m).to(dtype)(codes, cond)
    assert (low.float() - ref).abs().max() < 0.05 * ref.std()
    tv = 0.5 * (low.float().softmax(-1) - ref.softmax(-1)).abs().sum(-1)
    assert tv.max() < 0.02
