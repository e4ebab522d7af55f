"""Incremental detokenization: the text a sequence adds with each new token, and stop strings.

Decoding a token on its own loses what depends on its neighbours (a leading space, a multi-byte
character split across tokens), so each step decodes a short window of recent tokens and emits
only the difference; text that ends in an incomplete character waits for the next token.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5   # prompt tokens the first window starts with, for leading-space rules


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust decoder, called directly: transformers' decode() wraps it in
        # argument conversion that cost three times the decode itself (about 30 of 40 us a step).
        # With skip_special_tokens and no clean-up of spaces, the two give the same text.
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(
            tokenizer, "is_fast", False) else None
        self.window = list(prompt_ids[-_CONTEXT_TOKENS:])
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

    def add(self, token_id: int) -> bool:
        """Take one generated token; True when the text now contains a stop string (cut before it)."""
        self.window.append(token_id)
        before = self._decode(self.window[self.prefix_offset:self.read_offset])
        after = self._decode(self.window[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        delta = after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.window)
        # Keep the window short: the emitted prefix is never decoded again.
        if self.prefix_offset > 64:
            del self.window[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
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
