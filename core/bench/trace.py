"""What a benchmark run records: per request, when each token arrived; per step, its StepStats.

Plain data, written by a runner (fastgen.bench.runner) and read by the metrics
(fastgen.bench.metrics). Times are seconds from the start of the run, on one monotonic clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestTrace:
    """One request as its client saw it.

    `token_times[i]` is when the client received generated token i. Several tokens can arrive in
    one streamed output; each of them gets that output's arrival time.
    """

    index: int                       # position in the workload
    prompt_len: int
    max_tokens: int                  # tokens the request asked for (ignore_eos: it gets them all)
    arrival: float                   # when the client sent it
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None      # when the last output arrived; None if it never finished
    finish_reason: str | None = None
    error: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_times)

    @property
    def completed(self) -> bool:
        return self.finish is not None and self.error is None

    @property
    def ttft(self) -> float | None:
        """Time to first token: from sending the request to receiving its first token."""
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: from sending the request to receiving its last output."""
        return self.finish - self.arrival if self.finish is not None else None

    @property
    def token_gaps(self) -> list[float]:
        """Per-token latencies: the gaps between consecutive token arrivals (0 within one output)."""
        t = self.token_times
        return [t[i] - t[i - 1] for i in range(1, len(t))]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepTrace:
    """One engine step, from the engine's `on_step_finished` hook."""

    time: float                      # when the step finished
    num_tokens: int
    num_seqs: int
    num_decodes: int
    num_preempted: int
    forward_s: float
    step_s: float                    # schedule + forward + sample + postprocess

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunTrace:
    """Everything one run recorded: one target (scheduler), one load, one workload."""

    target: str                      # e.g. "splitfuse" (in-process) or a server URL later
    load: str                        # e.g. "4 clients" or "poisson 2.0 req/s"
    workload: str                    # e.g. "p520g12"
    token_budget: int | None         # the engine's token budget, when known
    requests: list[RequestTrace] = field(default_factory=list)
    steps: list[StepTrace] = field(default_factory=list)
    wall_s: float = 0.0              # from the run's start to its last request's end

    def to_dict(self) -> dict:
        return {"target": self.target, "load": self.load, "workload": self.workload,
                "token_budget": self.token_budget, "wall_s": self.wall_s,
                "requests": [r.to_dict() for r in self.requests],
                "steps": [s.to_dict() for s in self.steps]}
