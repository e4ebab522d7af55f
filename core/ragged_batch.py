"""RaggedBatch: one step's flattened inputs and the metadata every kernel backend reads."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .request import Sequence
from .staging import staging_buffer, to_device

AWAITED_TOKEN = -1   # an input token not yet read back from the device; never a valid id


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
    awaited_rows: list[int] = field(default_factory=list)   # decodes whose input is AWAITED_TOKEN
    # A CUDA graph's batch (core/step_graphs.py): sizes padded to the graph's, and plans padded to
    # the most those sizes need (query_tiles.step_tiles), so every step it replays has their shape.
    graph_padded: bool = False

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(cls, scheduled: list[tuple[Sequence, int]], block_size: int,
              device: torch.device) -> "RaggedBatch":
        """Flatten a plan's (sequence, new tokens) pairs; sequences must already hold their blocks.

        The metadata is worked out on the host with numpy and packed into two buffers, int64 and
        int32, each copied to the device in one transfer (from pinned memory on a GPU); the
        batch's tensors are views of them. A step's host cost is what a small model's decode waits
        for: one torch op per field cost 0.35 ms a step on a 2-core CPU, and a GPU pays a copy per
        tensor besides."""
        # Decodes first, each group in plan order, so backends can treat them as one block.
        ordered = [p for p in scheduled if p[1] == 1]
        num_decodes = len(ordered)
        if num_decodes < len(scheduled):
            ordered += [p for p in scheduled if p[1] != 1]
        seqs = [s for s, _ in ordered]
        query_lens = [n for _, n in ordered]
        context_lens = [s.num_computed for s in seqs]
        num_seqs, num_tokens = len(seqs), sum(query_lens)
        # A sequence samples when this step computes its last pending token (Sequence.num_pending,
        # written out: a property call per sequence cost a tenth of a decode step's build).
        samples = [i for i, (s, n) in enumerate(ordered)
                   if n == len(s.token_ids) + s.num_awaiting - s.num_computed]
        block_lists = [s.block_ids for s in seqs]
        max_blocks = max(map(len, block_lists))

        # int64: input_ids [T] | positions [T] | slot_mapping [T] | logits_indices [S]
        host64 = staging_buffer(3 * num_tokens + len(samples), torch.int64, device)
        longs = host64.numpy()
        input_ids, positions, slots = (longs[i * num_tokens:(i + 1) * num_tokens] for i in range(3))
        decodes = seqs[:num_decodes]
        # Decodes one value each, as Python ints: one numpy call per field, not per sequence.
        # A decode whose input token is still on the device (Sequence.num_awaiting) gets
        # AWAITED_TOKEN, which the engine replaces on the device before the forward pass.
        input_ids[:num_decodes] = [AWAITED_TOKEN if s.num_awaiting else s.token_ids[s.num_computed]
                                   for s in decodes]
        awaited_rows = [i for i, s in enumerate(decodes) if s.num_awaiting]
        positions[:num_decodes] = context_lens[:num_decodes]
        slots[:num_decodes] = [blocks[c // block_size] * block_size + c % block_size
                               for blocks, c in zip(block_lists, context_lens[:num_decodes])]
        start = num_decodes
        for seq, n in ordered[num_decodes:]:
            chunk = slice(start, start + n)
            first = seq.num_computed
            input_ids[chunk] = seq.token_ids[first:first + n]
            pos = positions[chunk]
            pos[:] = np.arange(first, first + n)
            blocks = np.asarray(seq.block_ids[first // block_size:(first + n - 1) // block_size + 1])
            slots[chunk] = blocks[pos // block_size - first // block_size] * block_size + pos % block_size
            start += n
        ends = list(itertools.accumulate(query_lens))
        longs[3 * num_tokens:] = [ends[i] - 1 for i in samples]

        # int32: query_start_loc [B+1] | seq_lens [B] | block_tables [B, max_blocks], padded with 0
        host32 = staging_buffer(2 * num_seqs + 1 + num_seqs * max_blocks, torch.int32, device)
        ints = host32.numpy()
        ints[0] = 0
        ints[1:num_seqs + 1] = ends
        ints[num_seqs + 1:2 * num_seqs + 1] = [c + n for c, n in zip(context_lens, query_lens)]
        table = ints[2 * num_seqs + 1:].reshape(num_seqs, max_blocks)
        table.fill(0)
        for row, seq in zip(table, seqs):
            blocks = seq.block_array()
            row[:len(blocks)] = blocks

        dev64, dev32 = to_device(host64, device), to_device(host32, device)
        input_ids, positions, slots, logits_indices = dev64.split(
            [num_tokens, num_tokens, num_tokens, len(samples)])
        query_start_loc, seq_lens, table = dev32.split([num_seqs + 1, num_seqs, num_seqs * max_blocks])
        return cls(
            input_ids=input_ids, positions=positions, slot_mapping=slots,
            logits_indices=logits_indices, query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_tables=table.view(num_seqs, max_blocks),
            query_lens=query_lens,
            context_lens=context_lens,
            num_decodes=num_decodes,
            block_size=block_size,
            sequences=seqs,
            sampling_seqs=[seqs[i] for i in samples],
            awaited_rows=awaited_rows,
        )
