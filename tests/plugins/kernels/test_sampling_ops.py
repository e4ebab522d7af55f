"""The sample op of every backend: greedy and filtered rows exactly, sampled rows by their distribution.

Backends need not draw the same tokens as kernels.torch (their random streams differ), so these
tests check what any correct sampler must do, kernels.torch included, per-request seeds too, on
every device where a backend runs (`triton-cuda`, `torch-cpu`, ...), and on kernels.cuda's kernel
emulated on the CPU (`cuda-emulated`).
Draw counts are a few hundred to a thousand: the Triton interpreter runs one program per row.
"""

from __future__ import annotations

import pytest
import torch

from fastgen import SamplingParams
from kernel_batches import make_backend, target_name, with_emulated_cuda
from kernel_targets import kernel_targets
from sampling_inputs import counts, draw, random_logits

TARGETS = with_emulated_cuda(kernel_targets())


@pytest.fixture(params=TARGETS, ids=[target_name(t) for t in TARGETS])
def backend(request):
    """Every backend on every device where it runs, kernels.torch included: this is the sample
    op's only test suite, and a GPU sampler draws with the engine's GPU generators."""
    return make_backend(*request.param)


# The Triton interpreter runs a program per row, 20-60 ms each: the tests that count hundreds of
# draws take it 7-23 s each, so they run with the slow cases there (CI's separate step), as every
# other target runs them here.
INTERPRETED = ("triton", torch.device("cpu"))


@pytest.fixture(params=[pytest.param(t, id=target_name(t),
                                     marks=[pytest.mark.slow] if t == INTERPRETED else [])
                        for t in TARGETS])
def counting_backend(request):
    """`backend`, for the tests that count many draws."""
    return make_backend(*request.param)


def chi2(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def test_greedy_batch_takes_the_argmax(backend):
    logits = random_logits(16, 50)
    assert draw(backend, logits, [SamplingParams(temperature=0)] * 16) == logits.argmax(-1).tolist()


def test_greedy_rows_take_the_argmax_in_a_mixed_batch(backend):
    logits = random_logits(16, 300, scale=0.1)    # flat: sampled rows rarely hit the argmax
    params = [SamplingParams(temperature=0 if i % 2 else 1.0) for i in range(16)]
    tokens = draw(backend, logits, params)
    argmax = logits.argmax(-1).tolist()
    assert tokens[1::2] == argmax[1::2]
    assert tokens[0::2] != argmax[0::2]           # and the others sample


@pytest.mark.parametrize("mixed", [False, True], ids=["all-greedy", "beside-a-sampled-row"])
def test_greedy_rows_break_ties_at_the_first_token_and_take_0_from_a_row_of_minus_inf(backend, mixed):
    """All-greedy steps take a shortcut in the GPU samplers (one argmax): the same tokens as the
    kernel's greedy rows beside sampled ones."""
    logits = random_logits(4, 50)
    logits[0, [7, 30]] = logits[0].max() + 1.0      # a tie: the first wins
    logits[1] = float("-inf")                       # a row a logits processor banned whole
    logits[2, 49] = logits[2].max() + 1.0           # the last token
    params = [SamplingParams(temperature=0)] * 4 + [SamplingParams(temperature=1.0)] * mixed
    if mixed:
        logits = torch.cat([logits, random_logits(1, 50)])
    assert draw(backend, logits, params)[:4] == [7, 0, 49, logits[3].argmax().item()]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "tiny-top_p"])
def test_filters_that_keep_one_token_are_greedy_at_any_temperature(backend, cut, temperature):
    logits = random_logits(16, 100, scale=0.3)
    params = [SamplingParams(temperature=temperature, **cut)] * 16
    assert draw(backend, logits, params) == logits.argmax(-1).tolist()


def test_top_k_draws_only_from_the_k_best(counting_backend):
    logits = random_logits(1, 64, scale=0.2)[0]
    drawn = counts(counting_backend, logits, SamplingParams(temperature=1.0, top_k=3), 100)
    assert set(drawn.nonzero().flatten().tolist()) == set(logits.topk(3).indices.tolist())


# Probabilities out of order, so a filter that forgets to sort (or to scatter back) shows.
PROBS = torch.tensor([0.04, 0.6, 0.11, 0.15, 0.1])


def test_top_k_and_top_p_keep_the_same_tokens_here(counting_backend):
    # top_k=2 keeps 0.6 and 0.15. top_p=0.7 keeps a token while the mass before it is under 0.7:
    # 0.6 (mass 0), 0.15 (0.6), but not 0.11 (0.75); a cut on the mass up to and including a
    # token would keep 0.6 alone.
    for cut in ({"top_k": 2}, {"top_p": 0.7}):
        drawn = counts(counting_backend, PROBS.log(), SamplingParams(temperature=1.0, **cut), 200)
        assert set(drawn.nonzero().flatten().tolist()) == {1, 3}, cut
        # renormalised in proportion: 0.8 and 0.2 (a uniform pick gives chi2 over 100)
        kept = drawn[[1, 3]]
        assert chi2(kept, torch.tensor([0.8, 0.2])) < 24, (cut, kept.tolist())


# One temperature in the main suite, the others with the slow cases.
@pytest.mark.parametrize("temperature", [pytest.param(0.5, marks=pytest.mark.slow), 1.0,
                                         pytest.param(2.0, marks=pytest.mark.slow)])
def test_draws_follow_the_softmax_at_the_temperature(counting_backend, temperature):
    row = torch.tensor([1.5, 0.45, -0.6])
    drawn = counts(counting_backend, row, SamplingParams(temperature=temperature), 1000)
    # 2 degrees of freedom: P(chi2 > 28) is about 1e-6. Half or twice the temperature gives 45
    # or more at 0.5 and 2.0.
    probs = (row.double() / temperature).softmax(-1)
    assert chi2(drawn, probs) < 28, (drawn.tolist(), (probs * 1000).tolist())


def test_a_request_seed_fixes_its_tokens(counting_backend):
    logits = random_logits(64, 100, scale=0.5)
    seeded = [SamplingParams(temperature=1.0, seed=11)] * 64
    same = [draw(counting_backend, logits, seeded, seed=s) for s in (1, 2)]
    assert same[0] == same[1], "a request seed must fix the tokens whatever the engine's generator"
    assert draw(counting_backend, logits, [SamplingParams(temperature=1.0, seed=12)] * 64) != same[0]
    # Without a request seed, the engine's generator decides.
    unseeded = [draw(counting_backend, logits, [SamplingParams(temperature=1.0)] * 64, seed=s)
                for s in (1, 1, 2)]
    assert unseeded[0] == unseeded[1] != unseeded[2]


def test_a_seeded_row_does_not_depend_on_its_batch(backend):
    logits = random_logits(8, 100, scale=0.5)
    seeded = SamplingParams(temperature=1.0, seed=5)
    alone = [draw(backend, logits[i:i + 1], [seeded])[0] for i in range(8)]
    others = [SamplingParams(temperature=0.7), SamplingParams(temperature=0),
              SamplingParams(temperature=1.5, top_k=3)]
    batch = torch.cat([random_logits(3, 100, seed=9), logits])
    together = draw(backend, batch, others + [seeded] * 8, seed=3)
    assert together[3:] == alone
