"""RaggedBatch: one step's flattened inputs and the metadata every kernel backend reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .request import Sequence


@dataclass
class RaggedBatch:
    """The new tokens of every scheduled sequence, flattened, sequences with one new token first.

    T = new tokens in the step, B = sequences, S = sequences that sample this step.
    """

    input_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64, each token's position in its sequence
    query_start_loc: torch.Tensor  # [B+1] int32, where each sequence's new tokens start
    seq_lens: torch.Tensor         # [B] int32, context length after this step (cached + new)
    block_tables: torch.Tensor     # [B, max_blocks] int32, KV block ids, padded with 0
    slot_mapping: torch.Tensor     # [T] int64, KV slot (block * block_size + offset) per new token
    logits_indices: torch.Tensor   # [S] int64, flat index of the last token of each sampling sequence
    # Host-side copies, so backends plan without reading the device.
    query_lens: list[int]          # [B]
    context_lens: list[int]        # [B], cached tokens before this step
    num_decodes: int               # the first num_decodes sequences have exactly one new token
    block_size: int
    sequences: list[Sequence]      # [B]
    sampling_seqs: list[Sequence]  # [S]
    attn_metadata: Any = None      # whatever the kernel backend's prepare() derived, once per step

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(cls, scheduled: list[tuple[Sequence, int]], block_size: int,
              device: torch.device) -> "RaggedBatch":
        """Flatten a plan's (sequence, new tokens) pairs; sequences must already hold their blocks."""
        # Decodes first, each group in plan order, so backends can treat them as one block.
        ordered = [p for p in scheduled if p[1] == 1] + [p for p in scheduled if p[1] != 1]
        seqs = [s for s, _ in ordered]
        query_lens = [n for _, n in ordered]
        context_lens = [s.num_computed for s in seqs]
        num_decodes = sum(1 for n in query_lens if n == 1)

        tokens: list[int] = []
        for seq, n in ordered:
            tokens += seq.token_ids[seq.num_computed:seq.num_computed + n]
        max_blocks = max(len(s.block_ids) for s in seqs)
        table = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs]

        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        ctx = torch.tensor(context_lens, dtype=torch.int64)
        qsl = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        torch.cumsum(q_lens, 0, out=qsl[1:])
        total = int(qsl[-1])
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)   # [T]
        positions = torch.arange(total) - qsl[:-1][seq_of_token] + ctx[seq_of_token]
        block_tables = torch.tensor(table, dtype=torch.int32)
        slot_mapping = (block_tables[seq_of_token, positions // block_size].to(torch.int64)
                        * block_size + positions % block_size)
        # A sequence samples when this step computes its last pending token.
        samples = [i for i, (s, n) in enumerate(ordered) if s.num_computed + n == len(s.token_ids)]
        logits_indices = qsl[1:][samples] - 1

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True) if device.type != "cpu" else t

        return cls(
            input_ids=dev(torch.tensor(tokens, dtype=torch.int64)),
            positions=dev(positions),
            query_start_loc=dev(qsl.to(torch.int32)),
            seq_lens=dev((ctx + q_lens).to(torch.int32)),
            block_tables=dev(block_tables),
            slot_mapping=dev(slot_mapping),
            logits_indices=dev(logits_indices),
            query_lens=query_lens,
            context_lens=context_lens,
            num_decodes=num_decodes,
            block_size=block_size,
            sequences=seqs,
            sampling_seqs=[seqs[i] for i in samples],
        )
