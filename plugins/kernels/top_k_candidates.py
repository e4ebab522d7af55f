"""Where every filtering row has a top-k, the GPU samplers find its top-k / top-p cut among its
largest logits only (kernels.triton, kernels.cuda).

Both samplers search a row's cut in passes over the whole row, run by one program (a thread block)
per row: on an H200 a 128k-token row took 0.75 ms (kernels.cuda) to 2.4 ms (kernels.triton),
while the rest of the GPU idled. A row's kept set never reaches past its top_k largest logits, and
`SamplingMetadata.top_k_bound` says, from the host, when that holds for every filtering row; then
the search runs on the `top_k_bound + 1` largest logits of each row (torch.topk, which spreads its
pass over the GPU), and the cut it finds keeps the same tokens of the whole row: every token
outside them is no larger than the row's k-th largest, so the search treats it as the tokens tied
there.
"""

from __future__ import annotations

import torch

from fastgen.kernels import SamplingMetadata

# The cut is searched among the candidates when the bound is at most this share of the vocabulary.
CANDIDATE_SHARE = 16


def top_k_candidates(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor | None:
    """[S, V] -> [S, top_k_bound + 1] float32, each row's largest logits (in no order), or None
    where the search should take whole rows: a row filters by top-p alone, or the bound is too
    wide. One more than the bound: a search given exactly k tokens for a top-k of k takes the
    top-k as no filter at all (kernels.cuda's does), where it must cut at the smallest of them."""
    bound = meta.top_k_bound
    if meta.all_greedy or not bound or (bound + 1) * CANDIDATE_SHARE > logits.shape[1]:
        return None
    return logits.topk(bound + 1, dim=-1, sorted=False).values.contiguous()
