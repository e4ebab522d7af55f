"""Steps replayed from CUDA graphs.

On a GPU a small model's step is mostly kernel launches: a dozen ops per layer, each a few
microseconds of Python and driver work (tens for a Triton kernel) for a few microseconds of GPU
work. A CUDA graph records a step's launches once and replays them all with one call.

A graph replays the same launches on the same memory, with every host-side value baked in. So it
serves only steps that look alike to the host, padded to a few shapes, whose tensors are copied
into buffers the graph reads:

- decode steps (one new token per sequence), padded to one of a few batch sizes; the engine
  captures every size's graph for short contexts at start;
- steps with prompt chunks (SplitFuse's usual step), their tokens padded to a power of two or the
  largest size (`cuda_graph_max_tokens`, the token budget by default), their sequences to
  max_num_seqs + 2; the engine captures every size's graph at start too, from a stand-in step of
  short prompt chunks on the scratch block.

The kernel backend says what else its attention plan baked in through `graph_key` (kernels.triton
and kernels.cuda: the split-KV count; with prompt chunks, the number of attention tiles, which a
padded batch makes the most its sizes allow, core/kernels.py), and which of the plan's own tensors
a replay must refill (`graph_inputs`: the tile lists). A graph is captured for each (shape, key)
and replayed by every later step with the same pair.

Padding writes into a scratch KV block which the block allocator never hands out, so it can read
and write without touching any real sequence's cache. A decode step's padding rows are sequences
of one token; a mixed step's padding tokens are one sequence after the step's (the sink, whose
keys wrap around the scratch block), and its last sequence has no tokens: the padding tiles point
at it and end at once. Padding logits are computed and dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from .ragged_batch import RaggedBatch

log = logging.getLogger(__name__)

# Padded batch sizes: every size up to 8 rounds to a power of two, larger ones to a multiple of 8.
_SMALL_SIZES = (1, 2, 4, 8)
_SIZE_STEP = 8

# capture(fn) -> (replay, output): record fn's work, return what replays it and the tensor that
# holds fn's result after each replay.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def padded_size(num_seqs: int) -> int:
    """The batch size a decode step of `num_seqs` sequences is padded to."""
    for size in _SMALL_SIZES:
        if num_seqs <= size:
            return size
    return -(-num_seqs // _SIZE_STEP) * _SIZE_STEP


class CudaGraphCapture:
    """Captures with torch.cuda.CUDAGraph; every graph allocates from one shared memory pool."""

    def __init__(self) -> None:
        self.pool = None

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"CUDA graphs need a CUDA device, and the engine runs on {device.type}"
        return None

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # One run outside the capture, on a side stream as torch asks: Triton compiles its kernels
        # and cuBLAS sets up its workspaces here, neither of which a capture may do.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a transport's thread may touch CUDA meanwhile (a seeded request makes its
        # generator); only this thread's calls must keep off the capturing stream.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = fn()
        return graph.replay, output


# The smallest token size a mixed step is padded to.
_MIN_TOKENS = 16


def padded_tokens(num_tokens: int, max_tokens: int) -> int:
    """The token count a step with prompt chunks of `num_tokens` new tokens is padded to: the next
    power of two (16 at least), or `max_tokens`, the largest."""
    return min(max(_MIN_TOKENS, 1 << (num_tokens - 1).bit_length()), max_tokens)


@dataclass
class CapturedStep:
    replay: Callable[[], None]
    logits: torch.Tensor     # [padded rows, V], rewritten by each replay (StepGraphs.logits' rows)
    batch: RaggedBatch       # the padded batch captured, with its plan: it keeps the tensors alive


class DecodeRows:
    """The buffers a decode step is copied into: a row per sequence, up to max_num_seqs' padded
    size; padding rows are one-token sequences writing the scratch block's first slot."""

    def __init__(self, max_seqs: int, max_blocks_per_seq: int, block_size: int, scratch_block: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.pad_slot = scratch_block * block_size
        rows = padded_size(max_seqs)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((rows,), self.pad_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((rows, max_blocks_per_seq), scratch_block, dtype=torch.int32,
                                       device=device)
        # Decode rows: sequence i is token i, and every sequence samples.
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(rows, dtype=torch.int64, device=device)

    def pad(self, batch: RaggedBatch | None, size: int) -> RaggedBatch:
        """Copy the step's tensors (if a step is given) into the buffers' first rows; the rows
        after them, up to `size`, are padding."""
        n = 0
        if batch is not None:
            n, width = batch.num_seqs, batch.block_tables.shape[1]
            self.input_ids[:n].copy_(batch.input_ids)
            self.positions[:n].copy_(batch.positions)
            self.seq_lens[:n].copy_(batch.seq_lens)
            self.slot_mapping[:n].copy_(batch.slot_mapping)
            self.block_tables[:n, :width].copy_(batch.block_tables)
        # Rows a larger step left behind would write into slots their sequence may have given up
        # (and read its whole context for nothing).
        self.seq_lens[n:size].fill_(1)
        self.slot_mapping[n:size].fill_(self.pad_slot)
        return RaggedBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size],
            logits_indices=self.logits_indices[:size],
            query_lens=[1] * size, context_lens=(batch.context_lens if batch else []) + [0] * (size - n),
            num_decodes=size, block_size=self.block_size,
            sequences=batch.sequences if batch else [], sampling_seqs=batch.sampling_seqs if batch else [])


class MixedRows:
    """The buffers a step with prompt chunks is copied into: `max_tokens` tokens, max_num_seqs + 2
    sequences (the step's, the sink and the empty one) and a logits row per sequence that may
    sample. Stale values a step leaves past its own rows are never read: lengths and
    `query_start_loc` bound what every kernel reads, and each step rewrites those whole."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.block_size, self.scratch_block = block_size, scratch_block
        rows = max_seqs + 2
        # Wide enough for the sink's keys too, however long the budget against the model's length.
        width = max(max_blocks_per_seq, -(-max_tokens // block_size))
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.full((rows, width), scratch_block, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(min(max_seqs, max_tokens), dtype=torch.int64, device=device)
        # The sink's token i writes the scratch block's slot i % block_size, and its rotary takes
        # that position too: within any model's table, however many tokens the sink has.
        self.sink_positions = torch.arange(max_tokens, dtype=torch.int64, device=device) % block_size
        self.sink_slots = scratch_block * block_size + self.sink_positions

    def sizes(self) -> list[int]:
        """Every token count a step is padded to, smallest first."""
        sizes, size = [], padded_tokens(2, self.max_tokens)
        while True:
            sizes.append(size)
            if size == self.max_tokens:
                return sizes
            size = padded_tokens(size + 1, self.max_tokens)

    def warmup_batch(self, size: int) -> RaggedBatch:
        """A stand-in step of `size` tokens for capturing ahead: prompt chunks of 16 tokens (the
        last takes the rest) with nothing cached, on the scratch block, so that it reads and writes
        no sequence's cache, and short, so that backends plan it without split-KV, as most steps."""
        n = max(1, min(self.max_seqs, size // _MIN_TOKENS))
        query_lens = [size // n] * (n - 1) + [size - (size // n) * (n - 1)]
        starts = [0, *itertools.accumulate(query_lens)]
        device = self.input_ids.device
        within = [i - start for start, q in zip(starts, query_lens) for i in range(start, start + q)]
        offsets = torch.tensor(within, dtype=torch.int64, device=device) % self.block_size
        return RaggedBatch(
            input_ids=torch.zeros(size, dtype=torch.int64, device=device), positions=offsets,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
            block_tables=torch.full((n, -(-max(query_lens) // self.block_size)), self.scratch_block,
                                    dtype=torch.int32, device=device),
            slot_mapping=self.scratch_block * self.block_size + offsets,
            logits_indices=torch.tensor(starts[1:], dtype=torch.int64, device=device) - 1,
            query_lens=query_lens, context_lens=[0] * n, num_decodes=0, block_size=self.block_size,
            sequences=[], sampling_seqs=[])

    def serves(self, batch: RaggedBatch) -> bool:
        """A step with prompt chunks that fits the buffers and samples one row per sampling
        sequence (a step with prompt logprobs has more rows)."""
        return (batch.num_decodes < batch.num_seqs <= self.max_seqs
                and batch.num_tokens <= self.max_tokens
                and batch.logits_indices.shape[0] == len(batch.sampling_seqs))

    def pad(self, batch: RaggedBatch, size: int) -> RaggedBatch:
        """Copy the step's tensors into the buffers; the sink takes the `size - T` tokens after the
        step's, and the rows after it, up to max_num_seqs + 2, have none."""
        tokens, seqs, samples = batch.num_tokens, batch.num_seqs, batch.logits_indices.shape[0]
        sink = size - tokens
        rows = self.max_seqs + 2
        self.input_ids[:tokens].copy_(batch.input_ids)   # the sink's keep earlier steps' ids
        self.positions[:tokens].copy_(batch.positions)
        self.positions[tokens:size].copy_(self.sink_positions[:sink])
        self.slot_mapping[:tokens].copy_(batch.slot_mapping)
        self.slot_mapping[tokens:size].copy_(self.sink_slots[:sink])
        self.query_start_loc[:seqs + 1].copy_(batch.query_start_loc)
        self.query_start_loc[seqs + 1:].fill_(size)
        self.seq_lens[:seqs].copy_(batch.seq_lens)
        self.seq_lens[seqs:seqs + 1].fill_(sink)
        self.seq_lens[seqs + 1:].fill_(0)
        self.block_tables[:seqs, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        self.block_tables[seqs].fill_(self.scratch_block)
        self.logits_indices[:samples].copy_(batch.logits_indices)
        self.logits_indices[samples:].fill_(0)   # a larger step's may point past this one's tokens
        return RaggedBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens,
            block_tables=self.block_tables, slot_mapping=self.slot_mapping[:size],
            logits_indices=self.logits_indices[:min(self.max_seqs, size)],
            query_lens=batch.query_lens + [sink] + [0] * (rows - seqs - 1),
            context_lens=batch.context_lens + [0] * (rows - seqs),
            num_decodes=batch.num_decodes, block_size=self.block_size,
            sequences=batch.sequences, sampling_seqs=batch.sampling_seqs, graph_padded=True)


class StepGraphs:
    """The engine's captured steps, and the buffers they read."""

    def __init__(self, model: Any, backend: Any, kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
                 max_seqs: int, max_blocks_per_seq: int, block_size: int, scratch_block: int,
                 device: torch.device, capture: Capture, max_tokens: int = 0) -> None:
        """`max_tokens`: the largest step with prompt chunks replayed from a graph; below 2 (such a
        step has 2 tokens at least), or a backend without `graph_inputs`: decode steps only."""
        self.model, self.backend, self.kv_cache, self.capture = model, backend, kv_cache, capture
        self.max_seqs = max_seqs
        self.decode = DecodeRows(max_seqs, max_blocks_per_seq, block_size, scratch_block, device)
        # The plan tensors a replay refills; none for a backend captured for decode steps only.
        self.graph_inputs = getattr(backend, "graph_inputs", None)
        self.mixed = (MixedRows(max_tokens, max_seqs, max_blocks_per_seq, block_size, scratch_block,
                                device)
                      if max_tokens > 1 and self.graph_inputs is not None else None)
        # (kind, padded size, graph key) -> the step captured: "decode" steps padded to a number
        # of sequences, "mixed" ones to a number of tokens.
        self.graphs: dict[tuple[str, int, Hashable], CapturedStep] = {}
        # Every graph leaves its logits in this one buffer [rows, V], made at the first capture's
        # first run: a graph's output of its own would be a buffer per graph, each as large (a
        # Llama 3 vocabulary: 33 MB for 64 rows in float32). Safe to share: replays run one at a
        # time, and each step's logits are read (sampled, their logprob rows copied) on the
        # device before the next replay is queued behind that work.
        self.logits: torch.Tensor | None = None
        self.captures = 0
        self.replays = 0
        self.disabled_reason: str | None = None

    @staticmethod
    def unavailable_reason(model: Any, backend: Any) -> str | None:
        """Why this model and backend cannot be captured, or None."""
        if getattr(backend, "graph_key", None) is None:
            return f"kernels.{backend.name} cannot be captured in CUDA graphs (it has no graph_key)"
        if not getattr(model, "graph_safe", False):
            return (f"models.{model.name} does not say its forward pass reads only the batch's "
                    f"tensors (graph_safe)")
        return None

    def run(self, batch: RaggedBatch) -> torch.Tensor | None:
        """The step's logits [S, V] from a graph, captured now if it is the first of its kind; None
        when no graph serves this step (the engine then runs it eagerly): a graph replays decodes
        only, each sampling once, or a step with prompt chunks that the mixed buffers fit."""
        if self.disabled_reason is not None:
            return None
        if (batch.num_decodes == batch.num_seqs <= self.max_seqs
                and batch.logits_indices.shape[0] == batch.num_seqs):
            kind, size = "decode", padded_size(batch.num_seqs)
            padded = self.decode.pad(batch, size)
        elif self.mixed is not None and self.mixed.serves(batch):
            kind, size = "mixed", padded_tokens(batch.num_tokens, self.mixed.max_tokens)
            padded = self.mixed.pad(batch, size)
        else:
            return None
        step = self._graph_for(kind, size, padded)
        if step is None:
            return None
        step.replay()
        self.replays += 1
        return step.logits[:batch.logits_indices.shape[0]]

    def capture_ahead(self) -> None:
        """Capture every padded size's graph for steps of short contexts (those the backend plans
        without split-KV) now, so that the first requests do not wait for captures: decode steps,
        then steps with prompt chunks."""
        t0 = time.perf_counter()
        size = 1
        while size <= padded_size(self.max_seqs):
            if self._graph_for("decode", size, self.decode.pad(None, size)) is None:
                return
            size = padded_size(size + 1)
        log.info("cuda_graphs: captured decode steps of 1 to %d sequences in %.2f s",
                 padded_size(self.max_seqs), time.perf_counter() - t0)
        if self.mixed is None:
            return
        t0 = time.perf_counter()
        sizes = self.mixed.sizes()
        for size in sizes:
            if self._graph_for("mixed", size, self.mixed.pad(self.mixed.warmup_batch(size), size)) is None:
                return
        log.info("cuda_graphs: captured steps with prompt chunks of %s tokens in %.2f s",
                 ", ".join(map(str, sizes)), time.perf_counter() - t0)

    def _graph_for(self, kind: str, size: int, padded: RaggedBatch) -> CapturedStep | None:
        """The graph that replays `padded`, its plan's tensors refilled from this step's, or
        captured first if there is none yet; None if the backend's plan for it cannot be captured."""
        plan = self.backend.prepare(padded)
        key = self.backend.graph_key(plan)
        if key is None:
            return None
        inputs = self.graph_inputs(plan) if self.graph_inputs is not None else {}
        step = self.graphs.get((kind, size, key))
        if step is not None:
            for name, tensor in inputs.items():
                getattr(step.batch.attn_metadata, name).copy_(tensor)
            return step
        # The graph reads its plan's tensors where they are at capture: they must be its own (a
        # plan's are views into a staging buffer that later steps reuse).
        padded.attn_metadata = dataclasses.replace(
            plan, **{name: tensor.clone() for name, tensor in inputs.items()}) if inputs else plan
        return self._capture(kind, size, key, padded)

    def _forward_into_shared_logits(self, padded: RaggedBatch) -> torch.Tensor:
        logits = self.model.forward(padded, self.kv_cache)
        if self.logits is None:
            rows = padded_size(self.max_seqs)   # the most any graph samples: decode rows
            self.logits = torch.empty(rows, logits.shape[1], dtype=logits.dtype, device=logits.device)
        out = self.logits[:logits.shape[0]]
        out.copy_(logits)
        return out

    def _capture(self, kind: str, size: int, key: Hashable, padded: RaggedBatch) -> CapturedStep | None:
        t0 = time.perf_counter()
        replay, logits = self.capture(lambda: self._forward_into_shared_logits(padded))
        what = (f"decode steps of {size} sequences" if kind == "decode"
                else f"steps with prompt chunks of {size} tokens")
        # Asked again: a backend that fell back to a host-planned path while running says so now.
        if self.backend.graph_key(padded.attn_metadata) != key:
            self.disabled_reason = (f"kernels.{self.backend.name} took a path that cannot be "
                                    f"replayed while capturing {what}")
            log.warning("cuda_graphs: off from now on: %s.", self.disabled_reason)
            return None
        step = self.graphs[(kind, size, key)] = CapturedStep(replay, logits, padded)
        self.captures += 1
        log.info("cuda_graphs: captured %s (%r) in %.0f ms", what, key, (time.perf_counter() - t0) * 1e3)
        return step
