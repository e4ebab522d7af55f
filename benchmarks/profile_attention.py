"""Each GPU attention backend's kernels on one batch shape, once, inside a profiler range: for
Nsight Compute, to see where a kernel's time goes (throughput against the hardware's peaks, what
its warps stall on), not only how long it takes:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section WarpStateStats ... python benchmarks/profile_attention.py \\
        [--shapes prefill_2048_cached0,decode_b1_ctx8192] [--model llama3-8b]

The shapes are attention_sweep.py's. For each shape, kernels.triton, kernels.cuda (where it runs)
and torch's SDPA on the same work (attention_sweep.sdpa_call) run twice outside the range, which
compiles and warms them, then once inside it, in that order: stderr names each call as it starts.
The output is checked against kernels.torch first, as in the sweep. `scripts/gpu_session.sh
profile` runs it under ncu where ncu can read the counters.

Without a GPU it runs the same calls under Triton's interpreter, with no range: a check of the
script.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention_sweep import QUICK_SHAPES, SHAPES, attention_inputs, sdpa_call  # noqa: E402

from fastgen.bench.kernels import MODELS  # noqa: E402
from fastgen.checkpoint import DTYPES  # noqa: E402
from fastgen.kernels import make_backend  # noqa: E402
from fastgen.plugin_manager import load_plugins  # noqa: E402

DEFAULT_SHAPES = ("prefill_2048_cached0", "decode_b1_ctx8192")


def calls(shape, model, dtype, device) -> list[tuple[str, object]]:
    """(label, call) for each backend's attention on the shape's work, checked once first."""
    registry = load_plugins().registry
    reference = make_backend(registry.get("kernels", "torch").cls, device)
    work = attention_inputs(shape, model, dtype, device, reference)
    found = []
    for name in ("triton", "cuda"):
        cls = registry.get("kernels", name).cls
        reason = cls.unavailable_reason(device)
        if reason is not None:
            print(f"kernels.{name}: skipped, {reason}", file=sys.stderr)
            continue
        _, call = work.planned_call(make_backend(cls, device))
        mismatch = work.mismatch(call(), dtype)
        if mismatch:
            raise SystemExit(f"kernels.{name} differs from kernels.torch on {shape.name}: {mismatch}")
        found.append((f"kernels.{name}", call))
    found.append(("torch SDPA (contiguous K/V)",
                  sdpa_call(shape, model.num_heads, model.num_kv_heads, model.head_dim, dtype, device)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)} "
                                         f"(default: {','.join(DEFAULT_SHAPES)})")
    parser.add_argument("--quick", action="store_true", help="the sweep's small shapes and model")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    table = QUICK_SHAPES if args.quick else SHAPES
    names = args.shapes.split(",") if args.shapes else list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown shapes {', '.join(unknown)}; choose from {', '.join(table)}")
    model = MODELS["smollm2-135m" if args.quick else args.model]
    profiled = device.type == "cuda"
    for name in names:
        for label, call in calls(table[name], model, dtype, device):
            call()
            call()
            if profiled:
                torch.cuda.synchronize(device)
                torch.cuda.profiler.start()
            print(f"profiling {label} on {name} ({model.name}, {str(dtype)[6:]})", file=sys.stderr,
                  flush=True)
            call()
            if profiled:
                torch.cuda.synchronize(device)
                torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
