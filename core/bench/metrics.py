"""Serving metrics: pure functions over a recorded RunTrace.

Definitions (all times in seconds, measured by the client):

- **Duration**: from the first request's arrival to the last request's finish. Request
  throughput is completed requests / duration; token throughput is generated tokens / duration
  (`total_token_throughput` also counts prompt tokens).
- **TTFT** (time to first token): first token's arrival - request's arrival.
- **Per-token latency**: the gap between two consecutive token arrivals of one request; a request
  with n tokens gives n - 1 gaps (its first token is counted by TTFT instead), and tokens that
  arrive in one streamed output have gaps of 0. The distribution pools the gaps of all requests.
- **End-to-end latency**: last output's arrival - request's arrival.
- Percentiles interpolate linearly between the closest ranks (numpy's default).

DeepSpeed-FastGen's **effective throughput** (arXiv 2401.08671, section 4; the definitions
follow its benchmark code, DeepSpeedExamples benchmarks/inference/mii plot_effective_throughput.py):
the rate of requests that meet both SLAs, i.e. request throughput x the share meeting both,
which is (requests meeting both) / duration.

- **Prompt SLA**: TTFT <= |prompt tokens| / prompt_rate (prompt_rate 512 tokens/s in the paper).
- **Generation SLA** at R tokens/s: the exponential moving average of the request's per-token
  latencies stays below 1/R at every token, i.e. the smoothed token rate never drops to R or
  below. The EMA is pandas' `Series.ewm(span=ema_span).mean()` (adjust=True), as in FastGen's
  code, with ema_span 16: for gaps x_1..x_n and a = 1 - 2 / (ema_span + 1),

      ema_t = (x_t + a x_{t-1} + ... + a^(t-1) x_1) / (1 + a + ... + a^(t-1)),

  so ema_1 = x_1 and early tokens are not diluted by a made-up history. A request with a single
  token has no gaps and meets the generation SLA.

A request that did not complete counts in the denominators of the SLA shares and meets neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .trace import RequestTrace, RunTrace, StepTrace


@dataclass(frozen=True)
class SLA:
    prompt_rate: float = 512.0                    # prompt SLA: tokens/s of the TTFT deadline
    gen_rates: tuple[float, ...] = (2.0, 4.0, 6.0)  # generation SLA thresholds, tokens/s
    ema_span: int = 16


# --- building blocks ---------------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linearly interpolated; None when there are no values."""
    values = list(values)
    return float(np.percentile(values, q)) if values else None


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    """Mean, P50, P95 and P99 of `values` (all None when empty)."""
    values = list(values)
    mean = float(np.mean(values)) if values else None
    return {"mean": mean, "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99)}


def ema(values: Iterable[float], span: int) -> list[float]:
    """The adjusted exponential moving average of `values` (pandas ewm(span).mean())."""
    if span < 1:
        raise ValueError(f"The EMA span must be at least 1, got {span}.")
    decay = 1.0 - 2.0 / (span + 1)
    out, num, den = [], 0.0, 0.0
    for x in values:
        num = x + decay * num
        den = 1.0 + decay * den
        out.append(num / den)
    return out


def duration(requests: list[RequestTrace]) -> float:
    """First arrival to last finish; 0 when no request finished."""
    finishes = [r.finish for r in requests if r.finish is not None]
    if not finishes:
        return 0.0
    return max(finishes) - min(r.arrival for r in requests)


def meets_prompt_sla(request: RequestTrace, prompt_rate: float) -> bool:
    return request.completed and request.ttft is not None and \
        request.ttft <= request.prompt_len / prompt_rate


def meets_gen_sla(request: RequestTrace, rate: float, ema_span: int = 16) -> bool:
    if not request.completed:
        return False
    return all(latency < 1.0 / rate for latency in ema(request.token_gaps, ema_span))


def _per_second(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


# --- a run's summary ---------------------------------------------------------------------------

def request_summary(requests: list[RequestTrace], sla: SLA) -> dict:
    """Throughput, latency distributions and SLA attainment of a run's requests."""
    done = [r for r in requests if r.completed]
    seconds = duration(requests)
    n = len(requests)
    prompt_ok = [meets_prompt_sla(r, sla.prompt_rate) for r in requests]
    generation = []
    for rate in sla.gen_rates:
        gen_ok = [meets_gen_sla(r, rate, sla.ema_span) for r in requests]
        both = sum(p and g for p, g in zip(prompt_ok, gen_ok))
        generation.append({
            "rate": rate,
            "missed_share": (n - sum(gen_ok)) / n if n else 0.0,
            "met_both_share": both / n if n else 0.0,
            "effective_throughput": _per_second(both, seconds),
        })
    return {
        "requests": n,
        "completed": len(done),
        "duration_s": seconds,
        "request_throughput": _per_second(len(done), seconds),
        "token_throughput": _per_second(sum(r.num_generated for r in done), seconds),
        "total_token_throughput": _per_second(
            sum(r.num_generated + r.prompt_len for r in done), seconds),
        "ttft_s": distribution(r.ttft for r in done if r.ttft is not None),
        "per_token_latency_s": distribution(g for r in done for g in r.token_gaps),
        "e2e_latency_s": distribution(r.e2e for r in done),
        "prompt_sla": {"rate": sla.prompt_rate,
                       "missed_share": (n - sum(prompt_ok)) / n if n else 0.0},
        "generation_sla": generation,
        "ema_span": sla.ema_span,
    }


def step_summary(steps: list[StepTrace], token_budget: int | None) -> dict:
    """Steps taken, mean tokens per step and mean budget utilisation (tokens / token budget)."""
    count = len(steps)
    mean_tokens = sum(s.num_tokens for s in steps) / count if count else None
    return {
        "count": count,
        "mean_tokens": mean_tokens,
        "budget_utilisation": (mean_tokens / token_budget
                               if mean_tokens is not None and token_budget else None),
        "mean_seqs": sum(s.num_seqs for s in steps) / count if count else None,
        "preemptions": sum(s.num_preempted for s in steps),
        "mean_step_s": sum(s.step_s for s in steps) / count if count else None,
    }


def summarize(trace: RunTrace, sla: SLA) -> dict:
    """All metrics of one run: request-level ones and, when steps were recorded, step-level ones."""
    summary = request_summary(trace.requests, sla)
    summary["steps"] = step_summary(trace.steps, trace.token_budget)
    return summary
