"""KV cache write: each new token's key and value go to its slot in the blocked cache.

A program copies a run of (token, KV head) rows of the flattened [T * Hkv] axis.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiling import FP_FUSION, cdiv, next_power_of_2, rows_per_program


@triton.jit(do_not_specialize=["num_rows"])
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     num_rows, num_kv_heads,
                     HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    token = (rows // num_kv_heads).to(tl.int64)
    head = (rows % num_kv_heads)[:, None]
    slot = tl.load(slot_mapping_ptr + token, mask=rows < num_rows, other=-1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    # A negative slot is padding: nothing to write.
    mask = ((rows < num_rows) & (slot >= 0))[:, None] & (d < HEAD_DIM)
    token = token[:, None]
    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + d, mask=mask)
    dst = slot[:, None] * stride_cs + head * stride_ch + d
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key, value: [T, Hkv, D] (last dim contiguous); caches: [N, bs, Hkv, D]; slot_mapping: [T]."""
    tokens, kv_heads, dim = key.shape
    if tokens == 0:
        return
    block_d = next_power_of_2(dim)
    rows = rows_per_program(block_d, 2048)
    # A cache slot is (block, offset) flattened: the caches are contiguous, so one stride covers it.
    _write_kv_kernel[(cdiv(tokens * kv_heads, rows),)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2), tokens * kv_heads, kv_heads,
        HEAD_DIM=dim, ROWS=rows, BLOCK_D=block_d, num_warps=4, enable_fp_fusion=FP_FUSION)
