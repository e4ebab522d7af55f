"""Launch shapes shared by the row-wise kernels (norm, activation)."""

from __future__ import annotations


def rows_per_program(block: int, elements: int = 4096) -> int:
    """Rows one program handles so that it touches about `elements` values: one row of a wide
    model's hidden size, many rows of a narrow one (fewer, fuller programs; the interpreter runs
    each program in numpy, so this matters even more there)."""
    return max(1, min(64, elements // block))
