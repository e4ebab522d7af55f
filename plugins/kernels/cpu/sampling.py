"""kernels.cpu's sampler: the reference's draws without its two costly steps on a CPU.

The reference sorts every filtered row whole (top-k / top-p) and draws an exponential variate
per token (the exponential race). On the 2-core test machine, for 16 rows of SmolLM2's 49152
tokens, the sort took 35 ms and the variates 19 ms, against about 40 ms for the decode step's
whole forward pass. Here:
- a filtered row's cut is found among its largest candidates (torch.topk), widened only for a
  top-p row whose candidates hold less than top_p of its mass; the row then draws among the
  candidates it keeps;
- a row draws one uniform variate and takes its token by inverse CDF, a float64 cumulative sum of
  the kept tokens' probabilities.
What is kept follows the reference's rule (top-p on the top-k distribution renormalised over k
tokens), with the GPU samplers' one difference: every token tied at the cut stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.kernels import SamplingMetadata

# Candidates a top-p row starts with; each widening takes 4 times as many.
FIRST_CANDIDATES = 256


@dataclass
class Candidates:
    """Each filtered row's largest tokens, widest first, with what its cut keeps of them."""

    values: torch.Tensor   # [R, W] float32 logit / temperature, descending; -inf where not kept
    ids: torch.Tensor      # [R, W] int64 token ids
    cuts: torch.Tensor     # [R] float32, the smallest value kept


def _filtered_rows(meta: SamplingMetadata, vocab: int) -> tuple[list[int], list[int], list[float]]:
    """(rows, their top_k (0 = off), their top_p) of the sampled rows that filter."""
    top_k = [k if 0 < k < vocab else 0 for k in meta.top_k.tolist()]
    top_p = meta.top_p.tolist()
    rows = [i for i, t in enumerate(meta.temperatures.tolist()) if t > 0 and (top_k[i] or top_p[i] < 1)]
    return rows, [top_k[i] for i in rows], [top_p[i] for i in rows]


def _candidates(logits: torch.Tensor, temperatures: torch.Tensor, top_k: list[int],
                top_p: list[float]) -> Candidates:
    """logits: [R, V] of filtered rows, temperatures [R] > 0."""
    vocab = logits.shape[1]
    k = torch.tensor(top_k)
    p = torch.tensor(top_p)
    whole_row_lse = None
    # One more than the largest top_k: a cut on the last candidate would leave the tokens tied
    # with it unseen.
    width = min(vocab, max(FIRST_CANDIDATES, max(top_k) + 1))
    while True:
        # A positive temperature keeps the order: the largest logits are the largest scaled ones.
        scaled, ids = logits.topk(width, dim=-1)                                 # [R, W], descending
        scaled = scaled / temperatures[:, None]
        ranks = torch.arange(width)[None, :]
        values = scaled.masked_fill((k[:, None] > 0) & (ranks >= k[:, None]), float("-inf"))
        # Top-k rows renormalise over their k tokens, which the candidates hold; others over the
        # whole row.
        if whole_row_lse is None and not all(top_k):
            whole_row_lse = (logits / temperatures[:, None]).logsumexp(dim=-1)
        lse = values.logsumexp(dim=-1)
        if whole_row_lse is not None:
            lse = torch.where(k > 0, lse, whole_row_lse)
        probs = (values - lse[:, None]).exp()
        # A top-p row without top-k whose candidates weigh less than top_p may keep more of them.
        short = (k == 0) & (probs.sum(dim=-1) < p)
        if width == vocab or not short.any():
            break
        width = min(vocab, width * 4)
    kept = ((probs.cumsum(dim=-1) - probs) < p[:, None]) & (values > float("-inf"))
    # The most likely token always stays, and so do the tokens tied with the last one kept (past
    # top_k's rank too).
    cuts = values.gather(1, (kept.sum(dim=-1).clamp(min=1) - 1)[:, None])
    return Candidates(scaled.masked_fill(scaled < cuts, float("-inf")), ids, cuts.squeeze(1))


def top_k_top_p_cuts(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logits: [S, V] -> [S] float32: each row's cut, the smallest logit / temperature it keeps;
    -inf for a row without a filter and for a greedy row."""
    cuts = torch.full((logits.shape[0],), float("-inf"))
    rows, top_k, top_p = _filtered_rows(meta, logits.shape[1])
    if rows:
        cuts[rows] = _candidates(logits[rows], meta.temperatures[rows], top_k, top_p).cuts
    return cuts


def _inverse_cdf(values: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """values: [R, N] logits / temperature (-inf: never drawn), uniforms [R] in [0, 1) -> [R]
    indices, each drawn with probability softmax(values)."""
    cdf = torch.cumsum(values.softmax(dim=-1), dim=-1, dtype=torch.float64)
    # The first index whose cumulative mass passes u * total: never one of mass 0.
    drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
    # u * total rounds up to the total about once in 2^53 draws: then the most likely index.
    return torch.where(drawn < values.shape[1], drawn, values.argmax(dim=-1))


def sample(logits: torch.Tensor, meta: SamplingMetadata,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [S, V] float32 -> [S] int64."""
    if meta.all_greedy:
        return logits.argmax(dim=-1)
    rows, vocab = logits.shape
    # One variate per row; a seeded request's from its own generator, so it does not depend on
    # the rest of the batch.
    uniforms = torch.rand(rows, dtype=torch.float64, generator=generator)
    for row, gen in enumerate(meta.generators):
        if gen is not None:
            uniforms[row] = torch.rand((), dtype=torch.float64, generator=gen)
    temperatures = meta.temperatures.tolist()
    tokens = torch.empty(rows, dtype=torch.int64)
    greedy = [i for i in range(rows) if temperatures[i] == 0]
    if greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    filtered, top_k, top_p = _filtered_rows(meta, vocab)
    plain = sorted(set(range(rows)) - set(greedy) - set(filtered))
    if filtered:
        kept = _candidates(logits[filtered], meta.temperatures[filtered], top_k, top_p)
        if kept.values.shape[1] == vocab or not kept.values[:, -1].gt(float("-inf")).any():
            tokens[filtered] = kept.ids.gather(1, _inverse_cdf(kept.values, uniforms[filtered])[:, None]).squeeze(1)
        else:
            # The cut reaches the last candidate, so tokens tied with it may lie beyond them.
            scaled = logits[filtered] / meta.temperatures[filtered, None]
            scaled = scaled.masked_fill(scaled < kept.cuts[:, None], float("-inf"))
            tokens[filtered] = _inverse_cdf(scaled, uniforms[filtered])
    if plain:
        tokens[plain] = _inverse_cdf(logits[plain] / meta.temperatures[plain, None], uniforms[plain])
    return tokens
