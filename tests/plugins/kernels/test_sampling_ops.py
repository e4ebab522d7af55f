"""The sample op of every backend: greedy and filtered rows exactly, sampled rows by their distribution.

Sampling backends need not draw the same tokens as kernels.torch (their random streams differ), so
these tests check what any correct sampler must do, including per-request seeds.
"""

from __future__ import annotations

import pytest
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


def logits_of(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draw(backend, logits, params, seed: int = 1) -> list[int]:
    return backend.sample(logits, metadata(params), torch.Generator().manual_seed(seed)).tolist()


def test_greedy_rows_take_the_argmax_in_a_mixed_batch(backend):
    logits = logits_of(12, 300)
    params = [SamplingParams(temperature=0 if i % 2 else 1.0) for i in range(12)]
    tokens = draw(backend, logits, params)
    assert tokens[1::2] == logits.argmax(-1).tolist()[1::2]


@pytest.mark.parametrize("params", [SamplingParams(temperature=5.0, top_k=1),
                                    SamplingParams(temperature=5.0, top_p=1e-6)],
                         ids=["top_k=1", "tiny-top_p"])
def test_filters_that_keep_one_token_are_greedy(backend, params):
    logits = logits_of(16, 100, scale=0.3)
    assert draw(backend, logits, [params] * 16) == logits.argmax(-1).tolist()


def test_top_k_draws_only_from_the_k_best(backend):
    logits = logits_of(1, 64, scale=0.2).expand(100, -1).contiguous()
    tokens = draw(backend, logits, [SamplingParams(temperature=1.0, top_k=3)] * 100)
    assert set(tokens) == set(logits[0].topk(3).indices.tolist())


def test_top_p_draws_only_from_the_nucleus(backend):
    # Probabilities 0.4, 0.3, 0.2, 0.1: with top_p 0.6 the nucleus is the first two (0.4 < 0.6).
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(100, -1).contiguous()
    tokens = draw(backend, logits, [SamplingParams(temperature=1.0, top_p=0.6)] * 100)
    assert set(tokens) == {0, 1}


def test_draws_follow_the_softmax_at_the_temperature(backend):
    # Few draws (the interpreter runs one program per row), so probabilities far apart: at
    # temperature 1 instead of 0.5 they would be (0.67, 0.24, 0.09), not (0.87, 0.12, 0.02).
    row = torch.tensor([2.0, 1.0, 0.0])
    n, temperature = 300, 0.5
    tokens = draw(backend, row.expand(n, -1).contiguous(), [SamplingParams(temperature=temperature)] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / n
    # 3.5 standard errors of the largest probability at n = 300 is about 0.07.
    torch.testing.assert_close(freq, (row / temperature).softmax(-1), atol=0.07, rtol=0)


def test_a_seed_gives_the_same_tokens_wherever_its_row_is(backend):
    logits = logits_of(1, 200, scale=0.5)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = [draw(backend, logits, [seeded], seed=s)[0] for s in (1, 2)]
    batch = torch.cat([logits_of(3, 200, seed=5, scale=0.5), logits]).contiguous()
    among_others = draw(backend, batch, [SamplingParams(temperature=1.0)] * 3 + [seeded], seed=3)
    assert alone[0] == alone[1] == among_others[3]
    # And the seed matters: other seeds draw other tokens from this flat distribution.
    others = {draw(backend, logits, [SamplingParams(temperature=1.0, seed=s)])[0] for s in range(8)}
    assert len(others) > 1
