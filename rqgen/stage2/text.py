"""Captions -> BPE token ids (huggingface `tokenizers`), trained on the dataset's captions and
saved next to the model as `tokenizer.json`. At most `length` tokens (paper: 32), padded with
the `[PAD]` token (id 0 in tokenizers trained here; the official vocabulary appends it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import (
    CharBPETokenizer,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from rqgen.errors import CheckpointError

PAD, UNK = "[PAD]", "[UNK]"
FILE = "tokenizer.json"


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, length: int = 32):
        self.tok, self.length = tokenizer, length

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, length: int = 32) -> TextTokenizer:
        tok = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, UNK],
            end_of_word_suffix="</w>",
            show_progress=False,
        )
        tok.train_from_iterator(list(captions), trainer)
        return cls(tok, length)

    @classmethod
    def from_official(
        cls, vocab: str | Path, merges: str | Path, length: int = 32
    ) -> TextTokenizer:
        """The official release's BPE (`bpe-16k-vocab.json`, `bpe-16k-merges.txt`): a
        lowercasing character-level BPE, with `[PAD]` appended as the official code does."""

        for f in (vocab, merges):
            if not Path(f).is_file():
                raise CheckpointError(f"BPE file '{f}' not found (from the official release)")
        wrapper = CharBPETokenizer.from_file(str(vocab), str(merges), unk_token=UNK, lowercase=True)
        wrapper.add_special_tokens([PAD])
        return cls(wrapper._tokenizer, length)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def pad_id(self) -> int:
        pad = self.tok.token_to_id(PAD)
        return 0 if pad is None else pad

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B, length) ids, padded with [PAD]; longer captions are cut with one warning."""
        out = torch.full((len(texts), self.length), self.pad_id, dtype=torch.long)
        cut = 0
        for i, enc in enumerate(self.tok.encode_batch(texts)):
            ids = enc.ids
            if len(ids) > self.length:
                cut += 1
                ids = ids[: self.length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if cut:
            warnings.warn(
                f"{cut} prompt(s) longer than {self.length} tokens were truncated", stacklevel=2
            )
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [
            self.tok.decode([i for i in row.tolist() if i != self.pad_id])
            for row in ids.reshape(-1, self.length)
        ]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        self.tok.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path, length: int = 32) -> TextTokenizer:
        path = Path(directory) / FILE
        if not path.is_file():
            raise CheckpointError(f"text model in '{directory}' has no {FILE}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(
                f"{path} is not a tokenizer file rqgen can read ({first}); "
                "the checkpoint is corrupt"
            ) from e
        return cls(tok, length)
