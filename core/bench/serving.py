"""`fastgen bench serve`: every target under every load on the same workloads.

A **target** is one row group of the table: a scheduler of fastgen's engine built in this process,
a running OpenAI-compatible server (`--url`), or a peer (transformers on the same checkpoint).
For each workload shape, for each load (client count or arrival rate), each target in turn
(alternating, so a drift in the machine's speed touches every target alike) is freshly built,
warmed up and given the same requests. The previous target is freed first.
"""

from __future__ import annotations

import asyncio
import importlib.util
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..config import make_config
from ..errors import ConfigError
from .metrics import SLA, summarize
from .peers import PEERS, TransformersContinuousTarget, TransformersGenerateTarget
from .remote import HttpTarget
from .runner import ClosedLoop, InProcessTarget, Load, Poisson, Target, run_session
from .workload import BenchRequest, WorkloadShape, WorkloadSpec, make_workload


@dataclass
class ServeBenchmark:
    """What to run. Engine settings not named here keep their Config defaults.

    With `url`, the server there is the one fastgen target (its scheduler is its own) and
    `schedulers` must be empty; `peers` run in this process either way.
    """

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
    url: str | None = None
    served_model: str | None = None
    api_key: str | None = None
    peers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TargetSpec:
    """One target of the benchmark: its name in the table, its kind, and how to build it for a run."""

    name: str
    kind: str                                  # "fastgen" (in process), "url" or "peer"
    make: Callable[[Load, list[BenchRequest] | None], Target]   # unopened; requests when known
    scheduler: str | None = None


def status(message: str) -> None:
    """A progress line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def _checkpoint_folder(bench: ServeBenchmark):
    from ..checkpoint import resolve_checkpoint

    settings = bench.engine_settings
    return resolve_checkpoint(settings.get("model"), settings.get("cache_dir"),
                              settings.get("dtype", "float32"))


def _batch_cap(load: Load, bench: ServeBenchmark) -> int:
    """Most requests a peer serves at once: the client count, else the engine's max_num_seqs
    (as set, or the default on the engine's device)."""
    from ..engine import default_max_num_seqs, resolve_device

    settings = bench.engine_settings
    limit = settings.get("max_num_seqs") or default_max_num_seqs(
        resolve_device(settings.get("device", "auto")))
    return min(load.clients, limit) if isinstance(load, ClosedLoop) else limit


def target_specs(bench: ServeBenchmark) -> list[TargetSpec]:
    """The targets of a benchmark, in the order each load runs them."""
    specs = []
    for scheduler in bench.schedulers:
        def in_process(load, requests, scheduler=scheduler):
            return InProcessTarget(make_config(**bench.engine_settings, scheduler=scheduler,
                                               token_budget=bench.token_budget))
        specs.append(TargetSpec(scheduler, "fastgen", in_process, scheduler))
    if bench.url:
        specs.append(TargetSpec(bench.url, "url", lambda load, requests: HttpTarget(
            bench.url, _checkpoint_folder(bench), bench.served_model, bench.api_key)))
    if "transformers" in bench.peers:
        settings = bench.engine_settings
        dtype, threads = settings.get("dtype", "float32"), settings.get("threads")
        specs.append(TargetSpec(TransformersGenerateTarget.name, "peer", lambda load, requests:
                                TransformersGenerateTarget(_checkpoint_folder(bench), dtype, threads,
                                                           max_batch=_batch_cap(load, bench))))
        if importlib.util.find_spec("transformers.generation.continuous_batching") is not None:
            def continuous(load, requests):
                longest = max((r.prompt_len + r.max_tokens for r in requests), default=2048)
                return TransformersContinuousTarget(
                    _checkpoint_folder(bench), dtype, threads, max_requests=_batch_cap(load, bench),
                    token_budget=bench.token_budget, max_seq_len=longest)
            specs.append(TargetSpec(TransformersContinuousTarget.name, "peer", continuous))
        else:
            status("this transformers has no continuous batching: its peer row is left out")
    return specs


def _load_dict(load: Load) -> dict:
    if isinstance(load, ClosedLoop):
        return {"kind": "closed_loop", "clients": load.clients}
    return {"kind": "poisson", "rate": load.rate, "seed": load.seed}


def run_serve_benchmark(bench: ServeBenchmark, show_progress: bool = True) -> dict:
    """Run every workload x load x target; return the results (see docs/benchmarks.md).

    With `show_progress`, each run draws a progress bar of its requests on stderr.
    """
    import torch
    from tqdm import tqdm

    specs = target_specs(bench)
    if not specs or not bench.loads or not bench.shapes:
        raise ConfigError("Give at least one scheduler (or --url), one load and one workload.")
    total = len(bench.shapes) * len(bench.loads) * len(specs)
    results: dict = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "preset": bench.preset,
            "engine_settings": dict(bench.engine_settings),
            "token_budget": bench.token_budget,
            "schedulers": list(bench.schedulers),
            "url": bench.url,
            "peers": list(bench.peers),
            "targets": [{"name": s.name, "kind": s.kind} for s in specs],
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
            for target_spec in specs:
                index += 1
                where = f"run {index}/{total}: {shape.name}, {target_spec.name}, {load.label}"
                if show_progress:
                    status(f"{where}: building the target")
                target = target_spec.make(load, requests)
                target.open()
                # Other work on the machine slows a run down: each run says how busy it was.
                load_before = _load_average()
                try:
                    if requests is None:
                        # The first target's vocabulary and length limit make the workload for all.
                        requests = make_workload(spec, target.allowed_token_ids(), target.max_model_len)
                        results["meta"]["model"] = target.model_name
                        if isinstance(target, InProcessTarget):
                            results["meta"]["device"] = str(target.engine.device)
                        results["workloads"].append(_workload_dict(spec, requests))
                    with tqdm(total=len(requests), desc=f"{target_spec.name}, {load.label}", unit="req",
                              file=sys.stderr, disable=not show_progress, leave=False) as bar:
                        trace = asyncio.run(run_session(target, requests, load, shape.name, bench.warmup,
                                                        on_done=lambda _: bar.update()))
                finally:
                    target.close()
                load_average = [load_before, _load_average()]
                summary = summarize(trace, bench.sla)
                failed = summary["requests"] - summary["completed"]
                if show_progress:
                    status(f"{where}: done in {summary['duration_s']:.1f} s, "
                           f"{summary['request_throughput']:.2f} req/s, "
                           f"{summary['token_throughput']:.1f} tok/s"
                           + (f", load average {load_average[0]:.1f} -> {load_average[1]:.1f}"
                              if None not in load_average else "")
                           + (f", {failed} requests FAILED (first: {_first_error(trace)})" if failed else ""))
                results["runs"].append({"workload": shape.name, "target": target_spec.name,
                                        "kind": target_spec.kind, "scheduler": target_spec.scheduler,
                                        "load": _load_dict(load), "load_label": load.label,
                                        "load_average": load_average,
                                        "summary": summary, "trace": trace.to_dict()})
    return results


def _first_error(trace) -> str | None:
    return next((r.error for r in trace.requests if r.error), None)


def _workload_dict(spec: WorkloadSpec, requests: list[BenchRequest]) -> dict:
    return {"name": spec.shape.name, "prompt_mean": spec.shape.prompt_mean,
            "gen_mean": spec.shape.gen_mean, "stdev_ratio": spec.stdev_ratio,
            "num_requests": spec.num_requests, "seed": spec.seed,
            "prompt_lens": [r.prompt_len for r in requests],
            "max_tokens": [r.max_tokens for r in requests]}


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


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
    if args.url and args.schedulers:
        raise ConfigError("--schedulers runs fastgen in this process; a server at --url runs its own "
                          "scheduler, so give one of the two.")
    schedulers = [] if args.url else _split(args.schedulers, str, "--schedulers") or default_schedulers()
    peers = _split(args.peers, str, "--peers") or []
    for peer in peers:
        if peer not in PEERS:
            raise ConfigError(f"Unknown peer {peer!r}; the peers are: {', '.join(PEERS)}.")
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
        url=args.url,
        served_model=args.served_model,
        api_key=args.api_key,
        peers=peers,
    )
