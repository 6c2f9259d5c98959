"""Speculative Jacobi decoding: the model's distribution exactly, in fewer spatial passes."""

import itertools

import pytest
import torch
from test_rq_transformer import make

from rqgen.errors import ConfigError
from rqgen.stage2.guidance import PerSampleSeeds, SamplingConfig, processed_logits
from rqgen.stage2.sampling import guided_cond, sample_codes
from rqgen.stage2.speculative import sample_codes_speculative, window_logits


def exact_distribution(m, sampling: SamplingConfig, label: int) -> torch.Tensor:
    """p(code map) of every one of the K^(T·D) maps, from teacher-forced logits processed as
    the samplers process them (guidance, temperature, top-k)."""
    c = m.config
    maps = torch.tensor(list(itertools.product(range(c.codebook_size), repeat=c.T * c.D)))
    maps = maps.view(-1, c.T, c.D)
    cond = guided_cond(m, torch.full((len(maps),), label), sampling)
    with torch.no_grad():
        logits, _ = m(maps.repeat(cond.shape[0] // len(maps), 1, 1), cond)
        logp = torch.stack(
            [processed_logits(logits[:, :, d], d, sampling, len(maps)) for d in range(c.D)], 2
        ).log_softmax(-1)
    return logp.gather(-1, maps[..., None])[..., 0].sum((1, 2)).exp()


def chi_square(codes: torch.Tensor, exact: torch.Tensor, K: int) -> tuple[float, int]:
    flat = codes.reshape(len(codes), -1)
    index = (flat * K ** torch.arange(flat.shape[1] - 1, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=len(exact)).float()
    expected = exact * len(codes)
    big = expected > 5
    return float(((counts - expected)[big] ** 2 / expected[big]).sum()), int(big.sum()) - 1


def test_speculative_samples_follow_the_models_distribution():
    """2 positions × 2 depths × K = 3: all 81 code maps enumerable. With guidance,
    temperature and top-k, speculative samples fit the exact distribution (χ², fixed seed) as
    plain samples do, and a sampler at another temperature does not."""
    m = make(num_classes=2, K=3, shape=(1, 2, 2))
    with torch.no_grad():
        m.classifier[1].weight.mul_(40)  # a peaked model: drafts are both kept and rejected
    sampling = SamplingConfig(temperature=0.9, top_k=[3, 2], guidance_scale=1.5)
    exact = exact_distribution(m, sampling, 1)
    cond = torch.ones(3000, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for N in (1, 2):
        spec = SamplingConfig(temperature=0.9, top_k=[3, 2], guidance_scale=1.5, speculative=N)
        codes, stats = sample_codes_speculative(m, cond, spec, g)
        chi, dof = chi_square(codes, exact, 3)
        assert chi < dof + 4 * (2 * dof) ** 0.5, (N, chi, dof)
    plain, dof = chi_square(sample_codes(m, cond, sampling, g), exact, 3)
    assert plain < dof + 4 * (2 * dof) ** 0.5
    hot = SamplingConfig(temperature=1.3, top_k=[3, 2], guidance_scale=1.5, speculative=2)
    wrong, dof = chi_square(sample_codes_speculative(m, cond, hot, g)[0], exact, 3)
    assert wrong > 3 * (dof + 4 * (2 * dof) ** 0.5)  # the test can tell distributions apart


def test_window_logits_equal_the_teacher_forced_forward():
    """Rows at different positions in one cached pass get the logits of a full forward."""
    m = make(shape=(3, 3, 3))
    c = m.config
    codes = torch.randint(0, c.codebook_size, (3, c.T + 3, c.D))
    cond = torch.tensor([0, 1, 3])
    full, _ = m(codes[:, : c.T], cond)
    start = m.cond_tokens(cond)
    cache = m.spatial_transformer.new_static_cache(3, c.cond_length + c.T + 3)
    with torch.no_grad():
        window_logits(m, cache, codes, torch.zeros(3, dtype=torch.long), start[:, -1], c.T)
        done = torch.tensor([0, 2, 6])
        logits, _ = window_logits(m, cache, codes, done, start[:, -1], 3)
    for b, t in enumerate(done.tolist()):
        torch.testing.assert_close(logits[b], full[b, t : t + 3], atol=1e-5, rtol=1e-4)


def test_each_sample_is_its_own_whatever_the_batch_and_fewer_passes_are_taken():
    m = make(shape=(4, 4, 2))
    spec = SamplingConfig(top_k=8, speculative=4)
    cond = torch.tensor([0, 1, 2])
    both, _ = sample_codes_speculative(m, cond, spec, PerSampleSeeds([11, 12, 13]))
    alone, one = sample_codes_speculative(m, cond[1:2], spec, PerSampleSeeds([12]))
    assert torch.equal(both[1:2], alone)
    assert one.spatial_passes < m.config.T  # drafts were kept: fewer passes than positions


def test_speculative_is_refused_where_it_cannot_run():
    m = make()
    with pytest.raises(ConfigError, match="drop --compile"):
        sample_codes_speculative(m, torch.tensor([0]), SamplingConfig(compile=True, speculative=2))
