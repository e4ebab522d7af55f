"""Offline throughput: fastgen against transformers on the same checkpoint, dtype, device and threads.

    python benchmarks/offline_throughput.py --dtype float32 --requests 16 --prompt-len 256 \
        --gen-len 64 [--model DIR | --random-model llama-1b] [--device cuda] [--threads 2] \
        [--kernels torch,cpu] [--json FILE]

--random-model builds a random-weight checkpoint of a named shape (random_checkpoint.py) in a
temporary folder, for a machine with no real checkpoint at hand; its tokens mean nothing, its
timings do. Measures, in one process:
- fastgen, once per kernel backend in --kernels: all requests submitted at once, greedy (or
  sampled, with --temperature and its --top-p and --top-k, transformers too), ignore_eos;
  generated tokens/s from submit to all done (after a warm-up run), and the split of fastgen's time
  per step (EngineTotals).
- prefill tokens/s: the same requests with one generated token each, prompt tokens over the time;
  batched decode tokens/s is derived from the two runs: the tokens after each request's first over
  the time the full run took beyond the prefill run.
- transformers `generate` with static batching (no padding: every prompt has the same length),
  attn_implementation sdpa and eager; the best is reported.
- transformers `generate_batch` (continuous batching); an error is reported in the table.
- single-request decode tokens/s (time after the first token) for fastgen and `generate`.
It also checks that fastgen's greedy tokens equal transformers' static `generate` tokens (not
when sampling: the draws differ by design).
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from functools import partial

import torch

from fastgen.bench.peers import continuous_batching_config, generate_draws, hf_generate, load_hf
from fastgen.bench.workload import allowed_token_ids
from fastgen.checkpoint import DTYPES
from fastgen.engine import resolve_device
from random_checkpoint import SHAPES, temporary_random_checkpoint


def status(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(run, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of run(), the work it queued on a GPU included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def best_prefill(run, device: torch.device, repeat: int, label: str) -> float:
    """The fastest of `repeat` runs of `run`, which generates one token per request: the prefill."""
    walls = [timed(run, device)[0] for _ in range(repeat)]
    status(f"{label}: prefill runs {', '.join(f'{w:.2f}' for w in walls)} s")
    return min(walls)


def prefill_and_decode(result: dict, prefill_wall: float, prompts: list[list[int]]) -> None:
    """Prefill tokens/s from the one-token run; batched decode tokens/s from what the full run took
    beyond it (the tokens after each request's first)."""
    result["prefill_wall_s"] = prefill_wall
    result["prefill_tokens_per_s"] = sum(len(p) for p in prompts) / prefill_wall
    decode_wall = result["wall_s"] - prefill_wall
    decoded = result["generated_tokens"] - len(prompts)
    result["decode_tokens_per_s"] = decoded / decode_wall if decode_wall > 0 and decoded > 0 else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf; default: the demo model")
    p.add_argument("--random-model", default=None, choices=sorted(SHAPES),
                   help="instead of --model: a random-weight Llama of this shape, in a temporary folder")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda[:N], for fastgen and transformers alike")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice")
    p.add_argument("--kernels", default="torch",
                   help="fastgen kernel backends to run, comma-separated, one table row each (e.g. "
                        "torch,cpu); NAME runs every step eagerly and in turn (cuda_graphs and "
                        "overlap_steps off), NAME+graphs with "
                        "cuda_graphs on (decode steps and steps with prompt chunks), "
                        "NAME+decodegraphs with cuda_graphs on for decode steps only, "
                        "NAME+overlap with overlap_steps on, NAME+nocache with "
                        "prefix_caching off, NAME+block64 with 64-token KV cache blocks, "
                        "triton+tma with those blocks read as TMA copies (sm_90+), together as "
                        "NAME+graphs+overlap (e.g. triton,triton+graphs)")
    p.add_argument("--token-budget", type=int, default=512, help="fastgen token budget per step")
    p.add_argument("--max-num-seqs", type=int, default=64, help="fastgen max sequences per step")
    p.add_argument("--kv-cache-gb", type=float, default=1.0,
                   help="fastgen KV cache GiB (fixed, so runs compare: on a GPU the engine's own "
                        "default takes most of its memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens every prompt begins with, the same in all (a system prompt); "
                        "fastgen's prefix cache computes them once a run")
    p.add_argument("--attn", default="sdpa,eager",
                   help="transformers attn_implementation values to try, comma separated")
    p.add_argument("--skip-generate-batch", action="store_true",
                   help="skip transformers' continuous batching (slow on CPU)")
    p.add_argument("--repeat", type=int, default=2,
                   help="timed runs per measurement; the fastest counts (the machine may be shared)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (fastgen and transformers); 0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus filter")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature: top-k filter (0: off)")
    args = p.parse_args(argv)
    if args.temperature == 0 and (args.top_p != 1.0 or args.top_k):
        p.error("--top-p and --top-k filter sampled draws: give --temperature too")
    if args.model and args.random_model:
        p.error("give --model or --random-model, not both")
    return args


# --- workload --------------------------------------------------------------------------------

def sampling_of(args) -> dict | None:
    """The sampled runs' settings (transformers' `generate` names), or None for greedy runs."""
    if args.temperature == 0:
        return None
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None}


def make_prompts(tokenizer, vocab_size: int, n: int, length: int, seed: int) -> list[list[int]]:
    """n random prompts of `length` token ids, none of them a special or added token."""
    allowed = torch.from_numpy(allowed_token_ids(tokenizer, vocab_size))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(allowed), (n, length), generator=gen)
    return allowed[idx].tolist()


# --- fastgen ---------------------------------------------------------------------------------

# --kernels NAME+OPTION: cuda_graphs on (for decode steps only), overlap_steps on, prefix_caching
# off, 64-token KV cache blocks, those blocks read by kernels.triton's attention as TMA copies
KERNEL_OPTIONS = {"graphs", "decodegraphs", "overlap", "nocache", "block64", "tma"}


@contextmanager
def triton_tma(on: bool):
    """kernels.triton's attention reads K/V as TMA copies (`attention_tma`) in the engines made
    within: set on the class, so the decode graphs captured at start use them too."""
    if not on:
        yield
        return
    from fastgen.plugins.kernels.triton.backend import TritonBackend

    TritonBackend.attention_tma = True
    try:
        yield
    finally:
        TritonBackend.attention_tma = False


def bench_fastgen(args, prompts, kernels: str) -> dict:
    from fastgen import LLM, SamplingParams

    name, *options = kernels.split("+")
    if set(options) - KERNEL_OPTIONS:
        raise SystemExit(f"--kernels: {kernels!r}: the options after + are "
                         f"{' and '.join(sorted(KERNEL_OPTIONS))}.")
    status(f"fastgen: loading the engine with kernels.{kernels}")
    # cuda_graphs explicit either way: its default (on where possible) would blur eager and graphs rows.
    settings = dict(dtype=args.dtype, token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
                    kernels=name, device=args.device, kv_cache_gb=args.kv_cache_gb,
                    cuda_graphs=bool({"graphs", "decodegraphs"} & set(options)),
                    overlap_steps="overlap" in options, prefix_caching="nocache" not in options)
    if "decodegraphs" in options:
        settings["cuda_graph_max_tokens"] = 0
    if {"block64", "tma"} & set(options):
        settings["block_size"] = 64
    if "tma" in options and name != "triton":
        raise SystemExit(f"--kernels: {kernels!r}: +tma is kernels.triton's (triton+tma).")
    if args.threads:
        settings["threads"] = args.threads
    with triton_tma("tma" in options):
        llm = LLM(model=args.model, **settings)
    engine = llm.engine
    params = SamplingParams(max_tokens=args.gen_len, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, ignore_eos=True)

    status("fastgen: warm-up")
    llm.generate([p[:64] for p in prompts[:4]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def generate(params):   # every run computes its prompts: none are found in the prefix cache
        llm.reset_prefix_cache()
        return llm.generate(prompts, params)

    prefill_wall = best_prefill(partial(generate, one_token), engine.device, args.repeat,
                                f"fastgen (kernels.{kernels})")

    status(f"fastgen: {len(prompts)} requests x {args.prompt_len} prompt + {args.gen_len} generated")
    best = None
    for _ in range(args.repeat):
        before_steps, before_tokens = engine.totals.steps, engine.totals.tokens
        before_time = dict(engine.totals.time)
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        run = (wall, outs, engine.totals.steps - before_steps, engine.totals.tokens - before_tokens,
               {k: engine.totals.time[k] - before_time[k] for k in before_time})
        status(f"fastgen: run {wall:.2f} s")
        if best is None or wall < best[0]:
            best = run
    wall, outs, steps, step_tokens, split = best
    generated = sum(len(o.token_ids) for o in outs)
    host = split["schedule_s"] + split["postprocess_s"]
    result = {
        "tokens_per_s": generated / wall,
        "wall_s": wall,
        "generated_tokens": generated,
        "steps": steps,
        "step_tokens": step_tokens,
        "split_s": {"host": host, "forward": split["forward_s"], "sample": split["sample_s"],
                    "schedule": split["schedule_s"], "postprocess": split["postprocess_s"]},
        "untracked_s": wall - sum(split.values()),
        "token_ids": [list(o.token_ids) for o in outs],
        # Decode steps replayed from CUDA graphs over the whole benchmark, and the graphs captured.
        "graph_replays": engine.step_graphs.replays if engine.step_graphs else 0,
        "graphs_captured": engine.step_graphs.captures if engine.step_graphs else 0,
    }
    prefill_and_decode(result, prefill_wall, prompts)
    status(f"fastgen: {result['tokens_per_s']:.1f} tok/s over {steps} steps, "
           f"prefill {result['prefill_tokens_per_s']:.1f} tok/s")

    status("fastgen: single-request decode")
    result["single"] = min((fastgen_single(engine, prompts[0], params) for _ in range(args.repeat)),
                           key=lambda r: r["decode_s"])
    status(f"fastgen: single-request decode {result['single']['decode_tokens_per_s']:.1f} tok/s")
    del llm, engine
    gc.collect()
    return result


def fastgen_single(engine, prompt: list[int], params) -> dict:
    """One request stepped by hand, so the time of its first token is known."""
    engine.add_request(prompt, params)   # warm-up of the batch-1 shapes
    while engine.has_unfinished():
        engine.step()
    steps0, time0 = engine.totals.steps, dict(engine.totals.time)
    engine.reset_prefix_cache()
    t0 = time.perf_counter()
    engine.add_request(prompt, params)
    t_first = None
    n_tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            n_tokens = len(out.token_ids)
            if t_first is None and n_tokens:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    split = {k: engine.totals.time[k] - time0[k] for k in time0}
    return {"ttft_s": t_first - t0, "decode_s": t_end - t_first,
            "decode_tokens_per_s": (n_tokens - 1) / (t_end - t_first),
            "steps": engine.totals.steps - steps0, "split_s": split}


# --- transformers ----------------------------------------------------------------------------

class FirstTokenTimer:
    """A generate() streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.t_first = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:      # the first call carries the prompt
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


def bench_hf_generate(args, folder, dtype, prompts, device: torch.device) -> dict:
    batch = torch.tensor(prompts, device=device)
    results = {}
    for attn in [a.strip() for a in args.attn.split(",") if a.strip()]:
        status(f"transformers generate ({attn}): loading")
        try:
            model = load_hf(folder, dtype, attn).to(device)
            status(f"transformers generate ({attn}): warm-up")
            hf_generate(model, batch[:2, :64], 4)
            hf_generate(model, batch, 2)
            prefill_wall = best_prefill(partial(hf_generate, model, batch, 1), device, args.repeat,
                                        f"transformers generate ({attn})")
            status(f"transformers generate ({attn}): batch of {len(prompts)}")
            wall, out = float("inf"), None
            for _ in range(args.repeat):
                run_wall, out = timed(partial(hf_generate, model, batch, args.gen_len,
                                              sampling=sampling_of(args)), device)
                wall = min(wall, run_wall)
                status(f"transformers generate ({attn}): run {run_wall:.2f} s")
            r = {"tokens_per_s": out.numel() / wall, "wall_s": wall, "generated_tokens": out.numel(),
                 "token_ids": out.tolist()}
            prefill_and_decode(r, prefill_wall, prompts)
            status(f"transformers generate ({attn}): {r['tokens_per_s']:.1f} tok/s; single-request decode")
            hf_generate(model, batch[:1], 4)
            singles = []
            for _ in range(args.repeat):
                timer = FirstTokenTimer()
                t0 = time.perf_counter()
                single = timed(partial(hf_generate, model, batch[:1], args.gen_len, streamer=timer,
                                       sampling=sampling_of(args)), device)[1]
                t_end = time.perf_counter()
                singles.append({"ttft_s": timer.t_first - t0, "decode_s": t_end - timer.t_first,
                                "decode_tokens_per_s": (single.shape[1] - 1) / (t_end - timer.t_first)})
            r["single"] = min(singles, key=lambda x: x["decode_s"])
            status(f"transformers generate ({attn}): single-request decode "
                   f"{r['single']['decode_tokens_per_s']:.1f} tok/s")
            del model
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
            status(f"transformers generate ({attn}) failed: {e!r}")
            r = {"error": f"{type(e).__name__}: {e}"}
        results[attn] = r
        gc.collect()
    return results


def bench_hf_generate_batch(args, folder, dtype, prompts, attn: str, device: torch.device) -> dict:
    from transformers import GenerationConfig

    status(f"transformers generate_batch ({attn}): loading")
    try:
        model = load_hf(folder, dtype, attn).to(device)
        gen_cfg = GenerationConfig(max_new_tokens=args.gen_len, eos_token_id=None, pad_token_id=0,
                                   **generate_draws(sampling_of(args)))
        cb_cfg = continuous_batching_config(args.prompt_len + args.gen_len,
                                            min(len(prompts), args.max_num_seqs), args.token_budget)

        def run(inputs, n):
            out = model.generate_batch(inputs, generation_config=gen_cfg, continuous_batching_config=cb_cfg,
                                       max_new_tokens=n, warmup=False)
            errors = [o.error for o in out.values() if o.error is not None]
            if errors or len(out) != len(inputs):
                raise RuntimeError(f"{len(errors)} requests failed, {len(inputs) - len(out)} missing: "
                                   f"{errors[:1]}")
            return out

        status(f"transformers generate_batch ({attn}): warm-up")
        run([p[:64] for p in prompts[:2]], 4)
        status(f"transformers generate_batch ({attn}): batch of {len(prompts)}")
        wall, out = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = run(prompts, args.gen_len)
            wall = min(wall, time.perf_counter() - t0)
            status(f"transformers generate_batch ({attn}): run {time.perf_counter() - t0:.2f} s")
        generated = sum(len(o.generated_tokens) for o in out.values())
        r = {"tokens_per_s": generated / wall, "wall_s": wall, "attn": attn,
             "token_ids": [list(o.generated_tokens) for o in out.values()]}
        status(f"transformers generate_batch: {r['tokens_per_s']:.1f} tok/s")
        del model
    except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
        status(f"transformers generate_batch failed: {e!r}")
        traceback.print_exc(file=sys.stderr)
        r = {"error": f"{type(e).__name__}: {e}"}
    gc.collect()
    return r


# --- report ----------------------------------------------------------------------------------

def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many sequences match exactly, and the tokens before the first difference."""
    same_seqs = sum(x == y for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix += n
    return {"equal_sequences": same_seqs, "sequences": len(a), "agreeing_prefix_tokens": prefix,
            "tokens": sum(len(x) for x in a)}


def fmt(v, spec=".1f") -> str:
    return "—" if v is None else format(v, spec)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def report(args, fgs: dict[str, dict], hf: dict, cb: dict | None, matches: dict[str, dict],
           device: torch.device) -> str:
    ok = {k: v for k, v in hf.items() if "error" not in v}
    best_attn = max(ok, key=lambda k: ok[k]["tokens_per_s"]) if ok else None
    tf_numbers = [v["tokens_per_s"] for v in ok.values()]
    if cb and "error" not in cb:
        tf_numbers.append(cb["tokens_per_s"])
    best_tf = max(tf_numbers) if tf_numbers else None

    def ratio(x):
        return None if x is None or not best_tf else x / best_tf

    model = f"random-weight {args.random_model}" if args.random_model else (args.model or "the demo model")

    def row(label: str, r: dict) -> str:
        return (f"| {label} | {fmt(r['tokens_per_s'])} | {fmt(ratio(r['tokens_per_s']), '.2f')}x "
                f"| {fmt(r['prefill_tokens_per_s'])} | {fmt(r['decode_tokens_per_s'])} "
                f"| {fmt(r['single']['decode_tokens_per_s'])} |")

    sampling = sampling_of(args)
    draws = "greedy" if sampling is None else ", ".join(
        f"{k} {v}" for k, v in sampling.items() if v is not None)
    lines = [
        f"## Offline throughput: {args.requests} requests x {args.prompt_len} prompt + {args.gen_len} "
        f"generated tokens ({draws}"
        + (f"; the first {args.shared_prefix} prompt tokens the same in all" if args.shared_prefix else "")
        + f"), {model}",
        "",
        f"{device_name(device)}; torch {torch.__version__}, dtype {args.dtype}, "
        f"fastgen token_budget {args.token_budget}; best of {args.repeat} runs; "
        f"load average at the end {os.getloadavg()[0]:.2f}. Prefill: the requests with one generated "
        f"token each; batched decode: the tokens after each request's first over the full run's "
        f"time beyond the prefill's",
        "",
        "| engine | tokens/s | ratio to best transformers | prefill tokens/s | batched decode tokens/s "
        "| single-request decode tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kernels, fg in fgs.items():
        lines.append(row(f"fastgen (kernels.{kernels})", fg))
    if best_attn:
        others = ", ".join(f"{k} {v['tokens_per_s']:.1f}" for k, v in ok.items() if k != best_attn)
        label = f"transformers generate ({best_attn}{'; ' + others if others else ''})"
        lines.append(row(label, ok[best_attn]))
    else:
        errs = "; ".join(f"{k}: {v['error']}" for k, v in hf.items())
        lines.append(f"| transformers generate | error: {errs} | — | — | — | — |")
    if cb is None:
        lines.append("| transformers generate_batch | skipped | — | — | — | — |")
    elif "error" in cb:
        lines.append(f"| transformers generate_batch | error: {cb['error'][:200]} | — | — | — | — |")
    else:
        lines.append(f"| transformers generate_batch ({cb['attn']}) | {fmt(cb['tokens_per_s'])} "
                     f"| {fmt(ratio(cb['tokens_per_s']), '.2f')}x | — | — | — |")
    lines.append("")
    for kernels, fg in fgs.items():
        lines += fastgen_lines(kernels, fg, matches.get(kernels))
    if best_attn:
        hs = ok[best_attn]["single"]
        lines.append(f"transformers ({best_attn}) single request: ttft {hs['ttft_s'] * 1e3:.1f} ms, "
                     f"decode {hs['decode_s'] * 1e3 / max(args.gen_len - 1, 1):.2f} ms/token")
    return "\n".join(lines)


def fastgen_lines(kernels: str, fg: dict, match: dict | None) -> list[str]:
    """One backend's time split, single-request numbers and token match against transformers."""
    s = fg["split_s"]
    steps = max(fg["steps"], 1)
    ms = {k: 1e3 * v / steps for k, v in s.items()}
    total = sum(fg["split_s"][k] for k in ("host", "forward", "sample")) or 1.0
    lines = [
        f"fastgen (kernels.{kernels}) time split over {fg['steps']} steps "
        f"({fg['step_tokens']} tokens computed, "
        f"wall {fg['wall_s']:.2f} s): per step host {ms['host']:.2f} ms "
        f"(schedule {ms['schedule']:.2f} + postprocess {ms['postprocess']:.2f}), "
        f"forward {ms['forward']:.2f} ms, sample {ms['sample']:.2f} ms; "
        f"shares host {100 * s['host'] / total:.1f}% / forward {100 * s['forward'] / total:.1f}% / "
        f"sample {100 * s['sample'] / total:.1f}%; outside steps {fg['untracked_s'] * 1e3:.1f} ms"
        + (f"; {fg['graph_replays']} steps replayed from {fg['graphs_captured']} CUDA graphs"
           if fg.get("graphs_captured") else ""),
    ]
    single = fg["single"]
    # Where a one-sequence step's time goes: on a GPU its host work is a large share.
    one = {k: 1e3 * v / max(single["steps"], 1) for k, v in single["split_s"].items()}
    lines.append(f"fastgen (kernels.{kernels}) single request: ttft {single['ttft_s'] * 1e3:.1f} ms, "
                 f"decode {single['decode_s'] * 1e3 / max(single['steps'] - 1, 1):.2f} ms/token "
                 f"over {single['steps']} steps; per step host "
                 f"{one['schedule_s'] + one['postprocess_s']:.2f} ms (schedule {one['schedule_s']:.2f} "
                 f"+ postprocess {one['postprocess_s']:.2f}), forward {one['forward_s']:.2f} ms, "
                 f"sample {one['sample_s']:.2f} ms")
    if match:
        lines.append(f"greedy tokens, fastgen (kernels.{kernels}) vs transformers generate "
                     f"({match['against']}): "
                     f"{match['equal_sequences']}/{match['sequences']} sequences equal, "
                     f"{match['agreeing_prefix_tokens']}/{match['tokens']} tokens before the first "
                     f"difference")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastgen.checkpoint import resolve_checkpoint

    device = resolve_device(args.device)
    status(f"torch {torch.__version__}, {device_name(device)}, dtype {args.dtype}")
    if not args.random_model:
        return run(args, resolve_checkpoint(args.model, None, args.dtype), device)
    status(f"building a random-weight {args.random_model} on {device}")
    with temporary_random_checkpoint(args.random_model, DTYPES[args.dtype], device) as folder:
        args.model = str(folder)
        return run(args, folder, device)


def run(args, folder, device: torch.device) -> int:
    from transformers import AutoConfig, AutoTokenizer

    dtype = DTYPES[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    prompts = make_prompts(tokenizer, vocab, args.requests, args.prompt_len, args.seed)
    for p in prompts[1:]:
        p[:args.shared_prefix] = prompts[0][:args.shared_prefix]

    fgs = {kernels: bench_fastgen(args, prompts, kernels) for kernels in args.kernels.split(",")}
    hf = bench_hf_generate(args, folder, dtype, prompts, device)
    ok = {k: v for k, v in hf.items() if "error" not in v}
    matches = {}
    if ok and sampling_of(args) is None:
        against = "sdpa" if "sdpa" in ok else next(iter(ok))
        matches = {kernels: compare(fg["token_ids"], ok[against]["token_ids"]) | {"against": against}
                   for kernels, fg in fgs.items()}
    cb = None
    if not args.skip_generate_batch:
        cb_attn = max(ok, key=lambda k: ok[k]["tokens_per_s"]) if ok else "sdpa"
        cb = bench_hf_generate_batch(args, folder, dtype, prompts, cb_attn, device)
        if "error" not in cb:
            for kernels, match in matches.items():
                match["generate_batch_vs_fastgen"] = compare(fgs[kernels]["token_ids"], cb["token_ids"])

    table = report(args, fgs, hf, cb, matches, device)
    print(table, flush=True)
    if args.json:
        def strip(d):
            return {k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k != "token_ids"}
        data = {"args": vars(args), "torch": torch.__version__, "device": device_name(device),
                "threads": torch.get_num_threads(),
                "fastgen": {kernels: strip(fg) for kernels, fg in fgs.items()},
                "transformers_generate": {k: strip(v) for k, v in hf.items()},
                "transformers_generate_batch": strip(cb) if cb else None, "match": matches,
                "table": table}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
        status(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
