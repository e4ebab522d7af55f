"""Inputs for the sample-op tests: sampling metadata as the engine builds it, logits, draws.

A module of its own, not conftest.py (see kernel_batches.py for why).
"""

from __future__ import annotations

import torch

from fastgen import SamplingParams
from fastgen.kernels import SamplingMetadata
from fastgen.request import Sequence
from kernel_targets import CPU


def metadata(params: list[SamplingParams], device: torch.device = CPU) -> SamplingMetadata:
    """As the engine builds it on `device`: a seeded request gets its own generator there."""
    seqs = []
    for p in params:
        seq = Sequence("r", [0], p)
        if p.seed is not None:
            seq.generator = torch.Generator(device=device).manual_seed(p.seed)
        seqs.append(seq)
    return SamplingMetadata.build(seqs, device)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """[rows, vocab] float32 normal logits times `scale`, the same for the same seed."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draw(backend, logits: torch.Tensor, params: list[SamplingParams], seed: int = 1) -> list[int]:
    """One sample op call on the backend's device, as the engine makes it: a token per row, the
    engine's generator (on that device) seeded with `seed`."""
    device = backend.device
    generator = torch.Generator(device=device).manual_seed(seed)
    return backend.sample(logits.to(device), metadata(params, device), generator).tolist()


def counts(backend, row: torch.Tensor, params: SamplingParams, n: int,
           seed: int = 7) -> torch.Tensor:
    """[V] float64: how often each token is drawn in n draws from one row (a batch of n copies)."""
    tokens = draw(backend, row.expand(n, -1).contiguous(), [params] * n, seed=seed)
    return torch.bincount(torch.tensor(tokens), minlength=row.numel()).double()
