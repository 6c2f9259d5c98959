"""BPE text tokenizer: round trip, padding, truncation warning, save/load."""

import pytest

from rqgen.stage2.text import TextTokenizer

CAPTIONS = [
    "a handwritten digit zero",
    "a handwritten digit one",
    "a photo of a red rocket on the launch pad",
    "an astronaut in a white suit",
    "a cat with green eyes",
] * 4


def test_round_trip_and_padding(tmp_path):
    tok = TextTokenizer.train(CAPTIONS, vocab_size=120, length=12)
    ids = tok.encode(["A Cat with green eyes", "a rocket"])
    assert ids.shape == (2, 12) and (ids[1, 2:] == 0).all()
    assert tok.decode(ids) == ["a cat with green eyes", "a rocket"]
    tok.save(tmp_path)
    again = TextTokenizer.load(tmp_path, length=12)
    assert (again.encode(["a cat with green eyes"]) == ids[:1]).all()


def test_long_prompt_is_truncated_with_a_warning():
    tok = TextTokenizer.train(CAPTIONS, vocab_size=120, length=4)
    with pytest.warns(UserWarning, match="longer than 4 tokens were truncated"):
        ids = tok.encode(["a photo of a red rocket on the launch pad"])
    assert ids.shape == (1, 4) and (ids != 0).all()
