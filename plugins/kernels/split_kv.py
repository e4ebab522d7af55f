"""Split-KV (flash-decoding): how many parts a step's key ranges are cut into, for every GPU
attention kernel (kernels.triton, kernels.cuda).

A decode step of few sequences gives an attention kernel few programs, one per sequence and head,
each walking its whole context: most of the GPU idles while they do. Cutting each key range into
parts run by separate programs, then merging their softmax states, fills it. The split is planned
once per step from host-side metadata (no device sync), from the programs a step launches without
a split, as the backend counts them: kernels.triton counts (tile, KV head) pairs, the programs it
launches; kernels.cuda counts tokens, since its per-token kernel gained from more parts than that
(NVIDIA H200, llama3-8b, 64 x 1024 keys: 5 splits 284 us, 1 split 342 us; kernels.triton: 143 us
against 120 us, docs/gpu-runs/2026-11-27-h200/sweep.md; both kernels changed since, and the
sweep times them again).
"""

from __future__ import annotations

import torch

# A split shorter than this many keys costs more in merging than it gains.
KEYS_PER_SPLIT = 256
# No split below this context: short ranges finish fast anyway.
MIN_SPLIT_KEYS = 512
MAX_SPLITS = 16


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy: a few waves of its multiprocessors; a small number
    elsewhere (the interpreter, meta tensors), so tests exercise split-KV with short contexts when
    they force it."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def num_kv_splits(work_items: int, longest: int, target: int,
                  min_keys: int = MIN_SPLIT_KEYS) -> int:
    """Parts per key range: 1 unless `work_items` (programs without a split) fall short of `target`
    and the longest context (`longest` keys) is long enough to be worth cutting."""
    if work_items <= 0 or work_items >= target or longest < min_keys:
        return 1
    return max(1, min(-(-target // work_items), -(-longest // KEYS_PER_SPLIT), MAX_SPLITS))


def plan_splits(batch, work_items: int, min_keys: int = MIN_SPLIT_KEYS) -> int:
    """num_kv_splits for a step: its longest context from the batch's host-side lengths, its
    device's target."""
    longest = max((c + n for c, n in zip(batch.context_lens, batch.query_lens)), default=0)
    return num_kv_splits(work_items, longest, target_programs(batch.seq_lens.device), min_keys)
