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


def byte_tokens(tokenizer, text: str) -> list[int]:
    """`text` as one token a byte: its multi-byte characters split across tokens."""
    pieces = "".join(tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False)))
    ids = tokenizer.convert_tokens_to_ids(list(pieces))
    assert len(ids) == len(text.encode()) and tokenizer.decode(ids) == text
    return ids


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


@pytest.mark.parametrize("seed", range(6))
def test_the_tokenizers_stream_gives_the_windows_pieces(tokenizer, seed):
    """After a prompt of whole characters a fast tokenizer streams through tokenizers'
    DecodeStream, in pieces equal to the Python window's, over random ids (bytes that never form a
    character, special tokens) as over text."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompt = tokenizer.encode(TEXT[:rng.randrange(1, len(TEXT))], add_special_tokens=False)
    ids = [rng.randrange(vocab) for _ in range(60)] + byte_tokens(tokenizer, TEXT)
    stop = ["zq"] if seed % 2 else []
    fast = IncrementalDetokenizer(tokenizer, prompt, stop)
    window = IncrementalDetokenizer(TransformersDecode(tokenizer), prompt, stop)
    assert fast._stream is not None
    assert stream(fast, ids) == stream(window, ids)
    assert fast.text == window.text


class FailingStream:
    """A DecodeStream that refuses its state at its `fail_at`-th token."""

    def __init__(self, stream, fail_at: int) -> None:
        self.stream, self.left = stream, fail_at

    def step(self, backend, token_id):
        self.left -= 1
        if self.left < 0:
            raise Exception("InvalidPrefix")
        return self.stream.step(backend, token_id)


def test_a_stream_that_fails_hands_its_tokens_to_the_window(tokenizer, caplog):
    """The step would fail every request in it: the request's text goes on decoding in Python
    from the tokens the stream held, so no character is lost, wherever it fails."""
    ids = byte_tokens(tokenizer, TEXT)
    for fail_at in range(len(ids)):
        detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Paris is", add_special_tokens=False), [])
        detok._stream = FailingStream(detok._stream, fail_at)
        pieces = [piece for _, piece in stream(detok, ids)]
        assert "".join(pieces) == TEXT, fail_at
        assert detok._stream is None
    assert "DecodeStream failed (InvalidPrefix)" in caplog.text
