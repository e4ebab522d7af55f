"""What the memory-bound settings are when the settings do not say.

The KV cache (kv_cache_gb and num_blocks unset): 1 GiB on a CPU; on a GPU what
`gpu_memory_utilization` of its memory leaves once the model is loaded and room for a step's
activations is kept, as a serving engine on a GPU is expected to do (the cache's size bounds how
many sequences run at once).

The token budget (unset): 512 on a CPU; on a GPU 2048 where a step of 2048 tokens leaves most of
the room to the cache, else 512. A GPU runs a step of 2048 tokens in little more time than one of
512 (NVIDIA H200, llama-1b sampled, 32 requests x 512 prompt + 64 generated tokens: 1.14-1.19x
the tokens/s and 1.38-1.50x the prefill tokens/s, docs/benchmarks.md); a decode sharing a step
with a prompt chunk waits for the whole step, so the step stays at vLLM's online default."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

CPU_KV_CACHE_GB = 1.0
CPU_TOKEN_BUDGET = 512
GPU_TOKEN_BUDGET = 2048
# GPU_TOKEN_BUDGET is the default where its step reserve takes at most this share of the room.
GPU_BUDGET_RESERVE_SHARE = 0.25
# cuBLAS's workspaces, the kernel backends' scratch, the allocator's rounding.
GPU_FIXED_RESERVE = 512 * 2**20
GiB = 2**30


def free_memory(device: torch.device) -> int:
    """Bytes the device can still hand out (on CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_kv_cache_fits(size: int, num_blocks: int, block_size: int, device: torch.device) -> None:
    """ConfigError if a KV cache of `size` bytes cannot be had on `device` now: asked for outright
    (kv_cache_gb, num_blocks), it could be more than the machine has, and a CPU's allocator may
    grant it and let the kernel kill the process as the zeros land."""
    free = free_memory(device)
    if size > free:
        raise ConfigError(f"A KV cache of {size / GiB:.2f} GiB ({num_blocks} blocks of {block_size} "
                          f"tokens) does not fit in the {free / GiB:.2f} GiB free on {device}; "
                          f"lower kv_cache_gb or num_blocks.")


def step_activation_bytes(hf_config: Any, token_budget: int, max_num_seqs: int, itemsize: int) -> int:
    """A generous bound on what one step allocates besides weights and cache: the widest
    intermediates of `token_budget` tokens in the model's dtype (hidden states, q/k/v, the MLP's
    gate and up), and float32 logits for every row that may be sampled or scored (a step with
    prompt logprobs scores each of its tokens) with the samplers' copies of them."""
    hidden = hf_config.hidden_size
    inter = (getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "ffn_dim", None)
             or 4 * hidden)
    rows = max(token_budget, max_num_seqs)
    return token_budget * (4 * hidden + 3 * inter) * itemsize + 3 * rows * hf_config.vocab_size * 4


def step_reserve_bytes(hf_config: Any, token_budget: int, max_num_seqs: int, itemsize: int) -> int:
    """What a GPU keeps beside weights and KV cache: a step's activations twice (eager steps, and
    the CUDA graphs' memory pool) and the fixed reserve."""
    return 2 * step_activation_bytes(hf_config, token_budget, max_num_seqs, itemsize) + GPU_FIXED_RESERVE


@dataclass(frozen=True)
class GpuMemory:
    """A GPU's memory as the engine finds it with the model loaded: measured once, for both
    defaults that follow from it (the token budget, then the KV cache's size)."""

    device: torch.device
    free: int
    total: int
    utilization: float          # the share of `total` the engine may hold

    @classmethod
    def measure(cls, device: torch.device, utilization: float) -> GpuMemory:
        gc.collect()                # engines dropped but not collected yet (cycles) give memory back,
        torch.cuda.empty_cache()    # and torch's allocator the blocks it keeps cached
        free, total = torch.cuda.mem_get_info(device)
        return cls(device, free, total, utilization)

    @property
    def room(self) -> int:
        """What the engine may still take: its share of the memory, less what is in use (the
        model, other processes)."""
        return int(self.utilization * self.total) - (self.total - self.free)


def default_token_budget(hf_config: Any, max_num_seqs: int, itemsize: int,
                         gpu: GpuMemory | None) -> int:
    """The token budget when unset (see above): off a GPU (`gpu` None) CPU_TOKEN_BUDGET; on one,
    GPU_TOKEN_BUDGET where its step reserve is at most GPU_BUDGET_RESERVE_SHARE of the room left
    with the model loaded (an 8B model on an 80 GB GPU, not on a 24 GB one, where the cache would
    lose most of its room)."""
    if gpu is None:
        return CPU_TOKEN_BUDGET
    reserve = step_reserve_bytes(hf_config, GPU_TOKEN_BUDGET, max_num_seqs, itemsize)
    return GPU_TOKEN_BUDGET if reserve <= GPU_BUDGET_RESERVE_SHARE * gpu.room else CPU_TOKEN_BUDGET


def gpu_kv_cache_bytes(gpu: GpuMemory, reserve: int) -> int:
    """Bytes for the KV cache: the GPU's room less `reserve`."""
    budget = gpu.room - reserve
    if budget <= 0:
        raise ConfigError(
            f"No room for a KV cache on {gpu.device}: {gpu.free / GiB:.1f} of its "
            f"{gpu.total / GiB:.1f} GiB are free with the model loaded, gpu_memory_utilization "
            f"{gpu.utilization} lets the engine hold {gpu.utilization * gpu.total / GiB:.1f} GiB in "
            f"all, and a step's activations need about {reserve / GiB:.1f} GiB. Raise "
            f"gpu_memory_utilization, free what other processes or engines hold on the GPU, or set "
            f"kv_cache_gb or num_blocks.")
    return budget
