"""Decode steps replayed from CUDA graphs.

On a GPU a small model's decode step is mostly kernel launches: a dozen ops per layer, each a few
microseconds of Python and driver work for a few microseconds of GPU work. A CUDA graph records a
step's launches once and replays them all with one call.

A graph replays the same launches on the same memory, with every host-side value baked in. So it
serves only steps that look alike to the host: decode-only steps (one new token per sequence),
padded up to one of a few batch sizes, whose tensors are copied into buffers the graph reads. The
kernel backend says what else its attention plan baked in (kernels.triton and kernels.cuda: the
split-KV count) through `graph_key`; a graph is captured for each (padded size, key) and replayed
by every later step with the same pair. The engine captures every size's graph for short contexts
at start; a key that longer contexts bring (more split-KV parts) is captured at its first step.

Padding rows are sequences of one token that write their key and value into a scratch KV block
which the block allocator never hands out, so they can read and write without touching any real
sequence's cache. Their logits are computed and dropped.
"""

from __future__ import annotations

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


@dataclass
class CapturedStep:
    replay: Callable[[], None]
    logits: torch.Tensor     # [padded size, V], rewritten by each replay
    batch: RaggedBatch       # the padded batch captured; it keeps the plan's tensors alive


class StepGraphs:
    """The engine's captured decode steps, and the buffers they read."""

    def __init__(self, model: Any, backend: Any, kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
                 max_seqs: int, max_blocks_per_seq: int, block_size: int, scratch_block: int,
                 device: torch.device, capture: Capture) -> None:
        self.model, self.backend, self.kv_cache, self.capture = model, backend, kv_cache, capture
        self.max_seqs = max_seqs
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
        self.graphs: dict[tuple[int, Hashable], CapturedStep] = {}
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

    def serves(self, batch: RaggedBatch) -> bool:
        """Whether `batch` is a step a graph can replay: only decodes, each sampling once."""
        return (self.disabled_reason is None and batch.num_decodes == batch.num_seqs <= self.max_seqs
                and batch.logits_indices.shape[0] == batch.num_seqs)

    def run(self, batch: RaggedBatch) -> torch.Tensor | None:
        """The step's logits [B, V] from a graph, captured now if it is the first of its kind; None
        when no graph serves this step (the engine then runs it eagerly)."""
        if not self.serves(batch):
            return None
        step = self._graph_for(self._pad(batch, padded_size(batch.num_seqs)))
        if step is None:
            return None
        step.replay()
        self.replays += 1
        return step.logits[:batch.num_seqs]

    def capture_ahead(self) -> None:
        """Capture every padded size's graph for steps of short contexts (those the backend plans
        without split-KV) now, so that the first requests do not wait for captures."""
        t0 = time.perf_counter()
        size = 1
        while size <= padded_size(self.max_seqs):
            if self._graph_for(self._pad(None, size)) is None:
                return
            size = padded_size(size + 1)
        log.info("cuda_graphs: captured decode steps of 1 to %d sequences in %.2f s",
                 padded_size(self.max_seqs), time.perf_counter() - t0)

    def _graph_for(self, padded: RaggedBatch) -> CapturedStep | None:
        """The graph that replays `padded`, captured first if there is none yet; None if the
        backend's plan for it cannot be captured."""
        padded.attn_metadata = self.backend.prepare(padded)
        key = self.backend.graph_key(padded.attn_metadata)
        if key is None:
            return None
        return self.graphs.get((padded.num_seqs, key)) or self._capture(padded, padded.num_seqs, key)

    def _pad(self, batch: RaggedBatch | None, size: int) -> RaggedBatch:
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

    def _capture(self, padded: RaggedBatch, size: int, key: Hashable) -> CapturedStep | None:
        t0 = time.perf_counter()
        replay, logits = self.capture(lambda: self.model.forward(padded, self.kv_cache))
        # Asked again: a backend that fell back to a host-planned path while running says so now.
        if self.backend.graph_key(padded.attn_metadata) != key:
            self.disabled_reason = (f"kernels.{self.backend.name} took a path that cannot be "
                                    f"replayed while capturing a step of {size} sequences")
            log.warning("cuda_graphs: off from now on: %s.", self.disabled_reason)
            return None
        step = self.graphs[(size, key)] = CapturedStep(replay, logits, padded)
        self.captures += 1
        log.info("cuda_graphs: captured decode steps of %d sequences (%r) in %.0f ms", size, key,
                 (time.perf_counter() - t0) * 1e3)
        return step
