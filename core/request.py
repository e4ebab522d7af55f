"""Requests as users give them, and sequences as the engine runs them."""

from __future__ import annotations

import enum
import hashlib
import itertools
import time
from array import array

import msgspec
import numpy as np

from .errors import RequestError

# The sampler divides by temperatures in float32: a larger one would be inf (and sample as much
# at random as any temperature past a few hundred already does).
MAX_TEMPERATURE = float(np.finfo(np.float32).max)

MAX_LOGPROBS = 20   # most alternatives a request may ask for per token (OpenAI's top_logprobs cap)
MAX_LOGIT_BIAS = 100.0   # OpenAI's range for a logit_bias value: [-100, 100]


class SamplingParams(msgspec.Struct, kw_only=True):
    """How one request picks its tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0       # 0 means greedy
    top_k: int = 0                 # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None        # per-request seed: the same seed gives the same tokens
    stop: list[str] = []           # generation ends before the first of these strings
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_p: float = 0.0             # drop tokens less likely than min_p times the most likely one
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0 # subtracted once per time a token was already generated
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of tokens
                                     # seen in the prompt or the output; 1 is off
    logprobs: int | None = None    # return each generated token's log-probability and this many
                                   # most likely alternatives (0: the chosen token's only)
    prompt_logprobs: int | None = None   # the same for every prompt token after the first
    logit_bias: dict[int, float] = {}    # token id -> added to its logit before sampling, in
                                         # [-100, 100]; keys may be decimal strings (JSON's way)
    cumulative_logprob: bool = False     # sum the chosen tokens' log-probabilities into
                                         # RequestOutput.cumulative_logprob (best_of ranks by it)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.logit_bias = _token_biases(self.logit_bias)
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}.", param="max_tokens")
        if not self.temperature >= 0:  # also refuses NaN
            raise RequestError(f"temperature must be 0 or more, got {self.temperature}.", param="temperature")
        if self.temperature > MAX_TEMPERATURE:
            raise RequestError(f"temperature must be at most {MAX_TEMPERATURE:.4g} (the sampler's "
                               f"float32), got {self.temperature}.", param="temperature")
        if self.top_k < 0:
            raise RequestError(f"top_k must be 0 (off) or more, got {self.top_k}.", param="top_k")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}.", param="top_p")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError(f"seed must be in [0, 2**63), got {self.seed}.", param="seed")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty.", param="stop")
        bad = [t for t in self.stop_token_ids if not _is_token_id(t)]
        if bad:
            raise RequestError(f"stop_token_ids must be token ids (integers of 0 or more), got "
                               f"{bad[:3]}.", param="stop_token_ids")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}.", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}.", param=name)
        if not 0 < self.repetition_penalty <= 10:
            raise RequestError(f"repetition_penalty must be in (0, 10], got "
                               f"{self.repetition_penalty}.", param="repetition_penalty")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise RequestError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}.",
                                   param=name)

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids the model does not have (only the model knows its vocabulary size)."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            outside = sorted({t for t in ids if t >= vocab_size})
            if outside:
                raise RequestError(f"{name} has token ids outside this model's vocabulary "
                                   f"[0, {vocab_size}): {outside[:3]}.", param=name)

    def for_vocab(self, vocab_size: int) -> "SamplingParams":
        """These params as a model of `vocab_size` tokens samples them: a top_k of the vocabulary
        or more keeps every token, the same as no cut, and becomes 0, which spares the sampler a
        top_k that does not fit its int64 tensors (a client may send any integer). A copy when it
        changes, so the caller's params, perhaps reused on another model, stay as given."""
        if self.top_k < vocab_size:
            return self
        return msgspec.structs.replace(self, top_k=0)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def records_logprobs(self) -> bool:
        """Whether each sampled token's log-probability is recorded (for logprobs or the sum)."""
        return self.logprobs is not None or self.cumulative_logprob

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_biases(biases: object) -> dict[int, float]:
    """logit_bias with int keys, checked: JSON objects have string keys, so "50256" means 50256."""
    if not isinstance(biases, dict):
        raise RequestError(f"logit_bias must be an object mapping token ids to biases, got "
                           f"{type(biases).__name__}.", param="logit_bias")
    checked = {}
    for key, value in biases.items():
        if isinstance(key, str) and key.isascii() and key.isdecimal():
            token = int(key)
        elif _is_token_id(key):
            token = key
        else:
            raise RequestError(f"logit_bias keys must be token ids (integers of 0 or more), got "
                               f"{key!r}.", param="logit_bias")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):   # also refuses NaN
            raise RequestError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, "
                               f"{MAX_LOGIT_BIAS:g}], got {value!r} for token {key!r}.",
                               param="logit_bias")
        checked[token] = float(value)
    return checked


class FinishReason(str, enum.Enum):
    STOP = "stop"        # an end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"    # max_tokens or the model's context length
    ABORT = "abort"      # the client went away or the engine shut down


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One request's generation state: its tokens, how many have KV in the cache, its blocks.

    `token_ids` is the prompt followed by the generated tokens. The first `num_computed` of them
    have their keys and values in the blocks of `block_ids`; the rest are pending and are what a
    step computes. A preempted sequence drops its blocks and sets `num_computed` to 0: it is
    recomputed from its tokens later, prompt and generated alike.
    """

    __slots__ = ("request_id", "token_ids", "prompt_token_ids", "prompt_len", "params",
                 "num_computed", "num_awaiting", "_block_ids", "_block_array", "_block_array_len",
                 "status", "finish_reason", "arrival_time", "first_scheduled_time",
                 "first_token_time", "seq_index", "generator", "stop_text_len", "eos_token_ids",
                 "num_preemptions", "logprobs", "prompt_logprobs", "cumulative_logprob",
                 "delta_outputs", "num_sent", "_block_keys", "num_cached_blocks",
                 "num_cached_prompt_tokens", "num_found_cached", "waits_for_prefix")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset()) -> None:
        if not prompt_token_ids:
            raise RequestError("The prompt is empty; give at least one token.", param="prompt")
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        # The prompt alone, one list that every output of the request shares (not a copy per step:
        # a long prompt's copy cost microseconds per sequence and step).
        self.prompt_token_ids = list(prompt_token_ids)
        self.prompt_len = len(prompt_token_ids)
        self.params = params
        self.num_computed = 0
        # Tokens sampled on the device and not yet read back (with `overlap_steps`, a step is
        # scheduled while the last one's tokens are still on their way): counted as pending, so
        # the next step computes them, and appended to token_ids once read.
        self.num_awaiting = 0
        self._block_ids: list[int] = []
        self._block_array: np.ndarray | None = None   # block_array()'s int32 copy, with room to grow
        self._block_array_len = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None   # the first step that computed any of it
        self.first_token_time: float | None = None
        self.seq_index = next(_ids)  # admission order for fair, deterministic scheduling
        self.generator = None        # torch.Generator, made by the sampler when a seed is given
        self.stop_text_len: int | None = None
        self.eos_token_ids = eos_token_ids
        self.num_preemptions = 0
        self.logprobs: list[TokenLogprob] = []          # one per generated token, when asked for
        self.prompt_logprobs: list[TokenLogprob] = []   # one per prompt token after the first
        self.cumulative_logprob = 0.0   # of the generated tokens, when logprobs are recorded
        # Outputs of a running request carry only what is new (see RequestOutput); the engine's
        # count of generated tokens handed out in outputs so far.
        self.delta_outputs = False
        self.num_sent = 0
        self._block_keys: list[bytes] = []   # block_keys()' keys, of whole blocks from the first
        self.num_cached_blocks = 0   # leading blocks the engine has put in the prefix cache
        # Prompt tokens its first admission found in the prefix cache, not computed (a preempted
        # sequence's later admissions find its own blocks: those do not count).
        self.num_cached_prompt_tokens = 0
        # While waiting: its leading tokens the prefix cache holds, as the engine found them
        # before the step's plan; admitted, it computes only the tokens after them, so schedulers
        # plan those (`num_pending - num_found_cached`) and fill the step's budget with other work.
        self.num_found_cached = 0
        # While waiting: its next block after them is one that a sequence ahead of it computes
        # now, so schedulers admit it later, when it is cached (the engine sets it with
        # num_found_cached).
        self.waits_for_prefix = False

    @property
    def block_ids(self) -> list[int]:
        """The sequence's cache blocks, in order. It grows in place (`+=`, `append`) as tokens
        need room; to free or change blocks, assign a new list (the engine assigns `[]`)."""
        return self._block_ids

    @block_ids.setter
    def block_ids(self, ids: list[int]) -> None:
        if ids is not self._block_ids:     # `+=` sets the same list back: the copy still holds
            self._block_array = None
        self._block_ids = ids

    def block_array(self) -> np.ndarray:
        """`block_ids` as int32, kept from step to step so that a step converts only the blocks
        added since the last (a long sequence's whole list cost the batch build ~12 ns a block,
        every step: 3 ms for 256 sequences of 8192 tokens, on a 2-core CPU)."""
        ids, array, done = self._block_ids, self._block_array, self._block_array_len
        if array is None or len(ids) < done:
            array, done = np.empty(max(16, 2 * len(ids)), np.int32), 0
        elif len(ids) > len(array):
            array = np.concatenate([array[:done], np.empty(2 * len(ids) - done, np.int32)])
        if len(ids) > done:
            array[done:len(ids)] = ids[done:]
        self._block_array, self._block_array_len = array, len(ids)
        return array[:len(ids)]

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) + self.num_awaiting - self.num_computed

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def block_keys(self, num_blocks: int, block_size: int) -> list[bytes]:
        """Prefix-cache keys of the first `num_blocks` whole blocks of token_ids: each a digest
        of the block's tokens and the key before it, so equal keys mean equal prefixes. Kept,
        so a sequence hashes each block once."""
        keys = self._block_keys
        for i in range(len(keys), num_blocks):
            tokens = array("q", self.token_ids[i * block_size:(i + 1) * block_size]).tobytes()
            keys.append(hashlib.blake2b((keys[-1] if keys else b"") + tokens, digest_size=16).digest())
        return keys[:num_blocks]

    def blocks_needed(self, num_new: int, block_size: int) -> int:
        """Blocks to add so that `num_new` more tokens fit after the computed ones."""
        total = -(-(self.num_computed + num_new) // block_size)
        return max(0, total - len(self.block_ids))

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={len(self.token_ids)}, "
                f"computed={self.num_computed}, blocks={len(self.block_ids)}, {self.status.value})")


class TokenLogprob(msgspec.Struct):
    """A token's log-probability under the model, and the most likely tokens at its position
    (`top`: (token id, log-probability) pairs, most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class RequestMetrics(msgspec.Struct, kw_only=True):
    """When a request reached each stage, in `time.monotonic()` seconds, and how often it was
    preempted. A time is None when the request was aborted before that stage."""

    arrival_time: float                    # when it was made into a Sequence (tokenized, validated)
    first_scheduled_time: float | None     # the first step that computed any of its tokens
    first_token_time: float | None         # when its first token was sampled
    finished_time: float
    num_preemptions: int = 0


class RequestOutput(msgspec.Struct, kw_only=True):
    """What a request has produced so far; `finished` is set on the last one, which also
    carries the request's `metrics`.

    The `new_` fields hold what was added since the request's previous output. The whole fields
    (`token_ids`, `text`, `logprobs`) copy everything so far, a cost that grows with the request's
    length every step; a request made with delta outputs (`AsyncEngine.generate(...,
    delta_outputs=True)`, as the transports do) leaves them empty ([], "", None) until its
    finished output, which carries them whole."""

    request_id: str
    prompt_token_ids: list[int]    # one list, shared by every output of the request
    token_ids: list[int]           # the tokens generated so far, a copy per output
    text: str
    finished: bool = False
    finish_reason: str | None = None
    new_text: str = ""             # text added since the previous output for this request
    new_token_ids: list[int] = []  # tokens generated since the previous output for this request
    new_logprobs: list[TokenLogprob] | None = None      # theirs, when asked for
    metrics: RequestMetrics | None = None   # on the finished output only
    logprobs: list[TokenLogprob] | None = None          # [len(token_ids)], when asked for
    prompt_logprobs: list[TokenLogprob] | None = None   # [len(prompt) - 1], when asked for
    cumulative_logprob: float | None = None   # sum of `logprobs`' values, when either is asked for
    num_cached_tokens: int = 0    # prompt tokens found in the prefix cache, not computed

    def followed_by(self, later: "RequestOutput") -> "RequestOutput":
        """`later` carrying this output's new tokens, text and logprobs before its own: the one
        output that tells a reader what the two would have."""
        return msgspec.structs.replace(
            later, new_text=self.new_text + later.new_text,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_logprobs=None if later.new_logprobs is None else (self.new_logprobs or []) + later.new_logprobs)

    @property
    def usage(self) -> dict:
        """OpenAI's usage object, `prompt_tokens_details.cached_tokens` included."""
        return {"prompt_tokens": len(self.prompt_token_ids),
                "completion_tokens": len(self.token_ids),
                "total_tokens": len(self.prompt_token_ids) + len(self.token_ids),
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}
