"""Where a step's time goes, op by op: the engine's steps under torch.profiler, each kernel the
device ran put in its op's group.

    python benchmarks/step_profile.py [--model DIR | --random-model llama-1b] [--device cuda]
        [--dtype bfloat16] [--kernels triton] [--requests 32] [--prompt-len 512] [--steps 20]
        [--token-budget N] [--no-cuda-graphs] [--markdown FILE]

Two windows, after a warm-up run (compiles, CUDA graph captures): the prompt steps of
`--requests` random prompts of `--prompt-len` tokens, each generating one token; then `--steps`
decode steps of as many sequences, every one decoding. The engine runs with its own defaults for
the device (graphs and overlapped steps on a GPU, unless told otherwise). For each window the
table gives, per step, each op group's time (on a GPU the device time of its kernels, replayed
graphs included; on a CPU the ops' own CPU time), its share, and its kernels or op calls, beside
the step's wall time: on a GPU, wall time beyond the kernels is the device waiting for the host
or for launches; on a CPU, time outside the ops is the host's Python. Kernel names are grouped by
what they contain (GROUPS below), so a third-party backend's kernels land in their op's group when
their names say which op they are; the rest are `other`, listed by name under the table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastgen import LLM, SamplingParams
from fastgen.checkpoint import DTYPES
from fastgen.cli import serving_summary
from fastgen.engine import resolve_device
from offline_throughput import device_name, make_prompts, timed
from random_checkpoint import SHAPES, temporary_random_checkpoint

# (group, substrings of a lowercased kernel or op name), first match wins: attention's reduce and
# the KV write before matmul's generic names, sampling's before copies.
GROUPS = (
    ("attention", ("attention", "reduce_splits", "flash", "fmha", "sdpa")),
    ("write_kv", ("write_kv", "reshape_and_cache")),
    ("rms_norm", ("rms_norm", "rmsnorm")),
    ("rotary", ("rotary", "rope")),
    ("silu_and_mul", ("silu",)),
    ("sampling", ("sampl", "gumbel", "argmax", "top_k", "topk", "threshold", "multinomial",
                  "softmax")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::matmul", "linear")),
    ("embedding", ("embedding", "index_select")),
    ("copy", ("copy", "memcpy", "memset", "fill", "aten::cat", "aten::to", "contiguous")),
)
OTHER = "other"


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, parts in GROUPS:
        if any(p in lowered for p in parts):
            return group
    return OTHER


def op_times(prof, on_gpu: bool) -> dict[str, tuple[float, int]]:
    """{kernel or op name: (seconds, count)}: on a GPU every kernel's device time; on a CPU each
    op's self CPU time (what it spent outside the ops it called, so the times do not overlap)."""
    times = {}
    for avg in prof.key_averages():
        seconds = (avg.self_device_time_total if on_gpu else avg.self_cpu_time_total) / 1e6
        if seconds > 0 and (on_gpu or not avg.key.startswith("ProfilerStep")):
            times[avg.key] = (seconds, avg.count)
    return times


def window_table(title: str, times: dict[str, tuple[float, int]], steps: int, wall: float,
                 on_gpu: bool) -> str:
    groups: dict[str, list[float]] = {}
    others: dict[str, float] = {}
    for name, (seconds, count) in times.items():
        g = groups.setdefault(group_of(name), [0.0, 0])
        g[0] += seconds
        g[1] += count
        if group_of(name) == OTHER:
            others[name] = seconds
    busy = sum(g[0] for g in groups.values())
    if busy == 0:
        return f"### {title}: the profiler saw no {'kernels' if on_gpu else 'ops'}\n"
    unit, what = ("kernels", "device time of its kernels") if on_gpu else ("op calls", "ops' own CPU time")
    lines = [f"### {title}: {steps} steps, {wall / steps * 1e3:.3f} ms a step (wall)", "",
             f"| group | ms a step | share of the {'kernels' if on_gpu else 'ops'} | {unit} a step |",
             "|---|---:|---:|---:|"]
    for name, (seconds, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {seconds / steps * 1e3:.3f} | {seconds / busy:.1%} | {count / steps:.1f} |")
    outside = "no kernel running" if on_gpu else "outside the ops (Python, the host's own work)"
    lines += [f"| all ({what}) | {busy / steps * 1e3:.3f} | 100% | "
              f"{sum(g[1] for g in groups.values()) / steps:.1f} |",
              f"| wall time with {outside} | {max(0.0, wall - busy) / steps * 1e3:.3f} | - | - |", ""]
    if on_gpu and busy < 0.2 * wall:
        lines += ["The kernels take under a fifth of the wall time: if the steps replay CUDA graphs "
                  "whose kernels this profiler does not see, run again with --no-cuda-graphs.", ""]
    if others:
        top = sorted(others.items(), key=lambda kv: -kv[1])[:8]
        lines += ["`other`: " + "; ".join(f"{n[:80]} {s / steps * 1e3:.3f} ms" for n, s in top), ""]
    return "\n".join(lines)


def profiled(run, device: torch.device):
    """(profiler, wall seconds) of run() under torch.profiler, the device's queued work included."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall, _ = timed(run, device)
    return prof, wall


def prompt_window(llm: LLM, prompts: list[list[int]]):
    engine = llm.engine
    engine.reset_prefix_cache()
    before = engine.totals.steps
    prof, wall = profiled(lambda: llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True)),
                          engine.device)
    return prof, wall, engine.totals.steps - before


def decode_window(llm: LLM, prompts: list[list[int]], steps: int):
    """`steps` steps of every prompt's sequence decoding, once all prompts are computed."""
    engine = llm.engine
    engine.reset_prefix_cache()
    params = SamplingParams(max_tokens=steps + 64, ignore_eos=True, temperature=0.0)
    ids = [engine.add_request(p, params) for p in prompts]
    # Until a few steps in a row decode every sequence (with overlapped steps, the stats are the
    # step just launched).
    in_a_row = 0
    while in_a_row < 3:
        engine.step()
        s = engine.last_stats
        in_a_row = in_a_row + 1 if s.num_decodes == s.num_seqs == len(prompts) else 0

    def run():
        for _ in range(steps):
            engine.step()

    prof, wall = profiled(run, engine.device)
    for request_id in ids:   # a step still in flight is completed by the engine's next step
        engine.abort_request(request_id)
    return prof, wall, steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf; default: the demo model")
    p.add_argument("--random-model", default=None, choices=sorted(SHAPES),
                   help="instead of --model: a random-weight Llama of this shape, in a temporary folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    p.add_argument("--kernels", default="auto", help="the kernel backend (kernels.NAME)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    p.add_argument("--token-budget", type=int, default=None, help="default: the engine's")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="default: the engine's")
    p.add_argument("--no-cuda-graphs", action="store_true", help="every step eagerly")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    if args.model and args.random_model:
        p.error("give --model or --random-model, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.random_model:
        text = profile_steps(args)
    else:
        dtype = DTYPES["bfloat16" if args.dtype == "auto" else args.dtype]
        with temporary_random_checkpoint(args.random_model, dtype, resolve_device(args.device)) as folder:
            args.model = str(folder)
            text = profile_steps(args)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


def profile_steps(args) -> str:
    """The two windows' tables for the engine the arguments describe, under a header saying
    what it runs (the defaults resolved, as `fastgen serve` prints them)."""
    settings = {k: v for k, v in dict(
        model=args.model, device=args.device, dtype=args.dtype, kernels=args.kernels,
        token_budget=args.token_budget, kv_cache_gb=args.kv_cache_gb, threads=args.threads,
        cuda_graphs=False if args.no_cuda_graphs else None,
        served_model_name=args.random_model and f"random {args.random_model}").items()
        if v is not None}
    llm = LLM(**settings)
    engine = llm.engine
    on_gpu = engine.device.type == "cuda"
    prompts = make_prompts(engine.tokenizer, engine.hf_config.vocab_size, args.requests,
                           args.prompt_len, seed=0)
    print(f"[step_profile] warm-up: {args.requests} x {args.prompt_len} tokens", file=sys.stderr)
    llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    tables = [f"## Step profile on {device_name(engine.device)}; torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              f"`{serving_summary(engine)}`", ""]
    prof, wall, steps = prompt_window(llm, prompts)
    tables.append(window_table(f"prompt steps ({args.requests} x {args.prompt_len} tokens)",
                               op_times(prof, on_gpu), steps, wall, on_gpu))
    prof, wall, steps = decode_window(llm, prompts, args.steps)
    tables.append(window_table(f"decode steps ({args.requests} sequences)",
                               op_times(prof, on_gpu), steps, wall, on_gpu))
    return "\n".join(tables)


if __name__ == "__main__":
    sys.exit(main())
