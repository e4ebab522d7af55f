"""Sampling in one kernel pass over the vocabulary: greedy rows take the argmax, sampling rows the
argmax of logits / temperature + Gumbel noise (the Gumbel-max trick draws from the softmax without
computing it). The noise is Philox, keyed by a per-row seed: a seeded request draws its seed from
its own generator, so its draws do not depend on its neighbours in the batch. Top-k / top-p come
in as one threshold per row, from a kernel that searches for it without sorting (top_k_top_p.py):
tokens whose scaled logit is below it are left out, so no filtered copy of the logits is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels import SamplingMetadata
from fastgen.plugins.kernels.sampling_seeds import row_seeds

from ._tiling import interpreted
from .top_k_top_p import scaled_logit, thresholds


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temperatures_ptr, thresholds_ptr, seeds_ptr, out_ptr,
                          stride_l, vocab, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature <= 0.0
    threshold = tl.load(thresholds_ptr + row)
    seed = tl.load(seeds_ptr + row)
    best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        logit = tl.load(logits_ptr + row * stride_l + cols, mask=mask, other=float("-inf"))
        # u in (0, 1): -log(-log(u)) is Gumbel(0, 1).
        u = tl.maximum(tl.rand(seed, cols), 1e-10)
        gumbel = -tl.log(-tl.log(u))
        scaled = scaled_logit(logit, temperature)
        key = tl.where(greedy, logit, scaled + gumbel)
        key = tl.where(mask & (logit > float("-inf")) & (scaled >= threshold), key, float("-inf"))
        better = key > best_val      # strict: the first index wins ties, as argmax does
        best_val = tl.where(better, key, best_val)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best_val, axis=0)
    # Lowest index among lanes holding the maximum; an all -inf row falls back to token 0.
    winner = tl.min(tl.where(best_val == top, best_idx, vocab), axis=0)
    tl.store(out_ptr + row, tl.where(winner == vocab, 0, winner).to(tl.int64))


def sample(logits: torch.Tensor, meta: SamplingMetadata,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [S, V] float32 -> next token ids [S] int64."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    if not meta.all_greedy and (meta.any_top_k or meta.any_top_p):
        cuts = thresholds(logits, meta)
    else:
        cuts = torch.full((rows,), float("-inf"), device=logits.device)
    seeds = row_seeds(meta, rows, logits.device, generator)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        block = min(triton.next_power_of_2(vocab), 1024 if interpreted(logits.device) else 4096)
        _gumbel_argmax_kernel[(rows,)](logits, meta.temperatures, cuts, seeds, out,
                                       logits.stride(0), vocab, BLOCK_V=block)
    return out
