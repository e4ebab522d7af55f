"""Launch settings shared by the kernels: the row-wise kernels' rows per program, whether a device
runs Triton compiled or interpreted, the shared memory a program may use there, and whether the
compiler may fuse a multiply and an add into one fma.

Specialisation: Triton compiles a kernel anew for each combination it sees of integer arguments
equal to 1 or divisible by 16 and of pointers aligned to 16 bytes. Arguments that change from step
to step (row and token counts, a block table's width, the step's metadata, which are views at
offsets into one staging buffer whose alignment moves with the batch's size) are listed in each
kernel's `do_not_specialize` / `do_not_specialize_on_alignment`, so that no step of a running server
waits for a compile because its sizes changed (a second or more per kernel on a cold cache).
`test_triton_compile.py` drives steps of many sizes and checks each kernel compiles once per
launch setting."""

from __future__ import annotations

import functools

import torch


# Passed to every launch (rotary's excepted, which must round each product), so the kernels' numbers
# do not change with Triton's default: on until 3.9, which warns while it is unset, off from 3.10.
# On is what the GPU sessions measured against the reference (NVIDIA H200, 2026-11-27).
FP_FUSION = True


def interpreted(device: torch.device) -> bool:
    """Whether Triton runs for tensors on `device` under its interpreter (the CPU, in tests) rather
    than compiled: on a GPU, or on meta tensors, which compile_check compiles for a GPU it does not
    have. The two want different tiles: the interpreter pays per program and per op in numpy, not
    per element, so fewer, larger tiles run faster there."""
    return device.type == "cpu"


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 at or above n (0 for 0), as triton.next_power_of_2 gives it. Host
    code calls this one: Triton's is a constexpr function, whose wrapper costs a few microseconds a
    call on the host (~3 us here), several calls a launch, every launch."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (triton.cdiv is a constexpr function too)."""
    return -(-a // b)


def rows_per_program(block: int, elements: int = 4096) -> int:
    """Rows one program handles so that it touches about `elements` values: one row of a wide
    model's hidden size, many rows of a narrow one (fewer, fuller programs; the interpreter runs
    each program in numpy, so this matters even more there)."""
    return max(1, min(64, elements // block))


# The shared memory of the GPU that compile_check compiles for, which meta tensors stand in for.
META_SHARED_BYTES: int | None = None


def max_shared_bytes(device: torch.device) -> int | None:
    """Shared memory one program may use on a CUDA `device`, as Triton checks at launch; on meta
    tensors, the compile check's target's; None elsewhere (the interpreter has no limit)."""
    if device.type == "meta":
        return META_SHARED_BYTES
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_shared_bytes(index)


@functools.lru_cache(maxsize=None)
def _max_shared_bytes(index: int) -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]
