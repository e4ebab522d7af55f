"""RMSNorm with the residual add fused in: one read of x and residual, one write of each result."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiling import FP_FUSION, cdiv, next_power_of_2, rows_per_program


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
                     stride_x, stride_r, stride_o, stride_nr, num_rows, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < hidden)[None, :]
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the activation dtype before normalising, as the reference models do.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + rows * stride_nr + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    normed = (xf * rstd[:, None]).to(x.dtype)
    tl.store(out_ptr + rows * stride_o + cols[None, :],
             (w[None, :] * normed.to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, E] (rows contiguous); weight: [E] -> (normed [T, E], new residual [T, E])."""
    num_rows, hidden = x.shape
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x) if residual is not None else x
    if num_rows:
        block = next_power_of_2(hidden)
        rows = rows_per_program(block)
        _rms_norm_kernel[(cdiv(num_rows, rows),)](
            x, residual if residual is not None else x, weight, out, new_residual,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            new_residual.stride(0), num_rows, hidden, eps,
            HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block,
            num_warps=min(max(rows * block // 512, 1), 16),
            enable_fp_fusion=FP_FUSION)
    return out, new_residual
