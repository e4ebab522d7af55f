"""Rotary position embedding: neox (halves) and gpt-j (interleaved pairs) layouts, partial rotary.

A program rotates a run of (token, head) rows of the flattened [T * H] axis, so short heads still
fill a program; one launch rotates q and k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiling import cdiv, next_power_of_2, rows_per_program


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, program, stride_xt, stride_xh, stride_ot,
                 stride_oh, stride_ct, stride_st, num_rows, num_heads,
                 HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr, IS_NEOX: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    rows = program * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    token = (rows // num_heads).to(tl.int64)[:, None]                      # [R, 1]
    head = (rows % num_heads)[:, None]
    x_rows = x_ptr + token * stride_xt + head * stride_xh
    o_rows = out_ptr + token * stride_ot + head * stride_oh
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = row_ok[:, None] & (i < HALF_ROT)
    cos = tl.load(cos_ptr + token * stride_ct + i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_st + i, mask=mask, other=0.0).to(tl.float32)
    # Pair i rotates dims (first, second): (i, i + R/2) in neox, (2i, 2i + 1) in gpt-j.
    if IS_NEOX:
        first = i
        second = i + HALF_ROT
    else:
        first = 2 * i
        second = 2 * i + 1
    x1 = tl.load(x_rows + first, mask=mask, other=0.0)
    x2 = tl.load(x_rows + second, mask=mask, other=0.0)
    dtype = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    # Rounded where the reference (and transformers) holds values in the model's dtype: cos and
    # sin, and each product. Left in fp32, a 16-bit result differs from theirs by up to 8 ulps
    # where the two products nearly cancel (seen on 1 of 2M values at Llama-3-8B's shapes).
    cos = _rounded(cos, dtype)
    sin = _rounded(sin, dtype)
    out1 = _rounded(x1f * cos, dtype) - _rounded(x2f * sin, dtype)
    out2 = _rounded(x2f * cos, dtype) + _rounded(x1f * sin, dtype)
    tl.store(o_rows + first, out1.to(dtype), mask=mask)
    tl.store(o_rows + second, out2.to(dtype), mask=mask)
    if BLOCK_PASS > 0:   # partial rotary: the dims past R pass through
        d = 2 * HALF_ROT + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = row_ok[:, None] & (d < HEAD_DIM)
        tl.store(o_rows + d, tl.load(x_rows + d, mask=pass_mask), mask=pass_mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh,
                   stride_kot, stride_koh, stride_ct, stride_st, num_tokens, q_heads, k_heads,
                   HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr, IS_NEOX: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    # The first programs rotate q's (token, head) rows, the rest k's: one launch for both, as
    # each launch costs tens of microseconds on the host.
    q_programs = tl.cdiv(num_tokens * q_heads, ROWS)
    program = tl.program_id(0)
    if program < q_programs:
        _rotate_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr, program, stride_qt, stride_qh,
                     stride_qot, stride_qoh, stride_ct, stride_st, num_tokens * q_heads, q_heads,
                     HEAD_DIM, HALF_ROT, IS_NEOX, ROWS, BLOCK_HALF, BLOCK_PASS)
    else:
        _rotate_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr, program - q_programs, stride_kt,
                     stride_kh, stride_kot, stride_koh, stride_ct, stride_st, num_tokens * k_heads,
                     k_heads, HEAD_DIM, HALF_ROT, IS_NEOX, ROWS, BLOCK_HALF, BLOCK_PASS)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D] (last dim contiguous); cos/sin: [T, R/2] -> rotated (q, k)."""
    tokens, q_heads, dim = q.shape
    k_heads = k.shape[1]
    half = cos.shape[-1]
    q_out = torch.empty(tokens, q_heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(tokens, k_heads, dim, dtype=k.dtype, device=k.device)
    if tokens:
        rest = dim - 2 * half
        rows = rows_per_program(next_power_of_2(dim), 2048)
        programs = cdiv(tokens * q_heads, rows) + cdiv(tokens * k_heads, rows)
        _rotary_kernel[(programs,)](
            q, k, q_out, k_out, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos.stride(0), sin.stride(0), tokens, q_heads, k_heads,
            HEAD_DIM=dim, HALF_ROT=half, IS_NEOX=is_neox, ROWS=rows,
            BLOCK_HALF=next_power_of_2(half),
            BLOCK_PASS=next_power_of_2(rest) if rest else 0, num_warps=4,
            # Else the compiler fuses a 16-bit product and the sum into one fma, rounded once:
            # 3359 of 6144 fp16 values of the cancellation test differed on an H200.
            enable_fp_fusion=False)
    return q_out, k_out
