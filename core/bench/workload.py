"""Benchmark workloads: random-token requests with normally distributed lengths, and presets.

A workload is the list of requests every scheduler is given, in the same order: the same seed
makes the same prompts and generation lengths, so schedulers differ only in how they serve them.
Prompts are random token ids (no special or added tokens) and requests are sent with
`ignore_eos`, so every request generates exactly its `max_tokens` and each scheduler does
identical work. Lengths follow DeepSpeed-FastGen's benchmark client: normal distributions around
the means with a standard deviation of 30% of the mean, rounded, then clipped to at least 1 and
to what the model accepts (prompt + generated <= max_model_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class WorkloadShape:
    """Mean prompt and generation lengths of one workload (tokens)."""

    prompt_mean: int
    gen_mean: int

    @property
    def name(self) -> str:
        return f"p{self.prompt_mean}g{self.gen_mean}"


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a workload, given the model's vocabulary and length limit."""

    shape: WorkloadShape
    num_requests: int
    seed: int = 0
    stdev_ratio: float = 0.3   # standard deviation as a share of the mean, for both lengths

    def __post_init__(self) -> None:
        if self.shape.prompt_mean < 1 or self.shape.gen_mean < 1:
            raise ConfigError(f"Mean prompt and generation lengths must be at least 1, got "
                              f"{self.shape.prompt_mean} and {self.shape.gen_mean}.")
        if self.num_requests < 1:
            raise ConfigError(f"A workload needs at least 1 request, got {self.num_requests}.")
        if self.stdev_ratio < 0:
            raise ConfigError(f"The length spread must be 0 or more, got {self.stdev_ratio}.")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its prompt token ids and how many tokens it must generate."""

    index: int
    prompt_token_ids: list[int]
    max_tokens: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Preset:
    """A named benchmark setup: workload shapes, request count, token budget, load and SLAs.

    `prompt_sla_rate` is the prompt SLA's tokens/s (first token within |prompt| / rate seconds);
    `gen_sla_rates` are the generation SLA's tokens/s thresholds (see fastgen.bench.metrics).
    """

    name: str
    shapes: tuple[WorkloadShape, ...]
    num_requests: int
    token_budget: int
    clients: tuple[int, ...]
    prompt_sla_rate: float
    gen_sla_rates: tuple[float, ...]
    description: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="paper",
        shapes=(WorkloadShape(2600, 60), WorkloadShape(1200, 128)),
        num_requests=512,
        token_budget=768,      # the paper's runs: DeepSpeed-MII max_ragged_batch_size 768
        clients=(1, 2, 4, 8, 16, 32),
        prompt_sla_rate=512.0,
        gen_sla_rates=(2.0, 4.0, 6.0),
        description="DeepSpeed-FastGen's effective-throughput setup (Llama-2 7B on one A100)",
    ),
    Preset(
        name="cpu",
        # The paper's lengths divided by 5 (2600/60 -> 520/12, 1200/128 -> 240/26): the same
        # prompt-to-generation ratios, and the 520-token prompt still spans the 512-token budget.
        shapes=(WorkloadShape(520, 12), WorkloadShape(240, 26)),
        num_requests=64,
        token_budget=512,
        clients=(1, 4, 16),
        # SLA rates scaled to a 2-core CPU running the 135M demo model in float32 (prefill about
        # 1,100 tokens/s, single-stream decode about 32 tokens/s; see docs/benchmarks.md).
        prompt_sla_rate=128.0,
        gen_sla_rates=(1.0, 2.0, 3.0),
        description="the paper's shapes scaled down for a CPU and the demo model",
    ),
)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"Unknown preset {name!r}; the presets are: {', '.join(PRESETS)}.") from None


def allowed_token_ids(tokenizer, vocab_size: int) -> np.ndarray:
    """Token ids a random prompt may use: in the tokenizer and the model, and not special."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    limit = min(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
    allowed = np.array([t for t in range(limit) if t not in special], dtype=np.int64)
    if not len(allowed):
        raise ConfigError("The tokenizer has no ordinary tokens to build random prompts from.")
    return allowed


def sample_lengths(mean: int, stdev_ratio: float, n: int, rng: np.random.Generator,
                   low: int, high: int) -> np.ndarray:
    """n lengths from Normal(mean, stdev_ratio * mean), rounded and clipped to [low, high]."""
    draws = rng.normal(mean, stdev_ratio * mean, size=n)
    return np.clip(np.rint(draws), low, high).astype(np.int64)


def make_workload(spec: WorkloadSpec, allowed_ids: np.ndarray,
                  max_model_len: int) -> list[BenchRequest]:
    """The requests of `spec`; the same spec, ids and length limit always give the same list.

    Prompts are clipped to max_model_len - 1 tokens and generation to the room the prompt leaves,
    so every request can generate all its tokens.
    """
    if max_model_len < 2:
        raise ConfigError(f"max_model_len must be at least 2 to benchmark, got {max_model_len}.")
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    prompt_lens = sample_lengths(spec.shape.prompt_mean, spec.stdev_ratio, n, rng, 1, max_model_len - 1)
    gen_lens = sample_lengths(spec.shape.gen_mean, spec.stdev_ratio, n, rng, 1, max_model_len - 1)
    gen_lens = np.minimum(gen_lens, max_model_len - prompt_lens)
    requests = []
    for i in range(n):
        prompt = allowed_ids[rng.integers(0, len(allowed_ids), size=int(prompt_lens[i]))]
        requests.append(BenchRequest(i, prompt.tolist(), int(gen_lens[i])))
    return requests


def checkpoint_vocabulary(folder) -> tuple[np.ndarray, int]:
    """(token ids a random prompt may use, longest sequence) of a checkpoint folder, read with
    transformers: for targets that have no fastgen engine to ask (a server URL, a peer)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder).get_text_config()
    return (allowed_token_ids(tokenizer, config.vocab_size),
            int(getattr(config, "max_position_embeddings", None) or 2048))
