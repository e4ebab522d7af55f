"""RequestIntake: a client's request made into a sequence's tokens, checked against the model.

What it needs is the tokenizer and a few facts of the model (its vocabulary, its longest
sequence, its end-of-sequence tokens), not the model itself: the Engine is one, and so is the
serving process's view of an engine that runs in a process of its own
(`fastgen.engine_process.EngineFront`), which checks requests before they cross to it.
"""

from __future__ import annotations

import itertools

from .errors import RequestError
from .request import SamplingParams, Sequence


class RequestIntake:
    """Tokenizes and checks requests (safe from any thread: it reads only facts set at start).

    A subclass calls `__init__` and sets `tokenizer`, `hf_config`, `max_model_len` and
    `eos_token_ids`."""

    tokenizer: object
    hf_config: object
    max_model_len: int
    eos_token_ids: set[int]

    def __init__(self) -> None:
        self._request_ids = itertools.count()   # next() is atomic: callers in several threads

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        vocab = self.hf_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"Prompt token ids must be integers in [0, {vocab}); got {bad[:3]}.",
                               param="prompt")
        return list(prompt)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, once the request is known to fit the model (RequestError if not)."""
        params.check_vocab(self.hf_config.vocab_size)
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise RequestError("The prompt is empty; give at least one token.", param="prompt")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(f"The prompt has {len(token_ids)} tokens; this engine serves at most "
                               f"{self.max_model_len - 1} prompt tokens (max_model_len "
                               f"{self.max_model_len}). Shorten the prompt.", param="prompt")
        return token_ids

    def next_request_id(self) -> str:
        return f"req-{next(self._request_ids)}"

    def new_sequence(self, token_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> Sequence:
        """A sequence of checked token ids (`check_request`)."""
        if request_id is None:
            request_id = self.next_request_id()
        return Sequence(request_id, token_ids, params.for_vocab(self.hf_config.vocab_size),
                        frozenset(self.eos_token_ids))

    def make_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        """Check and tokenize a request without touching engine state."""
        params = params or SamplingParams()
        return self.new_sequence(self.check_request(prompt, params), params, request_id)
