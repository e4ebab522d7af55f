"""How much memory the KV cache gets when the settings do not say (kv_cache_gb and num_blocks
unset): 1 GiB on a CPU; on a GPU what `gpu_memory_utilization` of its memory leaves once the
model is loaded and room for a step's activations is kept, as a serving engine on a GPU is
expected to do (the cache's size bounds how many sequences run at once)."""

from __future__ import annotations

import gc
from typing import Any

import torch

from .errors import ConfigError

CPU_KV_CACHE_GB = 1.0
# cuBLAS's workspaces, the kernel backends' scratch, the allocator's rounding.
GPU_FIXED_RESERVE = 512 * 2**20
GiB = 2**30


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


def gpu_kv_cache_bytes(device: torch.device, utilization: float, reserve: int) -> int:
    """Bytes for the KV cache: `utilization` of the GPU's memory, less what is in use now (the
    model, other processes) and `reserve`."""
    gc.collect()                # engines dropped but not collected yet (cycles) give memory back,
    torch.cuda.empty_cache()    # and torch's allocator the blocks it keeps cached
    free, total = torch.cuda.mem_get_info(device)
    budget = int(utilization * total) - (total - free) - reserve
    if budget <= 0:
        raise ConfigError(
            f"No room for a KV cache on {device}: {free / GiB:.1f} of its {total / GiB:.1f} GiB are "
            f"free with the model loaded, gpu_memory_utilization {utilization} lets the engine "
            f"hold {utilization * total / GiB:.1f} GiB in all, and a step's activations need "
            f"about {reserve / GiB:.1f} GiB. Raise gpu_memory_utilization, free what other "
            f"processes or engines hold on the GPU, or set kv_cache_gb or num_blocks.")
    return budget
