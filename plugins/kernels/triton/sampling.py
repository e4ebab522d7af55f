"""Sampling in one kernel pass over the vocabulary: greedy rows take the argmax, sampling rows the
argmax of logits / temperature + Gumbel noise (the Gumbel-max trick draws from the softmax without
computing it). The noise is Philox, keyed by a per-row seed: a seeded request draws its seed from
its own generator, so its draws do not depend on its neighbours in the batch. Top-k / top-p come
in as one threshold per row, from a kernel that searches for it without sorting (top_k_top_p.py):
tokens whose scaled logit is below it are left out, so no filtered copy of the logits is made.
A row is drawn in chunks by programs of their own, and the best chunk wins (torch's argmax and
gather): one program to a row left most of a GPU idle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels import SamplingMetadata
from fastgen.plugins.kernels.sampling_seeds import row_seeds

from ._tiling import FP_FUSION, cdiv, interpreted, next_power_of_2
from .top_k_top_p import scaled_logit, thresholds


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temperatures_ptr, thresholds_ptr, seeds_ptr, best_val_ptr,
                          best_idx_ptr, stride_l, vocab, chunk_tokens, num_chunks,
                          BLOCK_V: tl.constexpr):
    # Program (row, chunk): the chunk's best key and its token (vocab: none above -inf).
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature <= 0.0
    threshold = tl.load(thresholds_ptr + row)
    seed = tl.load(seeds_ptr + row)
    best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_V], tl.int32)
    first = chunk * chunk_tokens
    end = tl.minimum(first + chunk_tokens, vocab)
    for start in range(first, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < end
        logit = tl.load(logits_ptr + row * stride_l + cols, mask=mask, other=float("-inf"))
        # u in (0, 1): -log(-log(u)) is Gumbel(0, 1). Keyed by token, so the draw does not depend
        # on how the row is cut into chunks.
        u = tl.maximum(tl.rand(seed, cols), 1e-10)
        gumbel = -tl.log(-tl.log(u))
        scaled = scaled_logit(logit, temperature)
        key = tl.where(greedy, logit, scaled + gumbel)
        key = tl.where(mask & (logit > float("-inf")) & (scaled >= threshold), key, float("-inf"))
        better = key > best_val      # strict: the first index wins ties, as argmax does
        best_val = tl.where(better, key, best_val)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best_val, axis=0)
    # Lowest index among lanes holding the maximum; none above -inf: vocab.
    winner = tl.min(tl.where(best_val == top, best_idx, vocab), axis=0)
    winner = tl.where(top > float("-inf"), winner, vocab)
    tl.store(best_val_ptr + row * num_chunks + chunk, top)
    tl.store(best_idx_ptr + row * num_chunks + chunk, winner)


def sample(logits: torch.Tensor, meta: SamplingMetadata,
           generator: torch.Generator | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """logits: [S, V] float32 -> next token ids [S] int64. A row is cut into chunks of
    `chunk_tokens` tokens drawn by programs of their own (default: by device)."""
    if meta.all_greedy:
        # One reduction instead of the noise, chunk and gather launches: the kernel's greedy rows
        # take this argmax too (first index on ties, token 0 for a row of -inf), and all-greedy
        # steps draw no seeds.
        return logits.argmax(dim=1)
    rows, vocab = logits.shape
    logits = logits.contiguous()
    if meta.any_top_k or meta.any_top_p:
        cuts = thresholds(logits, meta)
    else:
        cuts = torch.full((rows,), float("-inf"), device=logits.device)
    seeds = row_seeds(meta, rows, logits.device, generator)
    if not rows:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    interpreter = interpreted(logits.device)
    block = min(next_power_of_2(vocab), 1024 if interpreter else 4096)
    if chunk_tokens is None:
        # With one program to a row, the sample op took 0.67-0.81 ms for 1 to 256 rows of 128k
        # tokens on an H200, whatever the rows: each row's program was the wait. 8192-token
        # chunks give such a row 16 programs. The interpreter pays per program.
        chunk_tokens = vocab if interpreter else 2 * block
    chunk_tokens = cdiv(chunk_tokens, block) * block
    num_chunks = cdiv(vocab, chunk_tokens)
    best_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(rows, num_chunks)](logits, meta.temperatures, cuts, seeds, best_val,
                                              best_idx, logits.stride(0), vocab, chunk_tokens,
                                              num_chunks, BLOCK_V=block,
                                              enable_fp_fusion=FP_FUSION)
    # The first chunk holding the row's best key (chunks run in token order, so ties go to the
    # lowest token); a row with nothing above -inf falls back to token 0.
    winner = best_idx.gather(1, best_val.argmax(dim=1, keepdim=True)).squeeze(1).to(torch.int64)
    return torch.where(winner == vocab, 0, winner)
