"""Host time of kernels.triton's ops, per call, measured without a GPU.

Eager steps (every step with a prompt chunk: CUDA graphs replay decode-only steps) pay each Triton
launch's Python on the host: the op's wrapper (outputs, launch settings, strides) and Triton's
JITFunction.run (binding and specialising every argument, the kernel cache lookup, the launch's
metadata). On an NVIDIA H200 host that came to 20-40 us a launch (docs/benchmarks.md), more than
the kernel itself at small shapes. This measures both parts on the CPU: the ops run on CPU tensors
with the launch settings they would take on an sm_90 GPU, Triton's driver is a stand-in that
reports device 0, and each compiled kernel is a stand-in whose launch does nothing, so what is
timed is everything the host does for a launch except the driver's own call (a few microseconds
more on a GPU host). The wrapper's part is timed with JITFunction.run itself replaced by nothing.

    python benchmarks/triton_host_cost.py [--model llama3-8b] [--shapes decode_b1_ctx128,...]
        [--ops attention,...] [--calls 2000] [--json FILE]

The sampler is left out by default: its host side runs torch ops (top-k) that would run on the GPU
and here compute on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported: compiled-mode launches

# One decode step and one step of a prompt chunk (the eager kind) of the kernel suite's shapes.
DEFAULT_SHAPES = ["decode_b1_ctx128", "mixed_512_d16x1024_chunk496_cached0"]
DEFAULT_OPS = ["rms_norm", "rotary", "write_kv", "attention", "silu_and_mul"]


class _StandInKernel:
    """A compiled kernel whose launch does nothing."""

    function = 0
    packed_metadata = ()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


@contextlib.contextmanager
def stand_in_driver(arch: int = 90):
    """Within the block Triton's runtime sees device 0 of an sm_`arch` GPU, and each kernel it
    would compile is a stand-in (cached as a compiled one is), so launches run Triton's whole host
    path but the driver's call; kernels.triton's wrappers choose their launch settings for CPU
    tensors as they would on that GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit

    from fastgen.plugins.kernels.triton.compile_check import SHARED_LIMIT

    class Active:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    class Driver:
        active = Active()

    def compile_stand_in(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = self.device_caches[device][0][key] = _StandInKernel()
        return kernel

    settings = {"interpreted": lambda device: False, "max_shared_bytes": lambda device: SHARED_LIMIT[arch]}
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("fastgen.plugins.kernels.triton.")]
    saved_settings = [(m, name, getattr(m, name)) for m in modules for name in settings if hasattr(m, name)]
    saved = jit.driver, jit.JITFunction._do_compile
    jit.driver, jit.JITFunction._do_compile = Driver(), compile_stand_in
    for module, name, _ in saved_settings:
        setattr(module, name, settings[name])
    try:
        yield
    finally:
        jit.driver, jit.JITFunction._do_compile = saved
        for module, name, value in saved_settings:
            setattr(module, name, value)


@contextlib.contextmanager
def launches_skipped():
    """Within the block a Triton launch returns at once: what is left is the wrapper's own time."""
    from triton.runtime.jit import JITFunction

    saved = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        JITFunction.run = saved


def _per_call_us(call, calls: int) -> float:
    """The best of three rounds of `calls` calls, in microseconds a call."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def measure(model: str, shapes: list[str], ops: list[str], calls: int) -> list[dict]:
    import torch

    from fastgen.bench.kernels import Selection
    from fastgen.plugin_manager import load_plugins
    from fastgen.plugins.kernels.triton.backend import TritonBackend
    from fastgen.plugins.kernels.triton.compile_check import recorded_launches

    registry = load_plugins().registry
    selection = Selection.from_options(backends=None, ops=ops, models=[model], sets=None,
                                       device="cpu", dtypes=["bfloat16"], registry=registry)
    selection.backends = [registry.get("kernels", TritonBackend.name)]
    cpu = torch.device("cpu")
    TritonBackend(cpu)   # imports the kernel modules, whose settings stand_in_driver sets
    rows = []
    with stand_in_driver():
        cases = [c for c in selection.cases() if c.shape.name in shapes]
        missing = sorted(set(shapes) - {c.shape.name for c in cases})
        if missing:
            known = sorted({c.shape.name for c in selection.cases()})
            raise SystemExit(f"unknown shapes {', '.join(missing)}; choose from {', '.join(known)}")
        for case in cases:
            call = case.build(TritonBackend(cpu))
            launches = []
            with recorded_launches(launches, case.id):
                call()
            call()   # specialise and cache the stand-in kernels
            whole = _per_call_us(call, calls)
            with launches_skipped():
                wrapper = _per_call_us(call, calls)
            rows.append({"shape": case.shape.name, "op": case.op, "launches": len(launches),
                         "host_us": whole, "wrapper_us": wrapper, "triton_run_us": whole - wrapper,
                         # each launch's settings: the GPU's, not the interpreter's
                         "settings": [{k: v for k, v in launch.kwargs.items()
                                       if isinstance(v, (bool, int, float))} for launch in launches]})
    return rows


def format_table(rows: list[dict], model: str) -> str:
    lines = [f"## kernels.triton host time per call, {model}, bfloat16 launch settings for sm_90", "",
             "| shape | op | launches | host us | wrapper us | Triton run us |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['op']} | {r['launches']} | {r['host_us']:.1f} "
                     f"| {r['wrapper_us']:.1f} | {r['triton_run_us']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    parser.add_argument("--ops", default=",".join(DEFAULT_OPS))
    parser.add_argument("--calls", type=int, default=2000, help="calls a round (best of three rounds)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = measure(args.model, args.shapes.split(","), args.ops.split(","), args.calls)
    print(format_table(rows, args.model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
