"""The `fastgen` command: serve | generate | bench | plugins."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import Config, add_config_arguments, config_from_args
from .errors import FastgenError, PluginError
from .plugin_manager import KINDS, load_plugins

# `--plugin KIND.NAME` sets the Config field that selects a plugin of that kind.
_PLUGIN_FIELDS = {"kernels": "kernels", "schedulers": "scheduler", "transports": "transport"}


def _apply_plugin_flags(args: argparse.Namespace) -> None:
    registry = load_plugins().registry
    for full_name in args.plugin or []:
        kind, _, name = full_name.partition(".")
        if kind == "models":
            raise FastgenError(f"{full_name}: model plugins are chosen by the checkpoint's "
                               f"architecture, not by --plugin.")
        if kind not in _PLUGIN_FIELDS or not name:
            raise FastgenError(f"--plugin takes KIND.NAME with KIND one of "
                               f"{', '.join(_PLUGIN_FIELDS)}; got {full_name!r}.")
        registry.get(kind, name)  # fails early, listing what is installed
        setattr(args, _PLUGIN_FIELDS[kind], name)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings")
    parser.add_argument("--plugin", action="append", metavar="KIND.NAME",
                        help="select a plugin for its kind, e.g. kernels.torch (repeatable)")
    add_config_arguments(parser)


def _build_config(args: argparse.Namespace) -> Config:
    _apply_plugin_flags(args)
    return config_from_args(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .async_engine import AsyncEngine
    from .engine import Engine

    config = _build_config(args)
    transport_cls = load_plugins().registry.get("transports", config.transport).cls
    if config.engine_process:
        from .engine_process import EngineProcess

        async_engine = EngineProcess(config)
        print(async_engine.engine.summary, file=sys.stderr)
    else:
        engine = Engine(config)
        print(serving_summary(engine), file=sys.stderr)
        async_engine = AsyncEngine(engine)
    transport_cls(async_engine.start(), config).run()
    return 0


def serving_summary(engine) -> str:
    """One line of what the engine runs, the defaults resolved: the backend `kernels = auto`
    chose, the dtype, the KV cache's size, the step sizes, and whether steps replay from graphs
    and overlap."""
    config = engine.config
    cache_gib = sum(k.nbytes + v.nbytes for k, v in engine.kv_cache) / 2**30
    graphs = "CUDA graphs" if engine.step_graphs is not None else "eager steps"
    overlap = "overlapped" if engine.overlap_steps else "in turn"
    if config.engine_process:
        overlap += ", in an engine process"
    return (f"fastgen: serving {engine.model_name} with transports.{config.transport}, "
            f"kernels.{engine.backend.name}, schedulers.{config.scheduler} on {engine.device} in "
            f"{str(engine.dtype).removeprefix('torch.')} ({engine.allocator.num_blocks} KV blocks of "
            f"{config.block_size} tokens, {cache_gib:.2f} GiB; steps of {config.token_budget} "
            f"tokens and {config.max_num_seqs} sequences at most, {graphs}, {overlap})")


def cmd_generate(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .request import SamplingParams
    from .tokenizer import apply_chat_template

    config = _build_config(args)
    llm = LLM(**{f: getattr(config, f) for f in config.__struct_fields__})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed_request,
                            stop=args.stop or [], ignore_eos=args.ignore_eos)
    use_chat = args.chat if args.chat is not None else bool(getattr(llm.tokenizer, "chat_template", None))
    prompt = (apply_chat_template(llm.tokenizer, [{"role": "user", "content": args.prompt}])
              if use_chat else args.prompt)
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    elapsed = time.perf_counter() - start
    print(out.text)
    print(f"[{len(out.token_ids)} tokens in {elapsed:.2f} s, finish_reason={out.finish_reason}]",
          file=sys.stderr)
    return 0


def _plugin_rows() -> list[dict]:
    from .engine import resolve_device

    manager = load_plugins()
    device = resolve_device("auto")
    rows = []
    for info in manager.registry.all():
        check = getattr(info.cls, "unavailable_reason", None)
        reason = check(device) if check else None
        rows.append({"kind": info.kind, "name": info.full_name, "package": info.package,
                     "available": reason is None, "reason": reason or ""})
    for name, message in manager.registry.import_errors.items():
        rows.append({"kind": name.partition(".")[0], "name": name, "package": "?",
                     "available": False, "reason": message})
    return rows


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = _plugin_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in ("kind", "name", "package")}
    header = "  ".join(k.upper().ljust(widths[k]) for k in widths) + "  AVAILABLE"
    print(header)
    for kind in KINDS:
        for r in (r for r in rows if r["kind"] == kind):
            status = "yes" if r["available"] else f"no: {r['reason']}"
            print("  ".join(str(r[k]).ljust(widths[k]) for k in widths) + "  " + status)
    print(f"\nkernels = auto (the default) runs {_auto_kernels()}")
    return 0


def _auto_kernels() -> str:
    from .engine import resolve_device
    from .kernels import choose_auto

    device = resolve_device("auto")
    classes = [i.cls for i in load_plugins().registry.items["kernels"].values()]
    try:
        return f"kernels.{choose_auto(classes, device).name} on {device}"
    except PluginError as e:
        return f"nothing on {device}: {e}"


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench.report import format_table
    from .bench.serving import benchmark_from_args, run_serve_benchmark

    bench = benchmark_from_args(args)
    results = run_serve_benchmark(bench, show_progress=not args.no_progress)
    results["meta"]["args"] = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"fastgen: results written to {args.json}", file=sys.stderr)
    if args.plot:
        from .bench.plot import plot_results

        plot_results(results, args.plot)
        print(f"fastgen: plot written to {args.plot}", file=sys.stderr)
    return 0


def _bench_parser(sub) -> None:
    from .bench.workload import PRESETS

    bench = sub.add_parser("bench", help="benchmark the engine")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = bench_sub.add_parser(
        "serve", help="serving benchmark: every scheduler under the same load (see docs/benchmarks.md)",
        description="Run every scheduler x load on the same random-token workload in this process (or "
                    "through a server at --url, and transformers with --peers); print one table (stdout) "
                    "and, with --json, write everything. Progress goes to stderr.")
    serve.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                       help="workload shapes, request count, budget, clients and SLAs to start from "
                            "(default: cpu); the flags below override it")
    serve.add_argument("--schedulers", metavar="A,B", help="schedulers to compare (default: all installed)")
    serve.add_argument("--clients", metavar="N,M", help="closed-loop client counts (default: the preset's)")
    serve.add_argument("--rate", metavar="R,S",
                       help="Poisson arrival rates in requests/s, instead of closed-loop clients")
    serve.add_argument("--prompt-mean", type=int, help="mean prompt tokens (one workload instead of the preset's)")
    serve.add_argument("--gen-mean", type=int, help="mean generated tokens (one workload instead of the preset's)")
    serve.add_argument("--requests", type=int, help="requests per run")
    serve.add_argument("--prompt-sla-rate", type=float, help="prompt SLA: first token within |prompt| / RATE s")
    serve.add_argument("--gen-sla-rates", metavar="R,S", help="generation SLA thresholds in tokens/s")
    serve.add_argument("--ema-span", type=int, default=16, help="EMA span of the generation SLA (default: 16)")
    serve.add_argument("--warmup", type=int, default=2, help="warm-up requests per engine (default: 2)")
    serve.add_argument("--seed", type=int, default=0, help="seed of the workload and Poisson arrivals")
    serve.add_argument("--json", metavar="FILE", help="write settings, summaries and traces to FILE")
    serve.add_argument("--plot", metavar="FILE.png",
                       help="draw latency against throughput and effective throughput against load (matplotlib)")
    serve.add_argument("--no-progress", action="store_true", help="no progress bars or lines on stderr")
    serve.add_argument("--peers", metavar="transformers",
                       help="also run the workload through transformers on the same checkpoint: its "
                            "generate (static batches) and continuous batching, where installed")
    remote = serve.add_argument_group("a running server instead of in-process schedulers")
    remote.add_argument("--url", help="OpenAI base URL of a running server, e.g. http://127.0.0.1:8000/v1; "
                                      "--model names a local copy of its checkpoint for the tokenizer")
    remote.add_argument("--served-model", help="model name to request (default: the first the server lists)")
    remote.add_argument("--api-key", help="bearer token for the server")
    engine = serve.add_argument_group("engine settings (as in `fastgen serve`)")
    engine.add_argument("--model", help="checkpoint folder or .gguf (default: the demo model)")
    engine.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    engine.add_argument("--device")
    engine.add_argument("--kernels")
    engine.add_argument("--threads", type=int)
    engine.add_argument("--token-budget", type=int, help="tokens per step (default: the preset's)")
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--kv-cache-gb", type=float)
    serve.set_defaults(func=cmd_bench_serve)
    _bench_kernels_parser(bench_sub)


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from .bench.kernels import format_table

    # Read first, so that a bad baseline fails before the suite runs, not after.
    baseline = _load_kernel_results(args.baseline) if args.baseline else None
    if args.load:
        results, notes, failed = _load_kernel_results(args.load), [], []
    else:
        try:
            from .bench.kernels_suite import run_suite
        except ImportError as e:
            raise FastgenError(f"fastgen bench kernels needs pytest and pytest-benchmark ({e}); "
                               f"install them with `pip install pytest-benchmark`.") from None
        results, notes, failed = run_suite(
            backends=args.backends, ops=args.ops, models=args.models, sets=args.sets, quick=args.quick,
            device=args.device, dtypes=args.dtype, threads=args.threads, json_path=args.json,
            keyword=args.k, check=args.check, block_size=args.block_size)
    print(format_table(results, notes))
    if baseline is not None:
        from .bench.kernel_compare import Run, format_comparison

        current = Run(Path(args.load).stem if args.load else "this run", results)
        print()
        print(format_comparison(current, Run(Path(args.baseline).stem, baseline)))
    if args.json and not args.load:
        print(f"fastgen: pytest-benchmark JSON written to {args.json} "
              f"(compare a later run with it: --baseline {args.json})", file=sys.stderr)
    if args.plot:
        from .bench.plot import plot_kernel_results

        plot_kernel_results(results, args.plot)
        print(f"fastgen: plot written to {args.plot}", file=sys.stderr)
    if failed:
        print(f"fastgen: {len(failed)} kernel case(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _bench_kernels_parser(bench_sub) -> None:
    kernels = bench_sub.add_parser(
        "kernels", help="kernel-backend benchmark: every backend x op x model shape (see docs/benchmarks.md)",
        description="Time every installed kernel backend on each op over shapes of real models with "
                    "pytest-benchmark; print one table (stdout) with bytes/s, FLOP/s and the fraction "
                    "of the device's measured copy and matmul ceilings. pytest's report goes to stderr.")
    kernels.add_argument("--backends", metavar="A,B", help="kernel backends (default: every installed one)")
    kernels.add_argument("--ops", metavar="A,B", help="ops (default: all)")
    kernels.add_argument("--models", metavar="A,B", help="model shapes (default: all; --quick: the small one)")
    kernels.add_argument("--sets", metavar="A,B", help="shape sets: decode, prefill, mixed (default: all)")
    kernels.add_argument("--quick", action="store_true", help="small shapes and few rounds: seconds on a CPU")
    kernels.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    kernels.add_argument("--dtype", metavar="A,B", help="dtypes (default: bfloat16 on CUDA, float32 on CPU)")
    kernels.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    kernels.add_argument("--block-size", type=int, metavar="N",
                         help="tokens per KV cache block for write_kv and attention (default: 16)")
    kernels.add_argument("--check", action="store_true",
                         help="also check each case's outputs against kernels.torch's on the same inputs "
                              "(a case that differs fails, with what differs)")
    kernels.add_argument("-k", metavar="EXPR", help="pytest -k expression over case ids, e.g. 'b16 and ctx1024'")
    kernels.add_argument("--json", metavar="FILE", help="write pytest-benchmark's JSON to FILE")
    kernels.add_argument("--plot", metavar="FILE.png",
                         help="draw each case's %% of the ceilings and time, a bar per backend (matplotlib)")
    kernels.add_argument("--load", metavar="FILE.json",
                         help="run nothing: the table (and --plot) of a run saved with --json, "
                              "on this machine or another")
    kernels.add_argument("--baseline", metavar="FILE.json",
                         help="also compare with a run saved with --json (before a kernel change, or "
                              "on another machine): both times and the speedup per case and backend")
    kernels.set_defaults(func=cmd_bench_kernels)


def _load_kernel_results(path: str) -> dict:
    """A saved run's pytest-benchmark JSON, with a clear error where it is not one."""
    try:
        results = json.loads(Path(path).read_text())
    except OSError as e:
        raise FastgenError(f"Cannot read {path}: {e.strerror}.") from None
    except ValueError as e:
        raise FastgenError(f"{path} is not JSON: {e}.") from None
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), list):
        raise FastgenError(f"{path} is not a kernel benchmark's JSON (no \"benchmarks\" list); "
                           f"write one with `fastgen bench kernels --json FILE`.")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model through a transport plugin")
    _common(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed-request", type=int, default=None, help="seed of this request's sampling")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap the prompt in the model's chat template (default: when it has one)")
    _common(gen)
    gen.set_defaults(func=cmd_generate)

    _bench_parser(sub)

    plugins = sub.add_parser("plugins", help="list installed plugins and whether they can run here")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FastgenError as e:
        print(f"fastgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
