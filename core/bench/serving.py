"""`fastgen bench serve`: every scheduler under every load on the same workloads.

For each workload shape, for each load (client count or arrival rate), each scheduler in turn
(alternating, so a drift in the machine's speed touches every scheduler alike) gets a freshly
built engine, a warm-up, and the same requests. The previous engine is freed first.
"""

from __future__ import annotations

import asyncio
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..config import make_config
from ..errors import ConfigError
from .metrics import SLA, summarize
from .runner import ClosedLoop, InProcessTarget, Load, Poisson, run_session
from .workload import BenchRequest, WorkloadShape, WorkloadSpec, make_workload


@dataclass
class ServeBenchmark:
    """What to run. Engine settings not named here keep their Config defaults."""

    schedulers: list[str]
    loads: list[Load]
    shapes: list[WorkloadShape]
    num_requests: int
    sla: SLA
    token_budget: int
    seed: int = 0
    warmup: int = 2
    engine_settings: dict = field(default_factory=dict)   # model, dtype, threads, ... (Config keys)
    preset: str | None = None


def status(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _make_target(bench: ServeBenchmark, scheduler: str) -> InProcessTarget:
    config = make_config(**bench.engine_settings, scheduler=scheduler, token_budget=bench.token_budget)
    target = InProcessTarget(config)
    target.open()
    return target


def _load_dict(load: Load) -> dict:
    if isinstance(load, ClosedLoop):
        return {"kind": "closed_loop", "clients": load.clients}
    return {"kind": "poisson", "rate": load.rate, "seed": load.seed}


def run_serve_benchmark(bench: ServeBenchmark,
                        progress: Callable[[str], None] = status) -> dict:
    """Run every workload x load x scheduler; return the results (see docs/benchmarks.md)."""
    import torch

    if not bench.schedulers or not bench.loads or not bench.shapes:
        raise ConfigError("Give at least one scheduler, one load and one workload.")
    total = len(bench.shapes) * len(bench.loads) * len(bench.schedulers)
    results: dict = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "preset": bench.preset,
            "engine_settings": dict(bench.engine_settings),
            "token_budget": bench.token_budget,
            "schedulers": list(bench.schedulers),
            "seed": bench.seed,
            "warmup_requests": bench.warmup,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "cpus": _cpu_count(),
        },
        "sla": asdict(bench.sla),
        "workloads": [],
        "runs": [],
    }
    index = 0
    for shape in bench.shapes:
        spec = WorkloadSpec(shape, bench.num_requests, seed=bench.seed)
        requests: list[BenchRequest] | None = None
        for load in bench.loads:
            for scheduler in bench.schedulers:
                index += 1
                where = f"run {index}/{total}: {shape.name}, {scheduler}, {load.label}"
                progress(f"{where}: building the engine")
                target = _make_target(bench, scheduler)
                try:
                    if requests is None:
                        requests = make_workload(spec, target.allowed_token_ids(), target.max_model_len)
                        results["meta"]["model"] = target.model_name
                        results["meta"]["device"] = str(target.engine.device)
                        results["workloads"].append(_workload_dict(spec, requests))
                    progress(f"{where}: {len(requests)} requests")
                    trace = asyncio.run(run_session(target, requests, load, shape.name, bench.warmup))
                finally:
                    target.close()
                summary = summarize(trace, bench.sla)
                failed = summary["requests"] - summary["completed"]
                progress(f"{where}: done in {summary['duration_s']:.1f} s, "
                         f"{summary['request_throughput']:.2f} req/s, "
                         f"{summary['token_throughput']:.1f} tok/s"
                         + (f", {failed} requests FAILED" if failed else ""))
                results["runs"].append({"workload": shape.name, "scheduler": scheduler,
                                        "load": _load_dict(load), "load_label": load.label,
                                        "summary": summary, "trace": trace.to_dict()})
    return results


def _workload_dict(spec: WorkloadSpec, requests: list[BenchRequest]) -> dict:
    return {"name": spec.shape.name, "prompt_mean": spec.shape.prompt_mean,
            "gen_mean": spec.shape.gen_mean, "stdev_ratio": spec.stdev_ratio,
            "num_requests": spec.num_requests, "seed": spec.seed,
            "prompt_lens": [r.prompt_len for r in requests],
            "max_tokens": [r.max_tokens for r in requests]}


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def loads_from(clients: list[int] | None, rates: list[float] | None, seed: int) -> list[Load]:
    if rates:
        if any(r <= 0 for r in rates):
            raise ConfigError(f"Arrival rates must be more than 0, got {rates}.")
        return [Poisson(r, seed) for r in rates]
    if not clients or any(c < 1 for c in clients):
        raise ConfigError(f"Client counts must be at least 1, got {clients}.")
    return [ClosedLoop(c) for c in clients]


def _split(text: str | None, kind: type, flag: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma-separated list of numbers, got {text!r}.") from None


def default_schedulers() -> list[str]:
    """Every installed scheduler, SplitFuse first (the registry is the list, never a typed one)."""
    from ..plugin_manager import load_plugins

    names = list(load_plugins().registry.items["schedulers"])
    return sorted(names, key=lambda n: (n != "splitfuse", names.index(n)))


def benchmark_from_args(args) -> ServeBenchmark:
    """A ServeBenchmark from `fastgen bench serve` flags: the preset, then the flags given."""
    from ..plugin_manager import load_plugins
    from .workload import get_preset

    preset = get_preset(args.preset)
    schedulers = _split(args.schedulers, str, "--schedulers") or default_schedulers()
    registry = load_plugins().registry
    for name in schedulers:
        registry.get("schedulers", name)   # fails early, listing what is installed
    if args.prompt_mean is not None or args.gen_mean is not None:
        first = preset.shapes[0]
        shapes = [WorkloadShape(args.prompt_mean or first.prompt_mean, args.gen_mean or first.gen_mean)]
    else:
        shapes = list(preset.shapes)
    sla = SLA(prompt_rate=args.prompt_sla_rate or preset.prompt_sla_rate,
              gen_rates=tuple(_split(args.gen_sla_rates, float, "--gen-sla-rates") or preset.gen_sla_rates),
              ema_span=args.ema_span)
    if sla.prompt_rate <= 0 or any(r <= 0 for r in sla.gen_rates) or sla.ema_span < 1:
        raise ConfigError("SLA rates must be more than 0 and the EMA span at least 1.")
    engine_settings = {k: getattr(args, k) for k in
                       ("model", "dtype", "device", "kernels", "threads", "max_num_seqs", "kv_cache_gb")
                       if getattr(args, k) is not None}
    return ServeBenchmark(
        schedulers=schedulers,
        loads=loads_from(_split(args.clients, int, "--clients") or list(preset.clients),
                         _split(args.rate, float, "--rate"), args.seed),
        shapes=shapes,
        num_requests=args.requests or preset.num_requests,
        sla=sla,
        token_budget=args.token_budget or preset.token_budget,
        seed=args.seed,
        warmup=args.warmup,
        engine_settings=engine_settings,
        preset=preset.name,
    )
