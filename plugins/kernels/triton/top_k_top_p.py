"""Top-k / top-p cuts without sorting the vocabulary: one threshold per row, found by search.

Both filters keep an upper set of the row's temperature-scaled logits, so each row's kept set is
{tokens whose scaled logit >= its threshold}, and the sampler needs only that float per row.
The threshold is searched for among the float32 bit patterns, through an int order key: a
float32 has 2^32 of them, so the search is exact and its length is known, where a search on the
value itself could halve an interval near 0 (dense with floats) a hundred times. Each pass over
the row tests 16 candidate cuts at once (counting the tokens at or above each and summing their
softmax mass) and keeps a sixteenth of the key interval, so a search takes at most 8 passes, not
the 32 of a bisection; it stops earlier once the kept set cannot change (see `_highest_cut`).
A row costs at most 18 passes: its max and floor, its mass, then top-k's search and top-p's.

What is kept matches kernels.torch (plugins/kernels/torch_ref/sampling.py) exactly but at ties:
- top-k keeps the tokens whose scaled logit is >= the k-th largest (the reference keeps exactly k
  and picks among tokens tied at the cut in sort order; here all tied tokens stay);
- top-p, on the distribution renormalised over the top-k tokens as the reference does, keeps a
  token while the mass of the tokens strictly above it is < top_p (the reference's "mass before it
  in sorted order", which for the first of a tie group is the same; again the whole group stays).
The top-k mass is that of exactly k tokens, as in the reference, even when ties keep more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels import SamplingMetadata
from fastgen.plugins.kernels.top_k_candidates import top_k_candidates

from ._tiling import FP_FUSION, interpreted, next_power_of_2

# Keys tested per pass: 16 settle 4 bits of the 32-bit key, so a search takes at most 8 passes
# over the row (a plain bisection takes 32); the extra compares are cheap next to the reads.
CUTS = 16


@triton.jit
def scaled_logit(logit, temperature):
    """logit / temperature (greedy rows: 1). The threshold kernel and the sampler both call this,
    so a token's value is bit-identical where its threshold is taken and where it is compared."""
    return logit / tl.where(temperature > 0.0, temperature, 1.0)


@triton.jit
def _order_key(x):
    """float32 -> int64 ordered as the floats are: negative floats' magnitude bits are flipped."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _key_value(key):
    """The inverse of _order_key (the flip is its own inverse)."""
    bits = key.to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)


@triton.jit
def _count_and_mass(row_ptr, vocab, temperature, row_max, cuts, BLOCK_V: tl.constexpr):
    """cuts: [C] -> per cut, how many tokens have a scaled logit >= it ([C] int32) and their
    unnormalised softmax mass exp(s - row_max) ([C] float32)."""
    count = tl.zeros(cuts.shape, tl.int32)
    mass = tl.zeros(cuts.shape, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s = scaled_logit(tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")),
                         temperature)
        kept = s[:, None] >= cuts[None, :]
        count += tl.sum(kept.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(kept, tl.exp(s - row_max)[:, None], 0.0), axis=0)
    return count, mass


@triton.jit
def _pick(values, lanes, lane):
    """values[lane] of a [C] vector, as a scalar."""
    return tl.sum(tl.where(lanes == lane, values, 0), axis=0)


@triton.jit
def _highest_cut(row_ptr, vocab, temperature, row_max, lo, count_lo, mass_lo, hi, min_count,
                 min_mass, BLOCK_V: tl.constexpr, CUTS: tl.constexpr):
    """The highest cut whose kept set holds >= min_count tokens and >= min_mass mass.

    lo, hi: order keys with lo passing and hi failing; count_lo, mass_lo: the kept set at lo.
    Each pass tests CUTS evenly spaced keys in [lo, hi) and keeps the interval between the highest
    that passes and the next. Returns (key, count, mass) of a cut with the same kept set as the
    highest one. It stops when [lo, hi) has shrunk to one key (lo is then a token's value), when
    at most one token lies in [lo, hi) (the highest cut is a value in [lo, hi), so that token's),
    or when lo keeps only min_count tokens (the highest cut keeps at least as many: the same ones).
    """
    lanes = tl.arange(0, CUTS)
    count_hi = tl.full([], 0, tl.int32)
    while (hi - lo > 1) & (count_lo - count_hi > 1) & (count_lo > min_count):
        keys = lo + ((hi - lo) * lanes) // CUTS           # keys[0] == lo; int64: no overflow
        count, mass = _count_and_mass(row_ptr, vocab, temperature, row_max, _key_value(keys),
                                      BLOCK_V)
        # The kept set shrinks as the cut rises, so the passing keys are a prefix, lo among them.
        best = tl.max(tl.where((count >= min_count) & (mass >= min_mass), lanes, 0), axis=0)
        lo, count_lo, mass_lo = (_pick(keys, lanes, best), _pick(count, lanes, best),
                                 _pick(mass, lanes, best))
        inside = best + 1 < CUTS              # else the next failing key is hi itself
        hi = tl.where(inside, _pick(keys, lanes, best + 1), hi)
        count_hi = tl.where(inside, _pick(count, lanes, best + 1), count_hi)
    return lo, count_lo, mass_lo


# A step's candidates (top_k_candidates) have as many columns as its largest top-k: not specialised on.
@triton.jit(do_not_specialize=["stride_l", "vocab"],
            do_not_specialize_on_alignment=["temperatures_ptr", "top_k_ptr", "top_p_ptr"])
def _threshold_kernel(logits_ptr, temperatures_ptr, top_k_ptr, top_p_ptr, out_ptr, stride_l,
                      vocab, BLOCK_V: tl.constexpr, CUTS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row * stride_l
    temperature = tl.load(temperatures_ptr + row)
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    top_p = tl.load(top_p_ptr + row)
    # Pass 1: the row's max (the softmax shift) and its smallest finite value (the search floor).
    row_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    row_min = tl.full([BLOCK_V], float("inf"), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s = scaled_logit(tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")),
                         temperature)
        row_max = tl.maximum(row_max, s)
        row_min = tl.minimum(row_min, tl.where(s > float("-inf"), s, float("inf")))
    row_max = tl.max(row_max, axis=0)
    row_min = tl.min(row_min, axis=0)
    threshold = tl.full([], float("-inf"), tl.float32)
    filtered = (temperature > 0.0) & ((top_k > 0) | (top_p < 1.0))
    if filtered & (row_max > float("-inf")):
        lo = _order_key(row_min)
        hi = _order_key(row_max) + 1
        # Pass 2: the finite tokens' count and mass (every lane cuts at the floor).
        count, mass = _count_and_mass(row_ptr, vocab, temperature, row_max,
                                      tl.full([CUTS], 0.0, tl.float32) + row_min, BLOCK_V)
        count_lo, mass_lo = tl.max(count, axis=0), tl.max(mass, axis=0)
        # Fewer finite tokens than k: all of them stay, as in the reference.
        k = tl.where((top_k > 0) & (top_k < count_lo), top_k, count_lo)
        lo, count_lo, mass_lo = _highest_cut(row_ptr, vocab, temperature, row_max, lo, count_lo,
                                             mass_lo, hi, k, 0.0, BLOCK_V, CUTS)
        if top_p < 1.0:
            # The mass of exactly k tokens: tokens tied at the cut beyond the k-th do not count.
            top_k_mass = mass_lo - (count_lo - k).to(tl.float32) * tl.exp(_key_value(lo) - row_max)
            lo, count_lo, mass_lo = _highest_cut(row_ptr, vocab, temperature, row_max, lo,
                                                 count_lo, mass_lo, hi, 1, top_p * top_k_mass,
                                                 BLOCK_V, CUTS)
        threshold = _key_value(lo)
    tl.store(out_ptr + row, threshold)


def thresholds(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logits: [S, V] float32, contiguous rows -> [S] float32: each row's cut under its top-k and
    top-p, on the scaled logits (logit / temperature): a token stays iff its scaled logit is >= the
    cut. -inf for greedy rows and rows without top-k / top-p."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    candidates = top_k_candidates(logits, meta) if rows else None
    if candidates is not None:   # see top_k_candidates.py: the same cut, found on fewer tokens
        logits, vocab = candidates, candidates.shape[1]
    if rows:
        # A tile is [BLOCK_V, CUTS] comparisons: smaller tiles than the sampler's.
        block = min(next_power_of_2(vocab), 1024 if interpreted(logits.device) else 512)
        _threshold_kernel[(rows,)](logits, meta.temperatures, meta.top_k, meta.top_p, out,
                                   logits.stride(0), vocab, BLOCK_V=block, CUTS=CUTS,
                                   enable_fp_fusion=FP_FUSION)
    return out
