"""The C++ CPU backend: every op but sampling as a CPU kernel from csrc/ (torch.ops.fastgen_cpu);
sampling in torch, without the reference's sorts and per-token variates (sampling.py).

Attention reads keys and values straight from the blocked cache through the block tables, so a
decode step copies no KV blocks. Prompt chunks of many new tokens go to torch's SDPA on gathered
keys, as the reference does: its matmul-based kernel beats the paged kernel's row-at-a-time
scores there, and the gather is small next to a chunk's arithmetic (CHUNK_SDPA_MIN_TOKENS).
Inputs the kernels do not take (another dtype, a weight whose dtype differs from its input) run
the torch reference, noted once in the log.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgen.cpu_features import native_16bit_matmul
from fastgen.plugins.kernels.compiled import DTYPES, LazyReferencePlan, ReferenceFallbackBackend
from fastgen.plugins.kernels.torch_ref.attention import AttentionPlan, ChunkPlan, paged_attention

from . import sampling

log = logging.getLogger(__name__)

# A prompt chunk of at least CHUNK_SDPA_MIN_TOKENS new tokens whose score matrix (new tokens x
# keys) has at least CHUNK_SDPA_MIN_SCORES entries runs SDPA; decodes and smaller chunks the paged
# kernel. Measured on the 2-core AVX2 machine with SmolLM2-135M's heads (9 query, 3 KV, size 64):
# the kernel is 2-3x faster up to 32 new tokens on a fresh prompt, SDPA 1.3-1.8x from 256 on.
CHUNK_SDPA_MIN_TOKENS = 16
CHUNK_SDPA_MIN_SCORES = 4096
# Few rows (decode steps) multiply faster through oneDNN's inner product than through torch's
# default fp32 GEMM (MKL): measured on the 2-core AVX2 EPYC with SmolLM2-135M's weights, 1.2-1.6x
# up to 32 rows on the layers' shapes and 2x up to 64 rows on the vocabulary-sized lm_head, but
# slower from 64 rows on the layers'. Only fp32: oneDNN has no bf16 inner product without AVX512-BF16.
ONEDNN_MAX_ROWS = 32
ONEDNN_MAX_ROWS_WIDE = 64
WIDE_OUTPUTS = 16384   # weights with at least this many rows (outputs) count as wide
# fp32 products of up to this many rows run the backend's own linear kernel, which reads the weights
# once for all rows: 1.0-2.8x oneDNN's inner product on SmolLM2's shapes (weights not in cache) on
# the AVX2 machine, even at 8 rows, slower from 16.
OWN_FP32_MAX_ROWS = 8


@dataclass
class StepMetadata:
    """What prepare() derives once per step: the sequences the paged kernel computes, the
    reference's plan for the prompt chunks SDPA computes (None when none does), and the
    reference's full plan, made only when some layer falls back to the reference."""

    kernel_seq_ids: torch.Tensor        # [n] int32, indices into the batch's sequences
    sdpa_plan: AttentionPlan | None
    reference: LazyReferencePlan


class CpuBackend(ReferenceFallbackBackend):
    name = "cpu"

    def __init__(self, device: torch.device, cache_dir: str | None = None) -> None:
        from . import build

        super().__init__(device)
        build.load(cache_dir)
        self.ops = torch.ops.fastgen_cpu
        self._onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    @classmethod
    def unavailable_reason(cls, device: torch.device | None) -> str | None:
        from . import build

        if device is not None and device.type != "cpu":
            return f"kernels.cpu runs on the CPU only, not {device.type}; select it with --device cpu."
        if build.compiler() is None:
            return (f"no C++ compiler ({os.environ.get('CXX', 'c++')}) was found to build its kernels; "
                    f"install g++ or set CXX.")
        if shutil.which("ninja") is None:
            from torch.utils.cpp_extension import is_ninja_available

            if not is_ninja_available():
                return "ninja, needed to build its kernels, was not found; pip install ninja."
        return None

    def linear(self, x, weight, bias=None):
        # x: [T, K], weight: [N, K] -> [T, N], as F.linear
        if x.dim() == 2 and x.dtype == weight.dtype and weight.is_contiguous() \
                and (bias is None or bias.dtype == x.dtype):
            # The own kernel: fp32 products of few rows, and 16-bit ones where the CPU has no
            # matrix instructions for them (it widens in registers: 3-6x torch's widening from 4
            # rows on).
            if x.dtype == torch.float32 and x.shape[0] <= OWN_FP32_MAX_ROWS \
                    or x.dtype in (torch.bfloat16, torch.float16) and x.dtype not in native_16bit_matmul():
                return self.ops.linear(x, weight, bias)
        limit = ONEDNN_MAX_ROWS_WIDE if weight.shape[0] >= WIDE_OUTPUTS else ONEDNN_MAX_ROWS
        if self._onednn and x.dim() == 2 and x.shape[0] <= limit and x.dtype == torch.float32 \
                and weight.dtype == torch.float32:
            try:
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
            except RuntimeError as e:   # a CPU oneDNN has no kernel for: MKL from now on
                self._onednn = False
                self._note(f"oneDNN's inner product failed ({str(e).splitlines()[0]}); linear runs F.linear")
        return F.linear(x, weight, bias)

    @classmethod
    def auto_rank(cls, device: torch.device, cache_dir: str | None = None) -> int | None:
        """Above the reference on a CPU (offline throughput 1.28x in fp32, docs/benchmarks.md),
        but only once built: `kernels = auto` never starts the minute-long build itself."""
        from . import build

        if build.is_built(cache_dir):
            return 10
        log.info("kernels = auto leaves kernels.cpu out: it is not built yet. Build it once (about a "
                 "minute) with `python -m fastgen.plugins.kernels.cpu.build`, or name it: --kernels cpu.")
        return None

    def prepare(self, batch) -> StepMetadata:
        kernel_ids, sdpa_chunks = list(range(batch.num_decodes)), []
        start = batch.num_decodes
        for i in range(batch.num_decodes, batch.num_seqs):
            q_len, context = batch.query_lens[i], batch.context_lens[i]
            if q_len >= CHUNK_SDPA_MIN_TOKENS and q_len * (context + q_len) >= CHUNK_SDPA_MIN_SCORES:
                blocks = batch.block_tables[i, :-(-(context + q_len) // batch.block_size)].long()
                sdpa_chunks.append(ChunkPlan(start, q_len, context, blocks))
            else:
                kernel_ids.append(i)
            start += q_len
        sdpa_plan = AttentionPlan(0, None, None, sdpa_chunks) if sdpa_chunks else None
        return StepMetadata(torch.tensor(kernel_ids, dtype=torch.int32), sdpa_plan,
                            LazyReferencePlan(batch))

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        # key, value: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T]
        if key.dtype not in DTYPES:
            self._note(f"write_kv of {key.dtype} runs the torch reference")
            return super().write_kv(key, value, k_cache, v_cache, slot_mapping)
        self.ops.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, batch, scale, sliding_window=None):
        # q: [T, H, D] -> [T, H, D]
        meta: StepMetadata = batch.attn_metadata
        if q.dtype not in DTYPES:
            self._note(f"attention of {q.dtype} runs the torch reference")
            return paged_attention(q, k_cache, v_cache, meta.reference.get(), scale, sliding_window)
        if meta.sdpa_plan is not None:
            # Fills the SDPA chunks' rows; the kernel fills the other rows of the same tensor below.
            out = paged_attention(q, k_cache, v_cache, meta.sdpa_plan, scale, sliding_window)
        else:
            out = torch.empty(q.shape, dtype=q.dtype)
        if meta.kernel_seq_ids.numel():
            self.ops.paged_attention(out, q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, meta.kernel_seq_ids, scale, sliding_window or 0)
        return out

    def sample(self, logits, meta, generator=None):
        # logits: [S, V] float32 -> [S] int64
        return sampling.sample(logits, meta, generator)
