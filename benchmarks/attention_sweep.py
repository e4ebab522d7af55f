"""Time kernels.triton's attention over its launch settings, beside kernels.cuda's (where it runs)
and torch's SDPA on the same work.

    python benchmarks/attention_sweep.py [--device cuda] [--dtype bfloat16] [--model llama3-8b]
        [--shapes decode_b1_ctx8192,prefill_2048_cached0,...] [--quick] [--repeats N]
        [--markdown FILE] [--json FILE]

For each batch shape, each launch setting (tile tokens for prompt tiles, keys per loop step, warps,
pipelining stages, and the KV cache's block size with K/V read as TMA copies or not; `auto` is
what the backend chooses by itself) runs on the same inputs, and on
decode shapes each forced split-KV count (`splits=N`, for kernels.cuda too), beside the count the
shared rule picks (the `splits` column of `auto`), and on shapes with prompt chunks each backend's
tiles in batch order beside its own order, longest first (`tiles in batch order`). Its
output is checked against kernels.torch first: a setting that computes wrong is marked and never
counted as the best. Then it is timed: the median of --repeats calls, on a GPU
the device time alone, on a cold L2 cache (`fastgen.bench.device_timing`). The bar is the
issue's target, torch's scaled_dot_product_attention on the same work: the same queries over each
sequence's keys and values laid out contiguously (no block table), causal, grouped-query.

On a CPU it runs under Triton's interpreter (set here) with --quick shapes: a check of the script,
not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from fastgen.bench.kernels import (BLOCK_SIZE, MODELS, BatchShape, build_batch, decode,  # noqa: E402
                                   median_time, mixed, prefill)
from fastgen.checkpoint import DTYPES  # noqa: E402
from fastgen.kernels import configure_kv_cache, make_backend  # noqa: E402
from fastgen.plugin_manager import load_plugins  # noqa: E402

# The GPU session cuts the sweep at its time limit, keeping the shapes done: the prompt shapes,
# untuned longest, come second and third.
# The last, a SplitFuse step of many long decodes beside a prompt chunk: whether the prompt
# settings' keys per step (block_n 64 gained 3-15% on the two prompt shapes on the H100 and the
# H200) cost the decodes they share a launch with.
# A prompt chunk after 2048 cached tokens, with no decodes beside it, comes fourth: with the fresh
# prompt, whether steps of prompt tiles alone would do better on their own launch settings.
SHAPES = {s.name: s for s in (decode(1, 8192), prefill(2048), mixed(512, 16, 1024),
                               prefill(2048, cached=2048), decode(16, 8192), decode(64, 1024),
                               mixed(2048, 64, 2048, 2048))}
QUICK_SHAPES = {s.name: s for s in (decode(2, 600), prefill(40))}
@dataclass(frozen=True)
class Setting:
    """kernels.triton's attention launch settings; None: the backend's own choice. `cache_block`:
    the tokens per KV cache block the inputs are laid out in; `tma`: K/V read as TMA copies,
    which needs cache blocks that hold whole steps of keys."""

    tile: int | None = None         # new tokens per prompt tile (decodes have one-token tiles)
    block_n: int | None = None      # keys per loop step
    warps: int | None = None
    stages: int | None = None
    splits: int | None = None       # a forced split-KV count
    cache_block: int = BLOCK_SIZE
    tma: bool = False

    @property
    def name(self) -> str:
        parts = [f"tile={self.tile}"] if self.tile else []
        parts += [f"block_n={self.block_n}"] if self.block_n else []
        parts += [f"warps={self.warps}"] if self.warps else []
        parts += [f"stages={self.stages}"] if self.stages else []
        parts += [f"splits={self.splits}"] if self.splits else []
        parts += [f"cache_block={self.cache_block}"] if self.cache_block != BLOCK_SIZE else []
        parts += ["tma"] if self.tma else []
        return " ".join(parts) or "auto"


AUTO = Setting()
# Stages 3 and 4 keep 2 and 4 copies of keys in flight (the sm_90 TTGIR); block_n 128 and stages
# 2 were never the fastest (NVIDIA H200, 2026-11-27), so they are not timed again.
DECODE_SETTINGS = [Setting(block_n=n, warps=4, stages=st) for n in (32, 64) for st in (3, 4)] + [
    Setting(block_n=64, warps=2, stages=3), Setting(block_n=64, warps=8, stages=3)]
# Timed on the fresh prompt and the mixes and never ahead (NVIDIA H200, 2026-11-28, the fourth
# session): 32-token tiles on 8 warps with 32 keys a step, 2 or 4 stages, and 128 keys at 3 stages
# (which fit sm_90's shared memory); lazy rescaling of the running output (7-14% slower on prompts).
PROMPT_SETTINGS = [Setting(t, n, 4, st) for t in (16, 32) for n in (32, 64) for st in (3, 4)] + [
    Setting(32, 64, 8, 3), Setting(32, 128, 8, 2),
    # Halving the tiles let the split rule split the 512-token mix in two (0.60x there, NVIDIA
    # H200, 2026-11-28): the fresh prompt's best setting again with one split, to tell the tile's
    # cost from the split's.
    Setting(32, 64, 8, 3, splits=1)]
# Cache blocks of 64 (or 128) tokens: each step's keys in one block, read at one block id
# (gather) or as one TMA copy of K and one of V (sm_90+). Untimed so far: the next GPU session's.
# In the sm_90 SASS (Triton 3.6, scripts/triton_sass_loops.py on the fresh 2048-token prompt) the
# TMA prompt tile takes 143 registers against 224 for the gather from 16-token blocks, and its
# unmasked loop 352 instructions against 398; two stages leave 81 KiB of shared memory, room for
# two programs an SM. 128 keys a step on 8 warps with 32-token tiles: 210 registers (255 with the
# gather), 0.24 instructions a key and query row in that loop against 0.36 for the fastest setting
# timed so far (32-token tiles, 64 keys, 8 warps, gather).
CACHE_BLOCK_SETTINGS = [Setting(cache_block=64), Setting(cache_block=64, tma=True)]
PROMPT_SETTINGS += CACHE_BLOCK_SETTINGS + [
    Setting(t, 64, w, 3, cache_block=64, tma=tma) for t, w in ((16, 4), (32, 8)) for tma in (False, True)
] + [Setting(16, 64, 4, 2, cache_block=64, tma=True), Setting(32, 128, 8, 2, cache_block=128, tma=True),
      # two stages by gather from 16-token blocks (200 registers, 80 KiB: two programs an SM fit
      # too): the control for TMA's two-stage row
      Setting(16, 64, 4, 2)]
DECODE_SETTINGS += CACHE_BLOCK_SETTINGS + [Setting(block_n=64, warps=4, stages=3, cache_block=64, tma=True)]
QUICK_SETTINGS = [Setting(block_n=32, warps=4), Setting(16, 64, 4),
                  Setting(16, 32, 4, cache_block=32, tma=True)]
# Split-KV counts forced on decode shapes (each backend's own launch settings), beside the count the
# shared rule (plugins/kernels/split_kv.py) picks: the data to tune that rule with.
SPLIT_COUNTS = [1, 4, 8, 16, 32]
QUICK_SPLIT_COUNTS = [3]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Result:
    shape: str
    setting: str
    seconds: float | None = None
    correct: bool = True
    error: str | None = None
    extra: dict = field(default_factory=dict)


def apply(backend, setting: Setting) -> None:
    backend.tile_tokens, backend.attention_block_n = setting.tile, setting.block_n
    backend.attention_num_warps, backend.attention_num_stages = setting.warps, setting.stages
    backend.num_kv_splits, backend.attention_tma = setting.splits, setting.tma


def sdpa_call(shape: BatchShape, heads: int, kv_heads: int, dim: int, dtype, device):
    """SDPA over the same work: the shape's sequences grouped by (cached, new), each group one call
    on contiguous [n, heads, tokens, dim] tensors."""
    groups: dict[tuple[int, int], int] = {}
    for pair in shape.sequences:
        groups[pair] = groups.get(pair, 0) + 1
    calls = []
    for (cached, new), n in groups.items():
        total = cached + new
        qg = torch.randn(n, heads, new, dim, dtype=dtype, device=device)
        k = torch.randn(n, kv_heads, total, dim, dtype=dtype, device=device)
        v = torch.randn_like(k)
        mask, causal = None, False
        if new > 1 and cached == 0:
            causal = True
        elif new > 1:
            keys = torch.arange(total, device=device)
            mask = keys[None, :] <= cached + torch.arange(new, device=device)[:, None]
        calls.append((qg, k, v, mask, causal))

    def run():
        for qg, k, v, mask, causal in calls:
            F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return run


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:200]}"


@dataclass
class AttentionInputs:
    """One shape's attention work: the batch, random queries and caches, and the reference's
    output on them (float32)."""

    batch: object
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    scale: float
    window: int | None
    expected: torch.Tensor

    def planned_call(self, backend):
        """(the backend's plan for the batch, a call of its attention on this work with that plan)."""
        configure_kv_cache(backend, self.k_cache.shape[2], self.k_cache.shape[3])
        plan = backend.prepare(self.batch)

        def call():
            self.batch.attn_metadata = plan
            return backend.attention(self.q, self.k_cache, self.v_cache, self.batch, self.scale,
                                     self.window)
        return plan, call

    def mismatch(self, out: torch.Tensor, dtype) -> str | None:
        """None where `out` agrees with the reference within the dtype's tolerance, else how far."""
        error = (out.float() - self.expected).abs().max().item()
        ok = error <= TOLERANCE[dtype] * max(1.0, self.expected.abs().max().item())
        return None if ok else f"max error {error:.3g}"


def attention_inputs(shape: BatchShape, model, dtype, device, reference,
                     cache_block: int = BLOCK_SIZE) -> AttentionInputs:
    g = torch.Generator().manual_seed(0)
    cache_shape = (shape.blocks(cache_block), cache_block, model.num_kv_heads, model.head_dim)
    k_cache = torch.randn(*cache_shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(*cache_shape, generator=g).to(dtype).to(device)
    q = torch.randn(shape.num_tokens, model.num_heads, model.head_dim, generator=g).to(dtype).to(device)
    scale = model.head_dim ** -0.5
    batch = build_batch(shape, device, cache_block)
    batch.attn_metadata = reference.prepare(batch)
    expected = reference.attention(q, k_cache, v_cache, batch, scale, model.sliding_window).float()
    return AttentionInputs(batch, q, k_cache, v_cache, scale, model.sliding_window, expected)


def _checked_and_timed(result: Result, backend, work: AttentionInputs, dtype, device,
                       repeats) -> Result:
    """The backend's attention on the work, checked against the reference and then timed, into
    result; a failure to compile or launch is the result's error."""
    try:
        plan, call = work.planned_call(backend)
        result.extra = {"num_splits": plan.num_splits, "tile_tokens": getattr(plan, "tile_tokens", None)}
        result.error = work.mismatch(call(), dtype)
        result.correct = result.error is None
        result.seconds = median_time(call, device, repeats)
    except Exception as e:   # noqa: BLE001 - a setting that fails to compile or launch is a finding
        result.correct, result.error = False, _failure(e)
    return result


def sweep_shape(shape: BatchShape, model, dtype, device, settings, split_counts,
                repeats) -> list[Result]:
    registry = load_plugins().registry
    triton = make_backend(registry.get("kernels", "triton").cls, device)
    reference = make_backend(registry.get("kernels", "torch").cls, device)
    # The shape's work laid out in caches of each block size the settings ask for (random values
    # drawn for each).
    works = {block: attention_inputs(shape, model, dtype, device, reference, block)
             for block in dict.fromkeys(s.cache_block for s in [AUTO, *settings])}
    results = []
    for setting in [AUTO, *settings]:
        apply(triton, setting)
        results.append(_checked_and_timed(Result(shape.name, setting.name), triton,
                                          works[setting.cache_block], dtype, device, repeats))
    apply(triton, AUTO)
    inputs = (works[BLOCK_SIZE], dtype, device, repeats)
    # kernels.cuda's attention on the same work, where it runs: the other kernel authors' bar.
    backends = [("auto", triton)]
    cuda = registry.get("kernels", "cuda").cls
    if cuda.unavailable_reason(device) is None:
        backends.append(("kernels.cuda", make_backend(cuda, device)))
        results.append(_checked_and_timed(Result(shape.name, "kernels.cuda"), backends[-1][1], *inputs))
    for label, backend in backends:
        if shape.kind != "decode":
            # The order prompt tiles start in (query_tiles.py): batch order against longest first.
            backend.longest_tiles_first = False
            results.append(_checked_and_timed(Result(shape.name, f"{label} tiles in batch order"),
                                              backend, *inputs))
            backend.longest_tiles_first = True
        for splits in split_counts:
            backend.num_kv_splits = splits
            results.append(_checked_and_timed(Result(shape.name, f"{label} splits={splits}"), backend,
                                              *inputs))
        backend.num_kv_splits = None
    sdpa = Result(shape.name, "torch SDPA (contiguous K/V)")
    try:
        sdpa.seconds = median_time(sdpa_call(shape, model.num_heads, model.num_kv_heads, model.head_dim,
                                           dtype, device), device, repeats)
    except Exception as e:   # noqa: BLE001
        sdpa.correct, sdpa.error = False, _failure(e)
    results.append(sdpa)
    return results


def format_results(results: list[Result], header: str) -> str:
    lines = [header, ""]
    for shape in dict.fromkeys(r.shape for r in results):
        rows = [r for r in results if r.shape == shape]
        auto = next((r.seconds for r in rows if r.setting == "auto" and r.correct), None)
        sdpa = next((r.seconds for r in rows if r.setting.startswith("torch SDPA")), None)
        timed = [r for r in rows if r.correct and r.seconds and not r.setting.startswith(("torch", "kernels."))]
        best = min(timed, key=lambda r: r.seconds) if timed else None
        lines += [f"### {shape}", "", "| setting | us | vs auto | vs SDPA | splits | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            us = f"{r.seconds * 1e6:.1f}" if r.seconds else "-"
            vs_auto = f"{auto / r.seconds:.2f}x" if auto and r.seconds else "-"
            vs_sdpa = f"{sdpa / r.seconds:.2f}x" if sdpa and r.seconds else "-"
            note = r.error or ("best" if r is best else "")
            lines.append(f"| {r.setting} | {us} | {vs_auto} | {vs_sdpa} | "
                         f"{r.extra.get('num_splits', '-')} | {note} |")
        lines.append("")
    lines.append("vs auto / vs SDPA: that time divided by this one (above 1: this setting is faster).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="two small shapes and two settings")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    table = QUICK_SHAPES if args.quick else SHAPES
    names = args.shapes.split(",") if args.shapes else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown shapes {', '.join(unknown)}; choose from {', '.join(table)}")
    model = MODELS["smollm2-135m" if args.quick else args.model]
    header = (f"## kernels.triton attention settings, {model.name}, {str(dtype)[6:]} on "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results: list[Result] = []
    for name in names:
        shape = table[name]
        settings = QUICK_SETTINGS if args.quick else (
            DECODE_SETTINGS if shape.kind == "decode" else PROMPT_SETTINGS)
        start = time.perf_counter()
        split_counts = [] if shape.kind != "decode" else QUICK_SPLIT_COUNTS if args.quick else SPLIT_COUNTS
        shape_results = sweep_shape(shape, model, dtype, device, settings, split_counts,
                                    3 if args.quick else args.repeats)
        results += shape_results
        print(f"{name}: {len(shape_results)} runs in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        text = format_results(results, header)   # rewritten after every shape: a timeout keeps them
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in results], f, indent=1)
    print(text)
    return 0 if all(r.correct for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
