"""Inputs for the sample-op tests: sampling metadata as the engine builds it, logits, draws.

A module of its own, not conftest.py (see kernel_batches.py for why).
"""

from __future__ import annotations

import torch

from fastgen import SamplingParams
from fastgen.kernels import SamplingMetadata
from fastgen.request import Sequence

CPU = torch.device("cpu")


def metadata(params: list[SamplingParams]) -> SamplingMetadata:
    """As the engine builds it: a seeded request gets its own generator."""
    seqs = []
    for p in params:
        seq = Sequence("r", [0], p)
        if p.seed is not None:
            seq.generator = torch.Generator(device=CPU).manual_seed(p.seed)
        seqs.append(seq)
    return SamplingMetadata.build(seqs, CPU)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """[rows, vocab] float32 normal logits times `scale`, the same for the same seed."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draw(backend, logits: torch.Tensor, params: list[SamplingParams], seed: int = 1) -> list[int]:
    """One sample op call: a token per row, the engine's generator seeded with `seed`."""
    return backend.sample(logits, metadata(params), torch.Generator().manual_seed(seed)).tolist()


def counts(backend, row: torch.Tensor, params: SamplingParams, n: int,
           seed: int = 7) -> torch.Tensor:
    """[V] float64: how often each token is drawn in n draws from one row (a batch of n copies)."""
    tokens = draw(backend, row.expand(n, -1).contiguous(), [params] * n, seed=seed)
    return torch.bincount(torch.tensor(tokens), minlength=row.numel()).double()
