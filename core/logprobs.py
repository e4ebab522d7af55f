"""Log-probabilities of generated and prompt tokens, for the requests that ask for them.

They are the model's own distribution (log-softmax of the raw logits), before temperature,
penalties, min-p, top-k or top-p: what a scorer or an evaluation harness wants, and what
OpenAI-compatible servers return.

Prompt log-probabilities need logits at prompt positions, which a step does not otherwise
compute: `extend_for_prompt_logprobs` appends those positions to the batch's `logits_indices`
after the sampling rows, so the model returns them with the rest in one forward pass.
"""

from __future__ import annotations

import torch

from .ragged_batch import RaggedBatch
from .request import Sequence, TokenLogprob


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], top: list[int]) -> list[TokenLogprob]:
    """logprobs: [N, V] log-softmaxed rows; the entry of token_ids[i] in row i, with the top[i]
    most likely tokens of that row."""
    ids = torch.tensor(token_ids, dtype=torch.int64, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    k = max(top, default=0)
    if k:
        values, indices = logprobs.topk(k, dim=-1)
        values, indices = values.tolist(), indices.tolist()
    return [TokenLogprob(token_ids[i], chosen[i],
                         list(zip(indices[i][:n], values[i][:n])) if n else [])
            for i, n in enumerate(top)]


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
        entries = token_logprobs(logits.log_softmax(dim=-1), self.targets, top)
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
