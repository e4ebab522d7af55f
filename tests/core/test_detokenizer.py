"""IncrementalDetokenizer: the text it streams, token by token, with a byte-level BPE tokenizer
whose tokens split multi-byte characters."""

from __future__ import annotations

import random

import pytest

from fastgen.detokenizer import IncrementalDetokenizer

from tiny_models import make_tokenizer

TEXT = "Caf\u00e9 na\u00efve \u4f60\u597d \U0001f600 and the lazy dog."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


class TransformersDecode:
    """The tokenizer seen only through transformers' decode(), as for a slow tokenizer."""

    is_fast = False

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[tuple[bool, str]]:
    return [(detok.add(i), detok.take_new_text(finished=False)) for i in ids]


def test_streamed_pieces_add_up_to_the_text_without_a_broken_character(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.split()), "the tokenizer should split the words"
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Paris is", add_special_tokens=False), [])
    pieces = [piece for _, piece in stream(detok, ids)]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("seed", range(4))
def test_rust_decoder_streams_what_transformers_decode_streams(tokenizer, seed):
    """Random ids, special tokens and bytes that never form a character among them: the fast path
    (the tokenizers library's decoder) and transformers' decode() emit the same pieces."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 9))]
    ids = [rng.randrange(vocab) for _ in range(80)] + [tokenizer.eos_token_id, tokenizer.bos_token_id]
    stop = [tokenizer.decode(ids[40:42], skip_special_tokens=True)[:2] or "zz"]
    fast = IncrementalDetokenizer(tokenizer, prompt, stop)
    slow = IncrementalDetokenizer(TransformersDecode(tokenizer), prompt, stop)
    assert fast._backend is not None and slow._backend is None
    assert stream(fast, ids) == stream(slow, ids)
    assert fast.text == slow.text
