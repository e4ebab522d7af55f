"""Split-KV (flash-decoding): how many parts a step's key ranges are cut into, for every GPU
attention kernel (kernels.triton, kernels.cuda).

A decode step of few sequences gives an attention kernel few programs, one per sequence and head,
each walking its whole context: most of the GPU idles while they do. Cutting each key range into
parts run by separate programs, then merging their softmax states, fills it. The split is planned
once per step from host-side metadata (no device sync), from the programs a step launches without
a split, as the backend counts them: kernels.triton counts (tile, KV head) pairs, the programs it
launches; kernels.cuda counts tokens, and aims at one program per multiprocessor where
kernels.triton aims at two, each kernel where it ran fastest over the split counts (NVIDIA H100,
llama3-8b bf16, 2026-11-28, docs/gpu-runs/2026-11-28-h100/sweep.md): one sequence of 8192 keys,
kernels.triton 21.3 us at 32 splits against 23.2 at 16, kernels.cuda 29.5 against 33.8; 16 of
8192, kernels.cuda 212 us at 8 (one per multiprocessor) against 224 at 16; 64 of 1024,
kernels.cuda 128-131 us at 1 to 4 against 134 at 5.
"""

from __future__ import annotations

import torch

# A split shorter than this many keys costs more in merging than it gains.
KEYS_PER_SPLIT = 256
# No split below this context: short ranges finish fast anyway.
MIN_SPLIT_KEYS = 512
MAX_SPLITS = 32        # kernels.cuda's most (kMaxAttentionSplits)


def target_programs(device: torch.device, per_multiprocessor: int = 2) -> int:
    """How many programs keep the device busy: `per_multiprocessor` on each of its multiprocessors;
    a small number elsewhere (the interpreter, meta tensors), so tests exercise split-KV with short
    contexts when they force it."""
    if device.type == "cuda":
        return per_multiprocessor * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def num_kv_splits(work_items: int, longest: int, target: int,
                  min_keys: int = MIN_SPLIT_KEYS) -> int:
    """Parts per key range: 1 unless `work_items` (programs without a split) fall short of `target`
    and the longest context (`longest` keys) is long enough to be worth cutting."""
    if work_items <= 0 or work_items >= target or longest < min_keys:
        return 1
    return max(1, min(-(-target // work_items), -(-longest // KEYS_PER_SPLIT), MAX_SPLITS))


def plan_splits(batch, work_items: int, min_keys: int = MIN_SPLIT_KEYS,
                per_multiprocessor: int = 2) -> int:
    """num_kv_splits for a step: its longest context from the batch's host-side lengths, its
    device's target."""
    longest = max((c + n for c, n in zip(batch.context_lens, batch.query_lens)), default=0)
    target = target_programs(batch.seq_lens.device, per_multiprocessor)
    return num_kv_splits(work_items, longest, target, min_keys)
