"""The CPU's matrix instructions, as torch probes them: they decide which dtype is fast on a CPU,
for the engine's `dtype = auto` and for kernels.cpu's choice of matmul."""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_16bit_matmul() -> frozenset[torch.dtype]:
    """The 16-bit dtypes this CPU multiplies with matrix instructions of their own (AVX512-BF16 or
    AMX for bf16, AMX-FP16 for fp16), where torch's matmul is the fast path. Elsewhere torch widens
    them slowly (bf16 at 11-17 GFLOP/s against fp32's 56-113 on the AVX2 machine)."""
    native = set()
    if _cpu_has("avx512_bf16") or _cpu_has("amx_tile"):
        native.add(torch.bfloat16)
    if _cpu_has("amx_fp16"):
        native.add(torch.float16)
    return frozenset(native)


def _cpu_has(feature: str) -> bool:
    """torch.cpu's probe `_is_<feature>_supported` (private), False where this torch has none."""
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(probe()) if probe is not None else False
