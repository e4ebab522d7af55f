"""Launch shapes shared by the kernels: the row-wise kernels' rows per program, and whether a
device runs Triton compiled or interpreted."""

from __future__ import annotations

import torch


def interpreted(device: torch.device) -> bool:
    """Whether Triton runs for tensors on `device` under its interpreter (the CPU, in tests) rather
    than compiled: on a GPU, or on meta tensors, which compile_check compiles for a GPU it does not
    have. The two want different tiles: the interpreter pays per program and per op in numpy, not
    per element, so fewer, larger tiles run faster there."""
    return device.type == "cpu"


def rows_per_program(block: int, elements: int = 4096) -> int:
    """Rows one program handles so that it touches about `elements` values: one row of a wide
    model's hidden size, many rows of a narrow one (fewer, fuller programs; the interpreter runs
    each program in numpy, so this matters even more there)."""
    return max(1, min(64, elements // block))
