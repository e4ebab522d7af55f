"""How fast could any engine built on torch's matmuls run the offline workload? A lower bound.

    python benchmarks/matmul_floor.py --dtype float32 [--model DIR] [--threads 2]

The offline benchmark's workload (16 requests of 256 prompt and 64 generated tokens) is run by
fastgen once to record its schedule: the tokens and the logits rows of every step. Then only the
model's linear layers (qkv, o_proj, gate_up, down per layer, and the lm_head over the logits rows)
are replayed on the real weights, through the model's own matmul path (the kernel backend's linear
op: kernels.cpu's picks oneDNN for few rows, torch's GEMM for many), for that schedule, and for transformers' static `generate`
schedule (the whole prompt batch in one pass, then one 16-row pass per generated token). Nothing
else an engine does (attention, norms, rotary, sampling, host work) is counted, so the time is a
floor: no engine that uses these matmuls on these cores can be faster. Generated tokens divided by
it is a ceiling on tokens/s, to set beside the offline benchmark's measured numbers.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf; default: the demo model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--token-budget", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kernels", default="auto", help="kernel backend whose matmul path is replayed")
    p.add_argument("--repeat", type=int, default=3, help="replays per schedule; the fastest counts")
    return p.parse_args(argv)


def record_schedule(llm, prompts, gen_len: int) -> list[tuple[int, int]]:
    """(tokens, logits rows) of every step fastgen takes on the workload."""
    from fastgen import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_sequence(engine.make_sequence(prompt, params))
    steps = []
    while engine.has_unfinished():
        engine.step()
        stats = engine.last_stats
        if stats.num_tokens:
            steps.append((stats.num_tokens, stats.num_seqs))
    return steps


def replay(model, steps: list[tuple[int, int]], dtype: torch.dtype) -> float:
    """Seconds spent in the model's linear layers alone over `steps`."""
    linear = model.linear
    first = model.layers[0]
    widths = {"hidden": model.embed.shape[1], "attn": first.o_proj.shape[1],
              "inter": first.down.shape[1]}
    head = model.embed if model.tied else model.lm_head
    inputs = {tokens: {k: torch.randn(tokens, w, dtype=dtype) for k, w in widths.items()}
              for tokens in {t for t, _ in steps}}
    start = time.perf_counter()
    for tokens, rows in steps:
        x = inputs[tokens]
        for layer in model.layers:
            linear(x["hidden"], layer.qkv, layer.qkv_bias)
            linear(x["attn"], layer.o_proj)
            linear(x["hidden"], layer.gate_up)
            linear(x["inter"], layer.down)
        linear(x["hidden"][:rows], head)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastgen import LLM

    llm = LLM(model=args.model, dtype=args.dtype, kernels=args.kernels, token_budget=args.token_budget,
              max_num_seqs=max(64, args.requests))
    vocab = llm.engine.hf_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    # Token ids below 100 are avoided: some are special (EOS would not stop us: ignore_eos).
    prompts = torch.randint(100, vocab, (args.requests, args.prompt_len), generator=gen).tolist()
    fastgen_steps = record_schedule(llm, prompts, args.gen_len)
    n = args.requests
    # generate: the prompts in one pass (logits of the last position only), then one row per
    # sequence per new token; the first new token comes from the prompt pass.
    hf_steps = [(n * args.prompt_len, n)] + [(n, n)] * (args.gen_len - 1)
    model = llm.engine.model
    dtype = model.embed.dtype
    generated = n * args.gen_len
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {dtype}, "
          f"matmuls of kernels.{llm.engine.backend.name}, "
          f"{n} requests x {args.prompt_len} prompt + {args.gen_len} generated", file=sys.stderr)
    print("| schedule | steps | tokens computed | matmul seconds | ceiling on generated tokens/s |")
    print("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, steps in (("fastgen (splitfuse, budget %d)" % args.token_budget, fastgen_steps),
                            ("transformers generate (static batch)", hf_steps)):
            replay(model, steps[:2], dtype)   # warm-up: first-touch of weights and allocator
            best = min(replay(model, steps, dtype) for _ in range(args.repeat))
            tokens = sum(t for t, _ in steps)
            print(f"| {name} | {len(steps)} | {tokens} | {best:.2f} | {generated / best:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
