"""DQ sequence format: exact round trip, length formula, validation of broken sequences."""

import pytest
import torch

from rqgen.errors import DataError
from rqgen.stage2.dq_sequence import DQSequence, DQVocab, from_sequence, to_sequence


def random_map(B=5, hc=4, K=16, seed=0):
    """A DQ-VAE-like code map: coarse regions hold one code in all four fine cells."""
    g = torch.Generator().manual_seed(seed)
    fine_mask = torch.rand(B, hc, hc, generator=g) < 0.5
    fine_mask[0] = False  # all coarse
    fine_mask[-1] = True  # all fine (the same map when B = 1 is overridden by the caller)
    fine = torch.randint(K, (B, 2 * hc, 2 * hc), generator=g)
    coarse = (
        torch.randint(K, (B, hc, hc), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    )
    up = fine_mask.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return torch.where(up, fine, coarse), fine_mask


def test_round_trip_is_exact_and_lengths_follow_the_formula():
    vocab = DQVocab(codebook_size=16, coarse_size=4)
    codes, fine_mask = random_map()
    seq = to_sequence(codes, fine_mask, vocab)
    back, mask = from_sequence(seq, vocab)
    assert torch.equal(back, codes) and torch.equal(mask, fine_mask)
    n_fine = fine_mask.flatten(1).sum(1)
    lengths = (seq.content != vocab.content_pad).sum(1)
    assert torch.equal(lengths, (16 - n_fine) + 4 * n_fine + 4)  # Nc + 4·Nf + 4
    assert seq.content.shape[1] == int(lengths.max())


def test_layout_coarse_first_region_first_fine_order():
    vocab = DQVocab(codebook_size=16, coarse_size=2)
    fine_mask = torch.tensor([[[False, True], [False, False]]])
    codes = torch.arange(16).view(1, 4, 4) % 16
    coarse = torch.tensor([[7, 7, 0, 0], [7, 7, 0, 0], [9, 9, 5, 5], [9, 9, 5, 5]])
    codes = torch.where(fine_mask.repeat_interleave(2, 1).repeat_interleave(2, 2), codes, coarse)
    seq = to_sequence(codes, fine_mask, vocab)
    # coarse regions 0, 2, 3 (raster), then region 1's fine cells 2, 3, 6, 7 (2×2 raster)
    assert seq.position[0].tolist() == [6, 0, 2, 3, 5, 18, 2, 3, 6, 7, 17]
    assert seq.content[0].tolist() == [18, 7, 9, 5, 17, 18, 2, 3, 6, 7, 17]
    assert seq.segment[0].tolist() == [0] * 5 + [1] * 6


@pytest.mark.parametrize("breakage", ["repeat", "uncovered", "not a code", "coarse and fine"])
def test_invalid_sequences_are_refused(breakage):
    vocab = DQVocab(codebook_size=16, coarse_size=2)
    fine_mask = torch.tensor([[[False, True], [False, False]]])
    up = fine_mask.repeat_interleave(2, 1).repeat_interleave(2, 2)
    codes = torch.where(up, torch.arange(16).view(1, 4, 4), torch.full((1, 4, 4), 3))
    seq = to_sequence(codes, fine_mask, vocab)
    c, p = seq.content.clone(), seq.position.clone()
    if breakage == "repeat":
        p[0, 2] = p[0, 1]  # a coarse position twice
    elif breakage == "uncovered":
        c[0, -2], p[0, -2] = vocab.content_eos, vocab.position_eos(True)  # drop a fine cell
    elif breakage == "not a code":
        c[0, 1] = vocab.content_eos
    else:
        p[0, 6] = 0  # a fine cell inside coarse region 0
    with pytest.raises(DataError):
        from_sequence(DQSequence(c, p, seq.segment), vocab)


def test_wrong_shapes_are_refused():
    with pytest.raises(DataError, match="coarse grid"):
        to_sequence(torch.zeros(1, 6, 6, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.bool),
                    DQVocab(16, 4))  # fmt: skip
