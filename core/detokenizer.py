"""Incremental detokenization: the text a sequence adds with each new token, and stop strings.

Decoding a token on its own loses what depends on its neighbours (a leading space, a multi-byte
character split across tokens), so each step decodes a short window of recent tokens and emits
only the difference; text that ends in an incomplete character waits for the next token. With a
fast tokenizer the tokenizers library's DecodeStream does the same in Rust.
"""

from __future__ import annotations

import logging

try:
    from tokenizers.decoders import DecodeStream
except ImportError:   # tokenizers before 0.21
    DecodeStream = None

log = logging.getLogger(__name__)

_CONTEXT_TOKENS = 5   # prompt tokens the first window starts with, for leading-space rules


def _decode_stream(backend, context: list[int]):
    """The tokenizers library's own incremental decoder over `backend`, past `context` (its text
    is not the stream's); None where the library has none (before tokenizers 0.21)."""
    if DecodeStream is None:
        return None
    stream = DecodeStream(skip_special_tokens=True)
    for token_id in context:
        stream.step(backend, token_id)
    return stream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust decoder, called directly: transformers' decode() wraps it in
        # argument conversion that cost three times the decode itself (about 30 of 40 us a step).
        # With skip_special_tokens and no clean-up of spaces, the two give the same text.
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(
            tokenizer, "is_fast", False) else None
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        # With a fast tokenizer, the tokenizers library's DecodeStream runs the window below in
        # Rust, one call a token: 1.5-1.9x the window's speed over 256 streams of SmolLM2's
        # tokens (docs/benchmarks.md), one of the host's larger per-sequence costs. Not after a
        # prompt that ends inside a character: the stream would give the prompt's broken bytes
        # to the first piece of the answer, where the window leaves them to the prompt.
        self._stream = None
        if self._backend is not None and not self._decode(context).endswith("\ufffd"):
            self._stream = _decode_stream(self._backend, context)
        self._held: list[int] = []   # tokens the stream took since it last gave text
        self.window = context
        self.prefix_offset = 0
        self.read_offset = len(self.window)
        self.text = ""
        self.emitted = 0          # characters of `text` handed out so far
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _new_text(self, token_id: int) -> str:
        """The text `token_id` adds; empty while it ends in an incomplete character."""
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception as e:   # the stream refused its own state: the window below goes on
                log.warning("tokenizers' DecodeStream failed (%s); this request's text is decoded "
                            "in Python from here on", e)
                self._stream = None
                # From the tokens whose text the stream had not given yet, this one included.
                self.window, self.prefix_offset, self.read_offset = self._held, 0, 0
            else:
                if piece is None:
                    self._held.append(token_id)
                    return ""
                self._held = []
                return piece
        self.window.append(token_id)
        before = self._decode(self.window[self.prefix_offset:self.read_offset])
        after = self._decode(self.window[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.window)
        # Keep the window short: the emitted prefix is never decoded again.
        if self.prefix_offset > 64:
            del self.window[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return after[len(before):]

    def add(self, token_id: int) -> bool:
        """Take one generated token; True when the text now contains a stop string (cut before it)."""
        delta = self._new_text(token_id)
        if not delta:
            return False
        search_from = max(0, len(self.text) - self._hold)
        self.text += delta
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at != -1:
                self.text = self.text[:at]
                return True
        return False

    def take_new_text(self, finished: bool) -> str:
        """Text not handed out yet; while running, a tail that may begin a stop string is held back."""
        end = len(self.text)
        if not finished and self.stop:
            for keep in range(min(self._hold, end), 0, -1):
                tail = self.text[end - keep:]
                if any(s.startswith(tail) for s in self.stop):
                    end -= keep
                    break
        new = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return new
