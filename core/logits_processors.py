"""Logit bias, penalties and min-p: per-request changes to the logits before the backend samples.

They run in the core, in plain torch on the logits' device, so every kernel backend gets them
for free; a step where no sampling sequence asks for one costs nothing.

Semantics (those of vLLM and transformers, so results carry over), applied in this order:
- logit_bias {token: b}: b is added to the token's logit, in every row, greedy ones included
  (OpenAI's semantics: -100 bans a token and +100 forces it, whatever the temperature).
- repetition_penalty r over every token of the prompt and the output: a positive logit is
  divided by r, a negative one multiplied by r.
- presence_penalty p and frequency_penalty f over the output tokens only: a token generated c
  times loses f * c + p * (c > 0) from its logit.
- min_p m: with temperature T, a token is dropped when its probability is below m times the
  most likely token's, i.e. when logit < max logit + T * log(m). Greedy rows are left alone:
  the most likely token always survives.
"""

from __future__ import annotations

import math

import torch

from .request import Sequence


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [S, V] float32, one row per sampling sequence -> the processed logits [S, V]
    (a new tensor when any row is processed; `logits` itself is never changed)."""
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    if biased:
        logits = _apply_logit_bias(logits, [seqs[i] for i in biased], biased)
    penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
    if penalized:
        logits = _apply_penalties(logits, [seqs[i] for i in penalized], penalized)
    min_p_rows = [i for i, s in enumerate(seqs) if s.params.min_p > 0 and s.params.temperature > 0]
    if min_p_rows:
        logits = _apply_min_p(logits, [seqs[i] for i in min_p_rows], min_p_rows)
    return logits


def _row_token_index(token_lists: list[list[int]], device: torch.device,
                     rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs [N] each, for every token of every list: list r's tokens are
    in row rows[r] (default r), so one index_put covers them all."""
    lengths = torch.tensor([len(t) for t in token_lists])
    row_ids = torch.arange(len(token_lists)) if rows is None else torch.tensor(rows)
    row_index = torch.repeat_interleave(row_ids, lengths).to(device)
    tokens = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.int64, device=device)
    return row_index, tokens


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float32: how often each token occurs in each list."""
    counts = torch.zeros(len(token_lists), vocab, device=device)
    index = _row_token_index(token_lists, device)
    counts.index_put_(index, torch.ones(len(index[1]), device=device), accumulate=True)
    return counts


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
    index = _row_token_index([list(s.params.logit_bias) for s in seqs], logits.device, rows)
    biases = torch.tensor([b for s in seqs for b in s.params.logit_bias.values()],
                          dtype=logits.dtype, device=logits.device)
    return logits.index_put(index, biases, accumulate=True)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
    vocab, device = logits.shape[1], logits.device
    index = torch.tensor(rows, device=device)
    sub = logits.index_select(0, index)                                            # [R, V]
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=device)[:, None]
    if (rep != 1).any():
        seen = _token_counts([s.token_ids for s in seqs], vocab, device) > 0
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
    presence = torch.tensor([s.params.presence_penalty for s in seqs], device=device)[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs], device=device)[:, None]
    if (presence != 0).any() or (frequency != 0).any():
        counts = _token_counts([s.output_token_ids for s in seqs], vocab, device)
        sub = sub - frequency * counts - presence * (counts > 0)
    return logits.index_copy(0, index, sub)


def _apply_min_p(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
    device = logits.device
    index = torch.tensor(rows, device=device)
    sub = logits.index_select(0, index)                                            # [R, V]
    # T * log(m): the gap below the best logit at which a token's probability is m times the best's.
    gap = torch.tensor([s.params.temperature * math.log(s.params.min_p) for s in seqs],
                       device=device)[:, None]
    threshold = sub.max(dim=-1, keepdim=True).values + gap
    return logits.index_copy(0, index, sub.masked_fill(sub < threshold, float("-inf")))
