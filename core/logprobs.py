"""Log-probabilities of generated and prompt tokens, for the requests that ask for them.

They are the model's own distribution (log-softmax of the raw logits), before temperature,
penalties, min-p, top-k or top-p: what a scorer or an evaluation harness wants, and what
OpenAI-compatible servers return.

A token's log-probability is its logit minus its row's logsumexp: no [N, V] log-softmax is
made, and a request that wants only the sampled tokens' sum (best_of) costs one reduction per row.

Prompt log-probabilities need logits at prompt positions, which a step does not otherwise
compute: `extend_for_prompt_logprobs` appends those positions to the batch's `logits_indices`
after the sampling rows, so the model returns them with the rest in one forward pass.
"""

from __future__ import annotations

import torch

from .ragged_batch import RaggedBatch
from .request import Sequence, TokenLogprob


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: list[int]) -> list[TokenLogprob]:
    """logits: [N, V] raw rows; the log-probability of token_ids[i] in row i, with the top[i]
    most likely tokens of that row."""
    ids = torch.tensor(token_ids, dtype=torch.int64, device=logits.device)
    norm = logits.logsumexp(dim=-1, keepdim=True)                                   # [N, 1]
    chosen = (logits.gather(1, ids[:, None]) - norm)[:, 0].tolist()
    k = max(top, default=0)
    if k:
        values, indices = logits.topk(k, dim=-1)
        values, indices = (values - norm).tolist(), indices.tolist()
    return [TokenLogprob(token_ids[i], chosen[i],
                         list(zip(indices[i][:n], values[i][:n])) if n else [])
            for i, n in enumerate(top)]


class SampledLogprobs:
    """The logits rows of the sequences that record their sampled tokens' log-probabilities,
    copied before processing and sampling: the model's own distribution, safe from a backend
    that samples in place."""

    def __init__(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """logits: [S, V], one row per sampling sequence."""
        self.seqs = seqs
        self.rows = [i for i, s in enumerate(seqs) if s.params.records_logprobs]
        self.logits = logits[self.rows] if self.rows else None                     # [W, V]

    def record(self, next_tokens: list[int]) -> None:
        """next_tokens: [S], the tokens sampled for every row."""
        if not self.rows:
            return
        entries = token_logprobs(self.logits, [next_tokens[i] for i in self.rows],
                                 [self.seqs[i].params.logprobs or 0 for i in self.rows])
        for i, entry in zip(self.rows, entries):
            seq = self.seqs[i]
            if seq.is_finished:   # stopped before this step's token was read: the token is dropped
                continue
            seq.cumulative_logprob += entry.logprob
            if seq.params.logprobs is not None:
                seq.logprobs.append(entry)


class PromptLogprobPlan:
    """Which extra logits rows of a step score which prompt tokens of which sequence."""

    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.counts: list[int] = []        # rows per sequence, in order
        self.targets: list[int] = []       # the prompt token each row scores

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def record(self, logits: torch.Tensor) -> None:
        """logits: [R, V] float32, the extra rows in plan order."""
        top = [s.params.prompt_logprobs for s, n in zip(self.seqs, self.counts) for _ in range(n)]
        entries = token_logprobs(logits, self.targets, top)
        start = 0
        for seq, n in zip(self.seqs, self.counts):
            seq.prompt_logprobs += entries[start:start + n]
            start += n


def extend_for_prompt_logprobs(batch: RaggedBatch) -> PromptLogprobPlan:
    """Append to batch.logits_indices the prompt positions whose log-probabilities are wanted
    and not yet recorded (a preempted sequence recomputes its prompt but records it once).

    The logits at position p score token p + 1, so a chunk of positions [c, c + n) scores prompt
    tokens up to c + n, and the prompt's last position (which predicts the first generated
    token) scores none.
    """
    plan = PromptLogprobPlan()
    flat: list[int] = []
    start = 0
    for seq, n, ctx in zip(batch.sequences, batch.query_lens, batch.context_lens):
        if seq.params.prompt_logprobs is not None:
            first = max(ctx, len(seq.prompt_logprobs))
            last = min(ctx + n, seq.prompt_len - 1)
            if first < last:
                plan.seqs.append(seq)
                plan.counts.append(last - first)
                plan.targets += seq.token_ids[first + 1:last + 1]
                flat += range(start + first - ctx, start + last - ctx)
        start += n
    if plan:
        extra = torch.tensor(flat, dtype=batch.logits_indices.dtype, device=batch.logits_indices.device)
        batch.logits_indices = torch.cat([batch.logits_indices, extra])
    return plan
