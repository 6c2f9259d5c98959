"""Sampling DQ-VAE code maps from a DQ-Transformer, with or without a KV cache.

Coarse part: at each step a coarse position is drawn among the cells after the last one
placed (training sequences list coarse cells in ascending raster order, so a position is
never repeated and the last cell can be placed) or EOS; then its content among the K codes,
or content EOS when the position was EOS, exactly as in training. Fine part: the positions
are then known (the four cells of every region not coded coarse, region by region), so only
their contents are drawn. Both transformers see every token, forced ones included, so their
caches hold exactly what a teacher-forced pass would compute.

Every step draws one position and one content uniform per row, forced or not, so the cached
and the uncached sampler consume the same random numbers and agree for the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rqgen.stage1.dqvae import pack_codes
from rqgen.stage2.dq_sequence import DQSequence, from_sequence
from rqgen.stage2.dq_transformer import DQTransformer
from rqgen.stage2.guidance import Draws, SamplingConfig, draw, guide, next_code

COARSE, COARSE_END, FINE, DONE = 0, 1, 2, 3


@torch.no_grad()
def sample_dq_codes(
    model: DQTransformer,
    cond: Tensor,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_sequence: bool = False,
) -> Tensor | tuple[Tensor, DQSequence]:
    """Packed code maps (B, 2Hc, 2Hc, 2) for class ids `cond` (B,) (the null class for an
    unconditional model); with `return_sequence`, also the sampled token streams."""
    sampling = sampling or SamplingConfig()
    sampling.check(1)  # one code per step, whatever its granularity
    model.eval()
    model.check_cond(cond)
    c, v = model.config, model.config.vocab
    dev, n = cond.device, cond.shape[0]
    guided = sampling.guidance_scale != 1.0
    cond_all = torch.cat([cond, torch.full_like(cond, model.null_class)]) if guided else cond
    reps = cond_all.shape[0] // n
    L = c.max_length
    generator = Draws.of(generator, 2 * L, dev)  # a position and a content draw per step
    seq = DQSequence(
        torch.full((n, L), v.content_pad, device=dev),
        torch.full((n, L), v.position_pad(True), device=dev),
        torch.ones(n, L, dtype=torch.long, device=dev),
    )
    seq.content[:, 0], seq.position[:, 0], seq.segment[:, 0] = (
        v.content_sos,
        v.position_sos(False),
        0,
    )
    phase = torch.full((n,), COARSE, device=dev)
    last = torch.full((n,), -1, device=dev)  # last coarse cell placed
    used = torch.zeros(n, v.n_coarse, dtype=torch.bool, device=dev)
    cells = torch.tensor([v.fine_positions_of_region(r) for r in range(v.n_coarse)], device=dev)
    fine_order = torch.zeros(n, v.n_fine, dtype=torch.long, device=dev)
    n_fine_cells = torch.zeros(n, dtype=torch.long, device=dev)
    k = torch.zeros(n, dtype=torch.long, device=dev)  # fine cells emitted so far
    cell_ids = torch.arange(v.n_coarse, device=dev)
    rows = torch.arange(n, device=dev)

    pos_cache = model.position_transformer.new_cache(len(cond_all), L) if use_cache else None
    con_cache = model.content_transformer.new_cache(len(cond_all), L) if use_cache else None
    for t in range(L - 1):
        if bool((phase == DONE).all()):
            break
        # ---- position transformer over token t
        if use_cache:
            x = model.token_inputs(_rows(seq, t, t + 1, reps), cond_all, start=t)
            h_all = model.position_transformer(x, pos_cache)
        else:
            h_all = model.position_transformer(
                model.token_inputs(_rows(seq, 0, t + 1, reps), cond_all)
            )
        h = h_all[:, -1]

        # ---- next position: drawn in the coarse phase, forced otherwise
        logits = guide(model.coarse_pos_head(h).float(), n, sampling.guidance_scale)
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[:, : v.n_coarse] = cell_ids[None] > last[:, None]  # ascending, never repeated
        allowed[:, v.position_eos(False)] = True
        logits = logits.masked_fill(~allowed, float("-inf")) / max(sampling.temperature, 1e-5)
        drawn = draw(logits, generator)
        fine_pos = fine_order[rows, k.clamp(max=v.n_fine - 1)]
        fine_pos = torch.where(k < n_fine_cells, fine_pos, v.position_eos(True))
        p_next = torch.where(phase == COARSE, drawn, v.position_pad(True))
        p_next = torch.where(phase == COARSE_END, v.position_sos(True), p_next)
        p_next = torch.where(phase == FINE, fine_pos, p_next)
        s_next = (phase != COARSE).long()
        seq.position[:, t + 1], seq.segment[:, t + 1] = p_next, s_next

        # ---- content transformer: h_t + E_pos(p_{t+1}) -> content of token t+1
        if use_cache:
            y = h[:, None] + model.position_embedding(
                p_next.repeat(reps)[:, None], s_next.repeat(reps)[:, None]
            )
            g = model.content_transformer(y, con_cache)[:, -1]
        else:
            nxt = _rows(seq, 1, t + 2, reps)
            y = h_all + model.position_embedding(nxt.position, nxt.segment)
            g = model.content_transformer(y)[:, -1]
        code = next_code(model.content_head(g)[:, : c.codebook_size], 0, sampling, n, generator)
        is_eos = (p_next == v.position_eos(False)) & (phase == COARSE)
        is_eos |= (p_next == v.position_eos(True)) & (phase == FINE)
        c_next = torch.where(is_eos, v.content_eos, code)
        c_next = torch.where(phase == COARSE_END, v.content_sos, c_next)
        c_next = torch.where(phase == DONE, v.content_pad, c_next)
        seq.content[:, t + 1] = c_next

        # ---- state update
        placed = (phase == COARSE) & ~is_eos
        used[rows[placed], p_next[placed]] = True
        last = torch.where(placed, p_next, last)
        for i in ((phase == COARSE) & is_eos).nonzero().flatten().tolist():
            order = cells[~used[i]].flatten()  # fine cells of the other regions, region-first
            fine_order[i, : len(order)] = order
            n_fine_cells[i] = len(order)
        k = k + ((phase == FINE) & ~is_eos).long()
        new = torch.where((phase == COARSE) & is_eos, COARSE_END, phase)
        new = torch.where(phase == COARSE_END, FINE, new)
        new = torch.where((phase == FINE) & is_eos, DONE, new)
        phase = new

    seq_cpu = DQSequence(seq.content.cpu(), seq.position.cpu(), seq.segment.cpu())
    codes, fine_mask = from_sequence(seq_cpu, v)
    packed = pack_codes(codes, fine_mask).to(dev)
    return (packed, seq_cpu) if return_sequence else packed


def _rows(seq: DQSequence, a: int, b: int, reps: int) -> DQSequence:
    """Tokens a..b-1 of every row, repeated for the CFG twins."""
    return DQSequence(
        *(s[:, a:b].repeat(reps, 1) for s in (seq.content, seq.position, seq.segment))
    )
