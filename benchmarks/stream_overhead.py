"""The host's cost of streaming many requests at once, without a GPU.

    python benchmarks/stream_overhead.py [--streams 64,256] [--gen-len 128] [--through http,engine]
        [--repeat 2] [--markdown FILE] [--json FILE] [--random-model llama-micro] [--device cpu]

On a GPU a decode step of a small model takes a millisecond or two, and everything the host does
per streamed token (schedule, build the batch, append and detokenize, hand the output to its
reader, format and write an SSE event) has to fit beside it, for every stream: at 256 streams,
10 us a token is 2.6 ms a step. This measures that work on the CPU with a random model whose
forward pass costs next to nothing (`llama-micro`, random_checkpoint.py), so the time is the
host's:

- `http`: `fastgen serve` in a subprocess (one torch thread) and N concurrent streaming clients
  of /v1/completions in this process (the serving benchmark's, `fastgen bench serve --url`: the
  tokens counted from each stream's usage chunk); the server's own CPU time (user + system, from
  /proc) per generated token and per step.
- `http-process`: the same with `engine_process` on, the engine's steps in a child process of
  the server (both processes' CPU time counted).
- `engine`: the AsyncEngine in this process, N concurrent `generate(..., delta_outputs=True)`
  readers, no transport: this process's CPU time.
- `engine-process`: the same readers of an EngineProcess (`engine_process`: the steps in a
  child process; both processes' CPU time).

With `--device cuda` (and a real shape, `--random-model smollm2-135m`) the engine runs with its
GPU defaults (bf16, CUDA graphs, overlapped steps): then the forward and sample parts are the
host's launches and its waits for the device, and tokens/s says whether the host or the GPU is
the bound at that many streams.

Each row: generated tokens/s, CPU time per token and per step, the engine's steps, and events
per token (below 1 when readers fell behind and got outputs merged, `AsyncEngine.generate`).
A warm-up of 8 requests comes first; the best of --repeat runs is kept (the least CPU a token).
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

import fastgen
from fastgen.bench.processes import cpu_seconds
from fastgen.plugins.transports.metrics import STEP_PARTS
from offline_throughput import status
from random_checkpoint import SHAPES, temporary_random_checkpoint

WARMUP = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="64,256", help="concurrent requests, comma-separated")
    p.add_argument("--gen-len", type=int, default=128, help="tokens each request generates")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--through", default="http,engine",
                   help="comma-separated: http, http-process, engine, engine-process (the "
                        "-process ones with the engine's steps in a process of their own, "
                        "`engine_process`)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--random-model", default="llama-micro", choices=sorted(SHAPES),
                   help="shape of the random checkpoint (default: llama-micro, a forward pass of "
                        "next to nothing)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--json", default=None, help="also write every run's numbers to this file")
    return p.parse_args(argv)


def engine_counts(metrics_text: str) -> dict[str, float]:
    """Steps and seconds per part, from a server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    counts = dict.fromkeys(("steps", *STEP_PARTS), 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "fastgen_steps_total":
                counts["steps"] += sample.value
            elif sample.name == "fastgen_step_seconds_total":
                counts[sample.labels["part"]] = sample.value
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length)] for _ in range(n)]   # in every shape's vocabulary


def engine_settings(device: str, max_streams: int) -> dict:
    """The Config fields both ways of running set: on a CPU, one torch thread, a fixed budget and
    a small cache, so that the time is the host's; on a GPU, the engine's own defaults."""
    settings = {"device": device, "max_num_seqs": max_streams, "prefix_caching": False}
    if device == "cpu":
        settings.update(threads=1, token_budget=2048, kv_cache_gb=0.5)
    return settings


class HttpRun:
    """`fastgen serve` in a subprocess, streamed to by the serving benchmark's HTTP client
    (`fastgen.bench.remote.HttpTarget`: completions of token-id prompts, the usage chunk's count)."""

    def __init__(self, folder, settings: dict) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = []
        for key, value in settings.items():
            flag = "--" + key.replace("_", "-")
            flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        self.log = tempfile.TemporaryFile("w+")   # a file, not a pipe nobody reads while it runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgen.cli", "serve", "--model", str(folder), "--port",
             str(self.port), *flags], stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.log.close()

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return response.read().decode()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"fastgen serve exited: {self.log.read()[-2000:]}")
            try:
                self._get("/health")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("fastgen serve did not answer /health within 120 s")

    @staticmethod
    async def _stream(target, index: int, prompt: list[int], gen_len: int) -> tuple[int, int]:
        from fastgen.bench.workload import BenchRequest
        tokens = events = 0
        async for update in target.stream(BenchRequest(index, prompt, gen_len), f"r{index}"):
            if update.finished:
                tokens = update.num_generated
            else:
                events += 1   # an SSE event with text
        return tokens, events

    async def measure(self, requests: list[list[int]], gen_len: int) -> dict:
        from fastgen.bench.remote import HttpTarget
        self._wait_ready()
        target = HttpTarget(f"{self.url}/v1", self.folder)
        target.open()
        await target.start()
        try:
            await asyncio.gather(*(self._stream(target, i, p, gen_len)
                                   for i, p in enumerate(requests[:WARMUP])))
            counts = engine_counts(self._get("/metrics"))
            cpu, start = cpu_seconds(self.proc.pid), time.perf_counter()
            done = await asyncio.gather(*(self._stream(target, i, p, gen_len)
                                          for i, p in enumerate(requests)))
            wall = time.perf_counter() - start
            cpu = cpu_seconds(self.proc.pid) - cpu
            after = engine_counts(self._get("/metrics"))
        finally:
            await target.stop()
        return result(done, wall, cpu, {k: after[k] - counts[k] for k in counts})


class StepTotals:
    """An observer of one engine: its steps and the seconds of each part."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.counts = dict.fromkeys(("steps", *STEP_PARTS), 0.0)

    @fastgen.hookimpl
    def on_step_finished(self, engine, stats) -> None:
        if engine is self.engine and stats.num_tokens:
            self.counts["steps"] += 1
            for part in STEP_PARTS:
                self.counts[part] += getattr(stats, f"{part}_s")


class EngineRun:
    """The AsyncEngine in this process, read by coroutines; with `engine_process`, an
    EngineProcess (the engine's steps in a child process, both processes' CPU time counted)."""

    def __init__(self, folder, settings: dict) -> None:
        from fastgen.async_engine import AsyncEngine
        from fastgen.config import Config
        from fastgen.engine import Engine
        from fastgen.engine_process import EngineProcess
        config = Config(model=str(folder), **settings)
        self.async_engine = (EngineProcess(config) if config.engine_process
                             else AsyncEngine(Engine(config))).start()
        self.totals = StepTotals(self.async_engine.engine)
        self.async_engine.engine.plugins.register(self.totals, name="stream-overhead-totals")

    def close(self) -> None:
        self.async_engine.engine.plugins.unregister("stream-overhead-totals")
        asyncio.run(self.async_engine.shutdown(timeout=5))

    @staticmethod
    async def _stream(async_engine, prompt: list[int], gen_len: int) -> tuple[int, int]:
        from fastgen import SamplingParams
        params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
        tokens = events = 0
        async for out in async_engine.generate(prompt, params, delta_outputs=True):
            tokens += len(out.new_token_ids)
            events += 1
        return tokens, events

    async def measure(self, requests: list[list[int]], gen_len: int) -> dict:
        async_engine = self.async_engine
        await asyncio.gather(*(self._stream(async_engine, p, gen_len) for p in requests[:WARMUP]))
        counts, cpu, start = dict(self.totals.counts), cpu_seconds(os.getpid()), time.perf_counter()
        done = await asyncio.gather(*(self._stream(async_engine, p, gen_len) for p in requests))
        wall, cpu = time.perf_counter() - start, cpu_seconds(os.getpid()) - cpu
        after = self.totals.counts
        return result(done, wall, cpu, {k: after[k] - counts[k] for k in counts})


RUNS = {"http": (HttpRun, {}), "http-process": (HttpRun, {"engine_process": True}),
        "engine": (EngineRun, {}), "engine-process": (EngineRun, {"engine_process": True})}


def result(done: list[tuple[int, int]], wall: float, cpu: float, engine: dict[str, float]) -> dict:
    """What a run did and where its CPU time went, per token and per step. The engine's host work
    is its schedule and postprocess parts; its forward and sample parts are what a GPU computes;
    what is left of the CPU time is outside the engine's steps: handing outputs to their readers,
    the readers, the transport."""
    tokens, events, steps = sum(t for t, _ in done), sum(e for _, e in done), max(int(engine["steps"]), 1)
    host = engine["schedule"] + engine["postprocess"]
    outside = cpu - sum(engine[part] for part in STEP_PARTS)
    return {"tokens": tokens, "events": events, "steps": steps, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / wall, "cpu_us_per_token": cpu / tokens * 1e6,
            "engine_host_us_per_token": host / tokens * 1e6,
            "outside_us_per_token": outside / tokens * 1e6,
            "cpu_ms_per_step": cpu / steps * 1e3, "engine_host_ms_per_step": host / steps * 1e3,
            "events_per_token": events / tokens, "engine_s": engine}


def table_row(through: str, n: int, runs: list[dict]) -> str:
    r = min(runs, key=lambda run: run["cpu_us_per_token"])
    return (f"| {through} | {n} | {r['tokens_per_s']:.0f} | {r['cpu_us_per_token']:.1f} us | "
            f"{r['engine_host_us_per_token']:.1f} us | {r['outside_us_per_token']:.1f} us | "
            f"{r['cpu_ms_per_step']:.2f} ms | {r['engine_host_ms_per_step']:.2f} ms | "
            f"{r['steps']} | {r['events_per_token']:.2f} |")


def main(argv=None) -> int:
    """Each row is printed, and the files written, as soon as it is measured: a run cut short (the
    GPU script's time limit) keeps the rows it finished."""
    args = parse_args(argv)
    streams = [int(n) for n in args.streams.split(",")]
    throughs = args.through.split(",")
    unknown = set(throughs) - set(RUNS)
    if unknown:
        raise SystemExit(f"--through: unknown {sorted(unknown)}; use {', '.join(RUNS)}")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    settings = engine_settings(args.device, max(streams))
    lines = [f"## Host cost of streaming (random {args.random_model} on {args.device}, {args.prompt_len}-token prompts, "
             f"{args.gen_len} tokens each, best of {args.repeat}, {time.strftime('%Y-%m-%d %H:%M')})",
             "", "CPU time per generated token: all of it, the engine's host work (schedule and "
             "postprocess), and what is outside the engine's steps (handing outputs over, readers, "
             "transport); and per step.", "",
             "| through | streams | tokens/s | CPU | engine host | outside steps | CPU per step | "
             "engine host per step | steps | events per token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    rows = []

    def add_row(through: str, n: int, runs: list[dict]) -> None:
        rows.append((through, n, runs))
        lines.append(table_row(through, n, runs))
        print(lines[-1], flush=True)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n".join(lines) + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"settings": vars(args), "engine": settings,
                           "runs": [{"through": t, "streams": n, "runs": runs} for t, n, runs in rows]},
                          f, indent=1)

    with temporary_random_checkpoint(args.random_model, dtype, args.device) as folder:
        for through in throughs:
            run_cls, extra = RUNS[through]
            run = run_cls(folder, {**settings, **extra})
            try:
                for n in streams:
                    requests = prompts(n, args.prompt_len, seed=n)
                    runs = []
                    for i in range(args.repeat):
                        status(f"{through}, {n} streams, run {i + 1} of {args.repeat}")
                        runs.append(asyncio.run(run.measure(requests, args.gen_len)))
                    add_row(through, n, runs)
            finally:
                run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
