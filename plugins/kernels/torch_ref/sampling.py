"""Sampling: greedy, temperature, top-k and top-p over a batch of logits, with per-request seeds."""

from __future__ import annotations

import torch

from fastgen.kernels import SamplingMetadata


def top_k_top_p_filter(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logits: [S, V], already divided by temperature; cut tokens outside top-k / top-p to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if meta.any_top_k:
        k = torch.where(meta.top_k > 0, meta.top_k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if meta.any_top_p:
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass before it is under top_p: the most likely one always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= meta.top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, meta: SamplingMetadata,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [S, V] float32 -> [S] int64."""
    greedy = logits.argmax(dim=-1)
    if meta.all_greedy:
        return greedy
    temps = torch.where(meta.temperatures > 0, meta.temperatures, 1.0)
    scaled = logits / temps[:, None]
    if meta.any_top_k or meta.any_top_p:
        scaled = top_k_top_p_filter(scaled, meta)
    probs = scaled.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and lets each seeded row
    # draw its own noise from its own generator.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, gen in enumerate(meta.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(meta.temperatures > 0, sampled, greedy)
