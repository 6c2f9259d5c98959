"""Dynamic depth in stage 2: an RQ-Transformer whose stacks end at a stop code."""

import itertools

import pytest
import torch
from test_rq_transformer import make
from test_speculative import chi_square

from rqgen.errors import ConfigError
from rqgen.stage2.guidance import SamplingConfig, processed_logits
from rqgen.stage2.sampling import guided_cond, sample_codes
from rqgen.stage2.speculative import sample_codes_speculative

K, D = 3, 3  # stop = K


def stacks() -> list[list[int]]:
    """Every stack a stop-code model can emit: 1..D codes, then stops."""
    return [
        [*s] + [K] * (D - n) for n in range(1, D + 1) for s in itertools.product(range(K), repeat=n)
    ]


def ended(codes: torch.Tensor) -> torch.Tensor:
    """Slots after a stack's stop code (forced, not drawn)."""
    return torch.nn.functional.pad((codes == K).cumsum(-1)[..., :-1], (1, 0)) > 0


def exact(m, maps: torch.Tensor, sampling: SamplingConfig, label: int) -> torch.Tensor:
    """p(map) of the given maps from teacher-forced logits, processed as the samplers do."""
    cond = guided_cond(m, torch.full((len(maps),), label), sampling)
    with torch.no_grad():
        logits, _ = m(maps.repeat(cond.shape[0] // len(maps), 1, 1), cond)
        logp = torch.stack(
            [processed_logits(logits[:, :, d], d, sampling, len(maps)) for d in range(D)], 2
        ).log_softmax(-1)
    lp = logp.gather(-1, maps[..., None])[..., 0]
    return (lp * ~ended(maps)).sum((1, 2)).exp()


def test_stop_code_samples_follow_the_models_distribution():
    """2 positions, stacks of 1-3 codes of K = 3: all 39² maps enumerable. Their teacher-forced
    probabilities sum to 1 (no mass on a stop before the first code); cached and uncached
    samples are the same maps for one seed, valid stacks only, and fit the distribution (χ²)
    with guidance, temperature and top-k; samples at another temperature do not."""
    m = make(num_classes=2, K=K, shape=(1, 2, D), stop_code=True)
    with torch.no_grad():
        m.classifier[1].weight.mul_(20)
    per = torch.tensor(stacks())
    maps = torch.stack(torch.meshgrid(torch.arange(len(per)), torch.arange(len(per)),
                                      indexing="ij"), -1).reshape(-1, 2)  # fmt: skip
    maps = per[maps]  # (39², 2, D)
    sampling = SamplingConfig(temperature=0.9, top_k=[3, 3, 2], guidance_scale=1.5)
    p = exact(m, maps, SamplingConfig(), 1)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    p = exact(m, maps, sampling, 1)
    cond = torch.ones(4000, dtype=torch.long)
    codes = sample_codes(m, cond, sampling, torch.Generator().manual_seed(0)).view(-1, 2, D)
    again = sample_codes(m, cond[:300], sampling, torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(
        again, sample_codes(m, cond[:300], sampling, torch.Generator().manual_seed(5))
    )
    assert not (codes[..., 0] == K).any() and (codes[ended(codes)] == K).all()
    index = {tuple(s.flatten().tolist()): i for i, s in enumerate(maps)}
    flat = torch.tensor([index[tuple(s.flatten().tolist())] for s in codes])
    chi, dof = chi_square(flat[:, None], p, len(p))
    assert chi < dof + 4 * (2 * dof) ** 0.5, (chi, dof)
    hot = SamplingConfig(temperature=1.4, top_k=[3, 3, 2], guidance_scale=1.5)
    other = sample_codes(m, cond, hot, torch.Generator().manual_seed(0)).view(-1, 2, D)
    flat = torch.tensor([index[tuple(s.flatten().tolist())] for s in other])
    wrong, dof = chi_square(flat[:, None], p, len(p))
    assert wrong > 3 * (dof + 4 * (2 * dof) ** 0.5)


def test_stop_code_loss_counts_each_stack_up_to_its_end():
    """The NLL averages over the drawn slots only (codes, and each stack's stop): the forced
    slots after it change nothing; one-hot soft targets give the hard loss."""
    m = make(K=K, shape=(2, 2, D), stop_code=True, num_classes=0)
    codes = torch.tensor([[[0, K, K], [1, 2, 0], [2, 1, K], [1, K, K]]])
    cond = torch.zeros(1, dtype=torch.long)
    logits, _ = m(codes, cond)
    lp = logits.log_softmax(-1).gather(-1, codes[..., None])[..., 0]
    drawn = ~ended(codes)
    want = -(lp[drawn]).sum() / drawn.sum()
    loss, _ = m.loss_from_logits(logits, None, codes, cond)
    torch.testing.assert_close(loss, want)
    noisy = torch.where(ended(codes)[..., None], torch.randn_like(logits) * 9, logits)
    torch.testing.assert_close(m.loss_from_logits(noisy, None, codes, cond)[0], want)
    soft = torch.nn.functional.one_hot(codes.clamp(max=K - 1), K).float()  # stops: any target
    torch.testing.assert_close(m.loss_from_logits(logits, None, codes, cond, soft)[0], want)


def test_stop_code_embeddings_and_refusals():
    """A stop slot adds a zero code vector (Ẑ stops growing) and its own learned input, so
    the spatial transformer sees each stack's depth; speculative sampling is refused."""
    m = make(K=K, shape=(1, 2, D), stop_code=True, num_classes=0)
    short, full = torch.tensor([[1, K, K]]), torch.tensor([[1, 1, 1]])
    assert m.code_vectors(short)[0, 1:].abs().sum() == 0
    before = (m.code_inputs(short), m.code_inputs(full))
    with torch.no_grad():
        m.stop_emb.normal_()
    assert not torch.allclose(m.code_inputs(short), before[0])
    torch.testing.assert_close(m.code_inputs(full), before[1])  # a full stack has no stop
    with pytest.raises(ConfigError, match="without --speculative"):
        sample_codes_speculative(m, torch.tensor([0]), SamplingConfig(speculative=2))
