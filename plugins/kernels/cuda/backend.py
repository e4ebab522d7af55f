"""The CUDA extension backend: attention, KV cache write, RMSNorm, rotary, SiLU-and-mul and
sampling as CUDA kernels (csrc/).

The cases a kernel does not cover (an unsupported head size, another dtype, a weight in another
dtype than its input) run the torch reference's code on the same GPU, each noted once in the log,
so the backend always runs whole models. The library is built by `build.load()` when the backend
is made, so a broken toolchain fails at engine start, not in the first request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fastgen.kernels import cuda_unavailable_reason
from fastgen.plugins.kernels.compiled import LazyReferencePlan, ReferenceFallbackBackend
from fastgen.plugins.kernels.query_tiles import step_tiles
from fastgen.plugins.kernels.sampling_seeds import row_seeds
from fastgen.plugins.kernels.split_kv import plan_splits
from fastgen.plugins.kernels.top_k_candidates import top_k_candidates
from fastgen.plugins.kernels.torch_ref.attention import paged_attention
from fastgen.staging import staged

log = logging.getLogger(__name__)


@dataclass
class StepMetadata(LazyReferencePlan):
    """What prepare() derives once per step for the CUDA kernels, which read the batch's tensors
    directly: the split-KV count and the prompt chunks' tiles; and the reference's plan only when
    some layer falls back to it."""

    num_splits: int = 1
    prompt_tiles: torch.Tensor | None = None   # [W, 2] int32 (sequence, first new token); None: no chunk
    graph_padded: bool = False                 # planned for a CUDA graph's padded batch


class CudaBackend(ReferenceFallbackBackend):
    name = "cuda"

    # Split-KV: None chooses per step from the batch shape and the device; a number forces it.
    num_kv_splits: int | None = None
    # Prompt tiles longest first (query_tiles.py); False keeps batch order, for the sweep to compare.
    longest_tiles_first: bool = True

    def __init__(self, device: torch.device, cache_dir: str | None = None) -> None:
        super().__init__(device)
        self.ops = self.load_ops(cache_dir)
        self.attention_head_sizes = frozenset(self.ops.attention_head_sizes())
        self.prompt_tile_tokens = self.ops.attention_prompt_tile_tokens()

    @classmethod
    def load_ops(cls, cache_dir: str | None):
        """The kernels' ops namespace (torch.ops.fastgen_cuda), built first where needed. The tests
        swap in another build of the same csrc/ here (an emulated one, on the CPU)."""
        from . import build

        build.load(cache_dir)
        return torch.ops.fastgen_cuda

    @classmethod
    def unavailable_reason(cls, device: torch.device | None) -> str | None:
        # build is imported here, not at the top, so `python -m ...cuda.build` runs it only once.
        from . import build

        cuda_reason = cuda_unavailable_reason()
        if cuda_reason is not None:
            return f"{cuda_reason} to use kernels.cuda."
        if device is not None and device.type != "cuda":
            return f"it runs on CUDA devices only, not {device.type}; select one with --device cuda."
        if build.nvcc_path() is None:
            return "nvcc, needed to build its kernels, was not found; install the CUDA toolkit or set CUDA_HOME."
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return "ninja, needed to build its kernels, was not found; pip install ninja."
        return None

    @classmethod
    def auto_rank(cls, device: torch.device, cache_dir: str | None = None) -> int | None:
        """Second on a CUDA device, below kernels.triton (which its CUDA graphs made the faster
        engine: see TritonBackend.auto_rank) and above kernels.torch, but only once built:
        `kernels = auto` never starts the build itself."""
        if device.type != "cuda":
            return None
        from . import build

        if build.is_built(cache_dir):
            return 20
        log.info("kernels = auto leaves kernels.cuda out: it is not built yet. Build it once (a minute "
                 "or two) with `python -m fastgen.plugins.kernels.cuda.build`, or name it: --kernels cuda.")
        return None

    def prepare(self, batch) -> StepMetadata:
        # Blocks per token and query-head group: few tokens with a long context get their keys split.
        num_splits = self.num_kv_splits or plan_splits(batch, batch.num_tokens, per_multiprocessor=1)
        # Sequences with more than one new token (prompt chunks) go to the tiled kernel, in tiles.
        seq_ids, starts, _ = step_tiles(batch, self.prompt_tile_tokens, min_tokens=2,
                                        longest_first=self.longest_tiles_first)
        tiles = None
        if seq_ids:
            # [W, 2]: each tile's (sequence, first new token), interleaved.
            pairs = [v for pair in zip(seq_ids, starts) for v in pair]
            tiles = staged(pairs, torch.int32, batch.seq_lens.device).view(-1, 2)
        return StepMetadata(batch, num_splits=num_splits, prompt_tiles=tiles,
                            graph_padded=batch.graph_padded)

    def graph_key(self, meta: StepMetadata):
        # The kernels read lengths and block tables from the batch's tensors; the split count is
        # a launch argument, and so is the number of prompt tiles: planned per step, they are
        # captured only for a graph's padded batch, which lists as many as its sizes allow and
        # whose tensor a replay refills (graph_inputs). A layer that fell back to the reference
        # baked in that step's host-side plan.
        if meta.plan is not None:
            return None
        if meta.prompt_tiles is None:
            return meta.num_splits
        return (meta.prompt_tiles.shape[0], meta.num_splits) if meta.graph_padded else None

    def graph_inputs(self, meta: StepMetadata) -> dict:
        return {} if meta.prompt_tiles is None else {"prompt_tiles": meta.prompt_tiles}

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        # key, value: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T]
        self.ops.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, batch, scale, sliding_window=None):
        # q: [T, H, D] -> [T, H, D]
        head_dim = q.shape[-1]
        if head_dim not in self.attention_head_sizes:
            self._note(f"attention with head size {head_dim} runs the torch reference (CUDA kernels: "
                       f"{', '.join(map(str, sorted(self.attention_head_sizes)))})")
            return paged_attention(q, k_cache, v_cache, batch.attn_metadata.get(), scale,
                                   sliding_window)
        return self.ops.attention(q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                  batch.block_tables, scale, sliding_window or 0,
                                  batch.attn_metadata.num_splits, batch.attn_metadata.prompt_tiles)

    def sample(self, logits, meta, generator=None):
        # logits: [S, V] -> [S] int64
        logits = logits.float()
        if meta.all_greedy:   # one reduction, as the kernel's greedy rows: first index on ties
            return logits.argmax(dim=-1)
        seeds = row_seeds(meta, logits.shape[0], logits.device, generator)
        candidates = top_k_candidates(logits, meta)
        if candidates is None:
            return self.ops.sample(logits, meta.temperatures, meta.top_k, meta.top_p, seeds)
        # Each row's cut from its largest logits (top_k_candidates.py); the draw over the whole
        # row then takes it as found and searches none: the same token as the whole-row search.
        cuts = self.ops.sample_cuts(candidates, meta.temperatures, meta.top_k, meta.top_p)
        return self.ops.sample(logits, meta.temperatures, meta.top_k, meta.top_p, seeds, cuts)
