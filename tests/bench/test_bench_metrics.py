"""Serving metrics on synthetic traces whose answers are worked out by hand."""

from __future__ import annotations

import pytest

from fastgen.bench.metrics import (SLA, distribution, duration, ema, meets_gen_sla, meets_prompt_sla,
                                   percentile, request_summary, step_summary, summarize)
from fastgen.bench.trace import RequestTrace, RunTrace, StepTrace


def trace(index, prompt_len, arrival, token_times, error=None):
    return RequestTrace(index=index, prompt_len=prompt_len, max_tokens=len(token_times),
                        arrival=arrival, token_times=list(token_times),
                        finish=None if error else token_times[-1], error=error)


# Prompt SLA at 100 tokens/s; generation SLA at 2 tokens/s (EMA of gaps below 0.5 s) and 1 token/s.
# The EMA span is 3, so its decay is 1 - 2/4 = 0.5.
SLA_HAND = SLA(prompt_rate=100.0, gen_rates=(2.0, 1.0), ema_span=3)
MEETS_BOTH = trace(0, 100, 0.0, [0.5, 0.7, 0.9, 1.1])           # TTFT 0.5 <= 1.0; gaps 0.2
MISSES_PROMPT = trace(1, 50, 0.0, [0.8, 1.0, 1.2])              # TTFT 0.8 > 0.5; gaps 0.2
MISSES_GENERATION = trace(2, 200, 1.0, [1.5, 1.6, 2.6, 2.7])    # TTFT 0.5 <= 2.0; gaps 0.1, 1.0, 0.1
HAND = [MEETS_BOTH, MISSES_PROMPT, MISSES_GENERATION]


def test_ema_is_the_adjusted_exponential_moving_average():
    # decay 0.5: (0.1), (0.3 + 0.05) / 1.5, (0.5 + 0.5 * 0.35) / (1 + 0.5 * 1.5)
    assert ema([0.1, 0.3, 0.5], span=3) == pytest.approx([0.1, 0.35 / 1.5, 0.675 / 1.75])
    assert ema([0.4, 0.2, 0.9], span=1) == pytest.approx([0.4, 0.2, 0.9])   # span 1: no memory
    assert ema([], span=16) == []
    values = [0.3, 0.1, 0.7, 0.2, 0.2]
    a = 1 - 2 / 17
    closed_form = sum(a ** (4 - i) * x for i, x in enumerate(values)) / sum(a ** i for i in range(5))
    assert ema(values, span=16)[-1] == pytest.approx(closed_form)


def test_percentiles_interpolate_linearly():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)   # rank 0.95 * 3 = 2.85
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([], 50) is None
    assert distribution([1, 2, 3, 4]) == pytest.approx({"mean": 2.5, "p50": 2.5, "p95": 3.85, "p99": 3.97})
    assert distribution([]) == {"mean": None, "p50": None, "p95": None, "p99": None}


def test_each_sla_on_its_own():
    assert meets_prompt_sla(MEETS_BOTH, 100.0) and meets_gen_sla(MEETS_BOTH, 2.0, 3)
    assert not meets_prompt_sla(MISSES_PROMPT, 100.0) and meets_gen_sla(MISSES_PROMPT, 2.0, 3)
    # gaps 0.1, 1.0, 0.1 -> EMA 0.1, 0.7, 0.357: above 0.5 s at the second gap, below 1.0 s throughout.
    assert ema(MISSES_GENERATION.token_gaps, 3) == pytest.approx([0.1, 0.7, 0.625 / 1.75])
    assert meets_prompt_sla(MISSES_GENERATION, 100.0)
    assert not meets_gen_sla(MISSES_GENERATION, 2.0, 3) and meets_gen_sla(MISSES_GENERATION, 1.0, 3)
    # The prompt deadline is inclusive; the generation threshold is strict (as in FastGen's code).
    assert meets_prompt_sla(trace(3, 50, 0.0, [0.5]), 100.0)
    assert not meets_gen_sla(trace(4, 10, 0.0, [0.1, 0.6]), 2.0, 3)
    assert meets_gen_sla(trace(5, 10, 0.0, [0.1]), 2.0, 3)       # one token: no gaps


def test_request_summary_by_hand():
    s = request_summary(HAND, SLA_HAND)
    assert duration(HAND) == pytest.approx(2.7)                   # first arrival 0.0, last finish 2.7
    assert s["requests"] == s["completed"] == 3
    assert s["request_throughput"] == pytest.approx(3 / 2.7)
    assert s["token_throughput"] == pytest.approx(11 / 2.7)
    assert s["total_token_throughput"] == pytest.approx((11 + 350) / 2.7)
    assert s["ttft_s"] == pytest.approx({"mean": 0.6, "p50": 0.5, "p95": 0.77, "p99": 0.794})
    # gaps pooled: 0.1 0.1 0.2 0.2 0.2 0.2 0.2 1.0; P95 at rank 6.65, P99 at rank 6.93
    assert s["per_token_latency_s"] == pytest.approx(
        {"mean": 2.2 / 8, "p50": 0.2, "p95": 0.2 + 0.65 * 0.8, "p99": 0.2 + 0.93 * 0.8})
    assert s["e2e_latency_s"]["p50"] == pytest.approx(1.2)         # 1.1, 1.2, 1.7
    assert s["prompt_sla"] == pytest.approx({"rate": 100.0, "missed_share": 1 / 3})
    at2, at1 = s["generation_sla"]
    assert at2 == pytest.approx({"rate": 2.0, "missed_share": 1 / 3, "met_both_share": 1 / 3,
                                 "effective_throughput": 1 / 2.7})
    assert at1 == pytest.approx({"rate": 1.0, "missed_share": 0.0, "met_both_share": 2 / 3,
                                 "effective_throughput": 2 / 2.7})


def test_tokens_that_arrive_together_have_zero_gaps():
    r = trace(0, 10, 0.0, [1.0, 1.0, 1.3])
    assert r.token_gaps == pytest.approx([0.0, 0.3])
    assert r.ttft == pytest.approx(1.0) and r.e2e == pytest.approx(1.3)


def test_a_failed_request_meets_no_sla_and_is_not_throughput():
    failed = trace(3, 10, 0.5, [0.6], error="RuntimeError: boom")
    s = request_summary(HAND + [failed], SLA_HAND)
    assert s["requests"] == 4 and s["completed"] == 3
    assert s["request_throughput"] == pytest.approx(3 / 2.7)
    assert s["prompt_sla"]["missed_share"] == pytest.approx(2 / 4)
    assert s["generation_sla"][1]["missed_share"] == pytest.approx(1 / 4)
    assert s["generation_sla"][1]["effective_throughput"] == pytest.approx(2 / 2.7)


def test_step_summary():
    steps = [StepTrace(time=t, num_tokens=n, num_seqs=q, num_decodes=0, num_preempted=p,
                       forward_s=0.1, step_s=0.2)
             for t, n, q, p in [(0.1, 512, 2, 0), (0.2, 256, 4, 1), (0.3, 4, 4, 0)]]
    s = step_summary(steps, token_budget=512)
    assert s == pytest.approx({"count": 3, "mean_tokens": 772 / 3, "budget_utilisation": 772 / 3 / 512,
                               "mean_seqs": 10 / 3, "preemptions": 1, "mean_step_s": 0.2})
    assert step_summary([], 512)["budget_utilisation"] is None
    run = RunTrace(target="splitfuse", load="1 client", workload="p1g1", token_budget=512,
                   requests=HAND, steps=steps)
    assert summarize(run, SLA_HAND)["steps"]["count"] == 3
