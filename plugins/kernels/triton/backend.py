"""The Triton backend: every op of the set as Triton kernels, on a CUDA GPU or under TRITON_INTERPRET=1.

The kernel modules import triton and decide at import time whether to interpret, so they are
imported here only when a backend is made: this module imports cleanly without triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fastgen.kernels import SamplingMetadata, cuda_unavailable_reason


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    name = "triton"

    # Split-KV: None chooses per step from the batch shape and the device; a number forces it.
    num_kv_splits: int | None = None
    # New tokens per attention tile in steps with prompt chunks; None chooses by device.
    tile_tokens: int | None = None
    # The attention kernel's keys per loop step, warps and pipelining depth; None chooses by head
    # size and device. benchmarks/attention_sweep.py times the alternatives.
    attention_block_n: int | None = None
    attention_num_warps: int | None = None
    attention_num_stages: int | None = None
    # K/V read as TMA copies (attention.py), where the KV cache's blocks hold whole steps of keys
    # (a block_size of 64) on an sm_90 GPU or later. Off until a GPU session has timed it against
    # the gather (benchmarks/attention_sweep.py's `tma` rows).
    attention_tma: bool = False
    # Prompt tiles longest first (query_tiles.py); False keeps batch order, for the sweep to compare.
    longest_tiles_first: bool = True
    # KV heads per layer, from configure_kv_cache(): the split-KV rule counts a step's programs,
    # one per (tile, KV head). 1 until told, which counts tiles alone.
    num_kv_heads: int = 1

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        from . import activation, attention, cache, norm, rotary, sampling
        self._attention, self._cache, self._norm = attention, cache, norm
        self._rotary, self._activation, self._sampling = rotary, activation, sampling
        # The KV caches' TMA descriptors (attention_tma), kept while this backend's engine lives.
        self._cache_descriptors: dict = {}

    @classmethod
    def unavailable_reason(cls, device: torch.device | None) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed: pip install triton (or fastgen[triton])."
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            cuda_reason = cuda_unavailable_reason()
            return None if cuda_reason is None else f"{cuda_reason}."
        if device.type == "cpu" and _interpreting():
            return None
        return (f"Triton needs a CUDA GPU (device is {device.type}), or TRITON_INTERPRET=1 for a slow "
                f"CPU run (tests).")

    @classmethod
    def auto_rank(cls, device: torch.device, cache_dir: str | None = None) -> int | None:
        """First on a CUDA device (above a built kernels.cuda, above kernels.torch); never on a
        CPU, where it only interprets. Triton compiles its kernels at first use, in seconds, with
        no build to wait for. Measured offline throughput with `cuda_graphs` on, as they are by
        default on a GPU (NVIDIA H200, 2026-11-28, bf16, 32 requests x 512 prompt + 64 generated
        tokens, tokens/s; docs/benchmarks.md): smollm2-135m greedy 10286 against kernels.cuda's
        8913 (14566 against 12278 with overlap_steps); llama-1b sampled 7668 against 7143 (11347
        against 9100). Its attention is the faster on every shape of the kernel suite. Without
        graphs (cuda_graphs = false) its many launches make it the slower engine (1556 against
        3276 tokens/s on smollm2-135m): name kernels.cuda there."""
        return 30 if device.type == "cuda" else None

    def configure_kv_cache(self, num_kv_heads: int, head_dim: int) -> None:
        self.num_kv_heads = num_kv_heads

    def prepare(self, batch):
        return self._attention.plan_attention(
            batch, self.tile_tokens, self.num_kv_splits, kv_heads=self.num_kv_heads,
            block_n=self.attention_block_n,
            num_warps=self.attention_num_warps, num_stages=self.attention_num_stages,
            longest_tiles_first=self.longest_tiles_first, tma=self.attention_tma)

    def graph_key(self, plan):
        # A decode-only step's plan has no tile tensors (tile i is sequence i) and reads lengths
        # and block tables from the batch's tensors: only its split count is baked into a launch.
        # A graph's padded batch lists as many tiles as its sizes allow (the grid), whose tensors
        # a replay refills (graph_inputs).
        if self._attention.decode_only(plan):
            return plan.num_splits
        return (plan.num_tiles, plan.num_splits) if plan.graph_padded else None

    def graph_inputs(self, plan) -> dict:
        return {} if self._attention.decode_only(plan) else {"tile_seq": plan.tile_seq,
                                                             "tile_start": plan.tile_start}

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        # key, value: [T, Hkv, D]; caches: [N, bs, Hkv, D]; slot_mapping: [T]
        self._cache.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, batch, scale, sliding_window=None):
        # q: [T, H, D] -> [T, H, D]
        return self._attention.paged_attention(q, k_cache, v_cache, batch.attn_metadata, scale,
                                               sliding_window, self._cache_descriptors)

    def rms_norm(self, x, weight, eps, residual=None):
        # x: [T, E] -> (normed [T, E], new residual [T, E])
        return self._norm.rms_norm(x, weight, eps, residual)

    def rotary(self, q, k, cos, sin, is_neox=True):
        # q: [T, H, D], k: [T, Hkv, D], cos/sin: [T, R/2]
        return self._rotary.rotary(q, k, cos, sin, is_neox)

    def silu_and_mul(self, x):
        # x: [T, 2I] -> [T, I]
        return self._activation.silu_and_mul(x)

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata,
               generator: torch.Generator | None = None) -> torch.Tensor:
        # logits: [S, V] float32 -> [S] int64
        return self._sampling.sample(logits, meta, generator)
