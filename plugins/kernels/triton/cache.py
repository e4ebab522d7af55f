"""KV cache write: each new token's key and value go to its slot in the blocked cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cs, stride_ch,
                     HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:   # a negative slot is padding: nothing to write
        d = tl.arange(0, BLOCK_D)
        mask = d < HEAD_DIM
        k = tl.load(key_ptr + token * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + head * stride_vh + d, mask=mask)
        dst = slot * stride_cs + head * stride_ch + d
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key, value: [T, Hkv, D] (last dim contiguous); caches: [N, bs, Hkv, D]; slot_mapping: [T]."""
    tokens, kv_heads, dim = key.shape
    if tokens == 0:
        return
    # A cache slot is (block, offset) flattened: the caches are contiguous, so one stride covers it.
    _write_kv_kernel[(tokens, kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=dim, NUM_KV_HEADS=kv_heads, BLOCK_D=triton.next_power_of_2(dim))
