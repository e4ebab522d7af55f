"""Runners: drive a workload through a target under a load, and record a RunTrace.

A **target** serves benchmark requests and streams their tokens back. `InProcessTarget` is an
AsyncEngine built in this process for one config (one scheduler); it also records every step's
StepStats through the engine's `on_step_finished` hook. `HttpTarget` (fastgen.bench.remote) sends
them to a running OpenAI-compatible server, and the transformers peers (fastgen.bench.peers) to
transformers on the same checkpoint; they implement the same `Target` protocol and record no steps.

A **load** decides when requests are sent: `ClosedLoop(clients)` keeps N clients busy, each
sending its next request when its previous one finishes; `Poisson(rate)` sends requests at
exponentially distributed intervals (a seeded open loop), whether or not earlier ones finished.
Requests are taken in workload order in both cases.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

import numpy as np

from ..config import Config
from ..hookspecs import hookimpl
from ..request import SamplingParams
from .trace import RequestTrace, RunTrace, StepTrace
from .workload import BenchRequest, allowed_token_ids


@dataclass(frozen=True)
class TokenUpdate:
    """One streamed output of a request: how many tokens it has generated so far."""

    num_generated: int
    finished: bool = False
    finish_reason: str | None = None


class Target(Protocol):
    """What a runner sends requests to. `open`/`close` are synchronous (load a model, connect);
    `start`/`stop` run on the run's event loop."""

    name: str
    token_budget: int | None

    def open(self) -> None: ...
    def allowed_token_ids(self) -> np.ndarray: ...
    @property
    def max_model_len(self) -> int: ...
    async def start(self) -> None: ...
    def stream(self, request: BenchRequest, request_id: str) -> AsyncIterator[TokenUpdate]: ...
    def take_steps(self) -> list[StepTrace]:
        """The steps recorded since the last call (times on time.perf_counter's clock), or []."""
        ...
    async def stop(self) -> None: ...
    def close(self) -> None: ...


# --- loads -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClosedLoop:
    """N concurrent clients; each sends its next request when its previous one has finished."""

    clients: int

    @property
    def label(self) -> str:
        return f"{self.clients} client{'s' if self.clients != 1 else ''}"


@dataclass(frozen=True)
class Poisson:
    """Requests arrive at `rate` per second on average, at exponential intervals (seeded)."""

    rate: float
    seed: int = 0

    @property
    def label(self) -> str:
        return f"poisson {self.rate:g} req/s"

    def arrival_offsets(self, n: int) -> list[float]:
        """Send times (s from the start) of n requests; the first goes at 0."""
        rng = np.random.default_rng(self.seed)
        gaps = rng.exponential(1.0 / self.rate, size=n)
        gaps[0] = 0.0
        return np.cumsum(gaps).tolist()


Load = ClosedLoop | Poisson


# --- the in-process target ---------------------------------------------------------------------

class StepRecorder:
    """An in-process plugin: keeps a StepTrace of every engine step (called on the engine thread)."""

    def __init__(self) -> None:
        self.steps: list[StepTrace] = []

    @hookimpl
    def on_step_finished(self, engine, stats) -> None:
        self.steps.append(StepTrace(
            time=time.perf_counter(), num_tokens=stats.num_tokens,
            num_seqs=stats.num_seqs, num_decodes=stats.num_decodes,
            num_preempted=stats.num_preempted, forward_s=stats.forward_s,
            step_s=stats.schedule_s + stats.forward_s + stats.sample_s + stats.postprocess_s))

    def take(self) -> list[StepTrace]:
        steps, self.steps = self.steps, []
        return steps


class InProcessTarget:
    """An Engine and AsyncEngine built in this process from `config`; named for its scheduler.

    The engine gets a plugin manager of its own (the installed plugins plus a StepRecorder), so
    the recorder never outlives the engine or sees another engine's steps.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.scheduler
        self.engine = None
        self.async_engine = None
        self.recorder = StepRecorder()

    def open(self) -> None:
        from ..engine import Engine
        from ..plugin_manager import PluginManager

        plugins = PluginManager()
        plugins.load_entry_points()
        plugins.register(self.recorder, name="bench.step_recorder")
        self.engine = Engine(self.config, plugins=plugins)

    def allowed_token_ids(self) -> np.ndarray:
        return allowed_token_ids(self.engine.tokenizer, self.engine.hf_config.vocab_size)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def token_budget(self) -> int | None:
        """As set, else the engine's default once it is open."""
        if self.engine is not None:
            return self.engine.config.token_budget
        return self.config.token_budget

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    async def start(self) -> None:
        from ..async_engine import AsyncEngine

        self.engine.reset_prefix_cache()   # each load starts with nothing cached
        self.async_engine = AsyncEngine(self.engine).start()

    async def stream(self, request: BenchRequest, request_id: str) -> AsyncIterator[TokenUpdate]:
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
        num_tokens = 0
        async for out in self.async_engine.generate(request.prompt_token_ids, params, request_id,
                                                    delta_outputs=True):
            num_tokens += len(out.new_token_ids)
            yield TokenUpdate(num_tokens, out.finished, out.finish_reason)

    def take_steps(self) -> list[StepTrace]:
        return self.recorder.take()

    async def stop(self) -> None:
        if self.async_engine is not None:
            await self.async_engine.shutdown(timeout=5.0)
            self.async_engine = None

    def close(self) -> None:
        self.engine = None
        gc.collect()


# --- running a load ----------------------------------------------------------------------------

async def _send(target: Target, request: BenchRequest, request_id: str, origin: float) -> RequestTrace:
    trace = RequestTrace(index=request.index, prompt_len=request.prompt_len,
                         max_tokens=request.max_tokens, arrival=time.perf_counter() - origin)
    try:
        async for update in target.stream(request, request_id):
            now = time.perf_counter() - origin
            trace.token_times.extend([now] * (update.num_generated - len(trace.token_times)))
            if update.finished:
                trace.finish, trace.finish_reason = now, update.finish_reason
                if update.finish_reason == "abort":
                    trace.error = "the target aborted the request"
        if trace.finish is None:
            trace.error = "the stream ended before the request finished"
    except Exception as e:  # a failed request is recorded, not fatal to the run
        trace.error = f"{type(e).__name__}: {e}"
    return trace


async def warm_up(target: Target, requests: list[BenchRequest], count: int = 2) -> None:
    """Send `count` of the workload's prompts for 2 tokens each, concurrently; nothing is kept.
    Each is sent reversed, so that no prefix cache holds the start of a prompt the run sends."""
    warm = [BenchRequest(r.index, r.prompt_token_ids[::-1], min(2, r.max_tokens))
            for r in requests[:count]]
    await asyncio.gather(*(_send(target, r, f"warmup-{i}", time.perf_counter())
                           for i, r in enumerate(warm)))
    target.take_steps()


async def run_load(target: Target, requests: list[BenchRequest], load: Load,
                   workload: str = "", on_done: Callable[[RequestTrace], None] | None = None) -> RunTrace:
    """Send every request of the workload under `load`; return what was recorded.

    The target must be started. Steps recorded before the call are dropped. `on_done` is called
    with each request's trace as it ends (a progress bar).
    """
    origin = time.perf_counter()
    target.take_steps()
    run_id = next(_run_ids)
    traces: list[RequestTrace] = []

    async def send(request: BenchRequest) -> None:
        trace = await _send(target, request, f"bench{run_id}-{request.index}", origin)
        traces.append(trace)
        if on_done is not None:
            on_done(trace)

    if isinstance(load, ClosedLoop):
        queue = iter(requests)

        async def client() -> None:
            for request in queue:   # a shared iterator: each request goes to one client
                await send(request)

        await asyncio.gather(*(client() for _ in range(load.clients)))
    else:
        offsets = load.arrival_offsets(len(requests))

        async def arrive(request: BenchRequest, offset: float) -> None:
            delay = origin + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(request)

        await asyncio.gather(*(arrive(r, t) for r, t in zip(requests, offsets)))

    traces.sort(key=lambda r: r.index)
    steps = target.take_steps()
    for step in steps:
        step.time -= origin
    finishes = [r.finish for r in traces if r.finish is not None]
    return RunTrace(target=target.name, load=load.label, workload=workload,
                    token_budget=target.token_budget, requests=traces, steps=steps,
                    wall_s=max(finishes) if finishes else time.perf_counter() - origin)


_run_ids = itertools.count()


async def run_session(target: Target, requests: list[BenchRequest], load: Load,
                      workload: str = "", warmup: int = 2,
                      on_done: Callable[[RequestTrace], None] | None = None) -> RunTrace:
    """Start an opened target, warm it up, run the load, and stop it."""
    await target.start()
    try:
        if warmup:
            await warm_up(target, requests, warmup)
        return await run_load(target, requests, load, workload, on_done)
    finally:
        await target.stop()
