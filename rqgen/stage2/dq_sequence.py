"""DQ-Transformer's sequence format: a dual-granularity code map as coarse-then-fine tokens.

A DQ-VAE code map lives on the fine grid (2Hc × 2Hc); `fine_mask` (Hc × Hc) says which coarse
regions carry four fine codes (True) and which one coarse code (False; its four fine cells
then hold that same code). The sequence has three aligned streams:

    content   SOS c_1 .. c_Nc EOS  SOS f_1 .. f_4Nf EOS  PAD ..
    position  SOS p_1 .. p_Nc EOS  SOS q_1 .. q_4Nf EOS  PAD ..
    segment   0   0   ..  0   0    1   1   ..  1    1    1   ..

Coarse positions index the coarse grid (raster order); fine positions index the fine grid
(row-major), listed region by region (raster over regions, 2×2 raster inside each), as the
reference implementation's default "region-first" order. Position ids are per granularity
(the segment tells which vocabulary), each with its own PAD/EOS/SOS after the grid cells.
Length = Nc + 4·Nf + 4 before padding. `from_sequence` is the exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rqgen.errors import DataError


@dataclass(frozen=True)
class DQVocab:
    """Token ids of the three streams for K codes and a coarse grid of side `coarse_size`."""

    codebook_size: int  # K
    coarse_size: int  # Hc; the fine grid has side 2·Hc

    @property
    def n_coarse(self) -> int:
        return self.coarse_size**2

    @property
    def n_fine(self) -> int:
        return 4 * self.n_coarse

    # content: 0..K-1 codes, then PAD, EOS, SOS (class models replace SOS by class tokens)
    @property
    def content_pad(self) -> int:
        return self.codebook_size

    @property
    def content_eos(self) -> int:
        return self.codebook_size + 1

    @property
    def content_sos(self) -> int:
        return self.codebook_size + 2

    def position_pad(self, fine: bool) -> int:
        return self.n_fine if fine else self.n_coarse

    def position_eos(self, fine: bool) -> int:
        return self.position_pad(fine) + 1

    def position_sos(self, fine: bool) -> int:
        return self.position_pad(fine) + 2

    def fine_positions_of_region(self, region: int) -> list[int]:
        """The 4 fine-grid indices of coarse region `region`, in 2×2 raster order."""
        r, c = divmod(region, self.coarse_size)
        w = 2 * self.coarse_size
        top = 2 * r * w + 2 * c
        return [top, top + 1, top + w, top + w + 1]


@dataclass
class DQSequence:
    content: Tensor  # (B, L) long
    position: Tensor  # (B, L) long
    segment: Tensor  # (B, L) long, 0 coarse / 1 fine


def to_sequence(codes: Tensor, fine_mask: Tensor, vocab: DQVocab) -> DQSequence:
    """codes (B, 2Hc, 2Hc), fine_mask (B, Hc, Hc) bool -> padded streams (B, L)."""
    B, hc = fine_mask.shape[0], vocab.coarse_size
    if codes.shape[1:] != (2 * hc, 2 * hc) or fine_mask.shape[1:] != (hc, hc):
        raise DataError(
            f"codes {tuple(codes.shape)} / fine_mask {tuple(fine_mask.shape)} do not fit a "
            f"{hc}×{hc} coarse grid"
        )
    flat = codes.reshape(B, -1)
    rows = []
    for b in range(B):
        fine = fine_mask[b].reshape(-1).tolist()
        coarse_regions = [i for i, f in enumerate(fine) if not f]
        fine_cells = [p for i, f in enumerate(fine) if f for p in vocab.fine_positions_of_region(i)]
        c_codes = [int(flat[b, vocab.fine_positions_of_region(i)[0]]) for i in coarse_regions]
        f_codes = flat[b, fine_cells].tolist() if fine_cells else []
        content = [vocab.content_sos, *c_codes, vocab.content_eos] + [
            vocab.content_sos,
            *f_codes,
            vocab.content_eos,
        ]
        position = [vocab.position_sos(False), *coarse_regions, vocab.position_eos(False)] + [
            vocab.position_sos(True),
            *fine_cells,
            vocab.position_eos(True),
        ]
        segment = [0] * (len(c_codes) + 2) + [1] * (len(f_codes) + 2)
        rows.append((content, position, segment))
    L = max(len(r[0]) for r in rows)
    out = [torch.empty(B, L, dtype=torch.long) for _ in range(3)]
    pads = (vocab.content_pad, vocab.position_pad(True), 1)
    for b, streams in enumerate(rows):
        for t, stream, pad in zip(out, streams, pads):
            t[b, : len(stream)] = torch.tensor(stream)
            t[b, len(stream) :] = pad
    return DQSequence(*out)


def from_sequence(seq: DQSequence, vocab: DQVocab) -> tuple[Tensor, Tensor]:
    """The exact inverse of `to_sequence`: (codes (B, 2Hc, 2Hc), fine_mask (B, Hc, Hc)).

    Raises DataError when a sequence is not valid: a position used twice, a code id out of
    range, or a cell left uncovered."""
    B, hc = seq.content.shape[0], vocab.coarse_size
    codes = torch.full((B, vocab.n_fine), -1, dtype=torch.long)
    fine_mask = torch.ones(B, vocab.n_coarse, dtype=torch.bool)
    for b in range(B):
        content, position, segment = (
            s[b].tolist() for s in (seq.content, seq.position, seq.segment)
        )
        seen_regions: set[int] = set()
        for c, p, s in zip(content, position, segment):
            fine = s == 1
            if p >= vocab.position_pad(fine):  # PAD / EOS / SOS
                continue
            if not 0 <= c < vocab.codebook_size:
                raise DataError(f"sequence {b}: content id {c} at position {p} is not a code")
            if fine:
                region = _region_of_fine(p, hc)
                if codes[b, p] != -1:
                    raise DataError(f"sequence {b}: fine position {p} appears twice")
                if region in seen_regions and not fine_mask[b, region]:
                    raise DataError(f"sequence {b}: region {region} is both coarse and fine")
                seen_regions.add(region)
                codes[b, p] = c
            else:
                if p in seen_regions:
                    raise DataError(f"sequence {b}: coarse position {p} appears twice")
                seen_regions.add(p)
                fine_mask[b, p] = False
                for q in vocab.fine_positions_of_region(p):
                    codes[b, q] = c
        missing = (codes[b] == -1).nonzero()
        if len(missing):
            raise DataError(f"sequence {b}: fine cell {int(missing[0])} is not covered")
    return codes.view(B, 2 * hc, 2 * hc), fine_mask.view(B, hc, hc)


def _region_of_fine(p: int, hc: int) -> int:
    r, c = divmod(p, 2 * hc)
    return (r // 2) * hc + c // 2
