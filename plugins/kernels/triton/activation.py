"""SiLU-and-multiply: the gated MLP's activation, gate and up halves read in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiling import FP_FUSION, cdiv, next_power_of_2, rows_per_program


@triton.jit(do_not_specialize=["num_rows"])
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, num_rows, inter,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < inter)[None, :]
    rows = rows.to(tl.int64)[:, None]
    gate = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + rows * stride_x + inter + cols[None, :], mask=mask, other=0.0)
    # Rounded to the activation dtype between the two, as silu(gate) * up is in the reference.
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + rows * stride_o + cols[None, :],
             (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (rows contiguous) -> silu(x[:, :I]) * x[:, I:]: [T, I]."""
    num_rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    if num_rows:
        block = min(next_power_of_2(inter), 1024)
        rows = rows_per_program(block)
        _silu_and_mul_kernel[(cdiv(num_rows, rows), cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), num_rows, inter, ROWS=rows, BLOCK=block,
            num_warps=min(max(rows * block // 512, 1), 8), enable_fp_fusion=FP_FUSION)
    return out
