"""Compile kernels.triton's kernels for a GPU on a machine that has none.

The CPU tests run the kernels under Triton's interpreter, which checks what they compute but not
that they compile: tl.dot's shape rules, the lowering of each op, registers and shared memory are
the compiler's business. This check drives the backend's own ops over the kernel benchmark's cases
(every op, model shape, batch shape and dtype; `fastgen.bench.kernels`) on meta tensors, records
each kernel launch instead of running it, specialises it as Triton's runtime would (argument
types, 16-byte alignment, integers equal to 1) and compiles each distinct launch for the target
with the toolchain that ships in the triton wheel (LLVM, ptxas, cuobjdump). A kernel that would
fail to compile or launch on that GPU fails here, and each launch's registers, spills and shared
memory are reported.

    python -m fastgen.plugins.kernels.triton.compile_check [--arch 90] [--dtype bfloat16,float16]
        [--models A,B] [--sets A,B] [--ops A,B] [--cache-block N [--tma]] [--json FILE]

It needs TRITON_INTERPRET unset, so it runs in a process of its own (tests start one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

# Shared memory one thread block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DEFAULT_ARCH = 90
META = torch.device("meta")


@dataclass
class Launch:
    """One kernel launch as the backend made it: the kernel and its call's arguments."""

    kernel: object            # triton JITFunction
    args: tuple
    kwargs: dict
    case: str                 # the benchmark case that made it


@dataclass
class CompiledLaunch:
    """One distinct specialisation of a kernel, compiled for the target, and what it costs."""

    kernel: str
    constants: str            # its constexpr arguments and launch options, as Triton saw them
    cases: list[str] = field(default_factory=list)   # every case that launches it
    registers: int | None = None
    spill_bytes: int | None = None          # per thread local memory: > 0 means spills
    shared_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None

    def problems(self, arch: int) -> list[str]:
        found = []
        if self.error:
            found.append(f"does not compile: {self.error}")
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes per thread to local memory")
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and self.shared_bytes > limit:
            found.append(f"needs {self.shared_bytes} bytes of shared memory, over sm_{arch}'s {limit}")
        return found


@contextlib.contextmanager
def recorded_launches(launches: list[Launch], case: str):
    """Within the block, a launch of any Triton kernel is appended to `launches`, not run."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, case))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def record_cases(dtypes: list[str], models=None, sets=None, ops=None, arch: int = DEFAULT_ARCH,
                 cache_block: int | None = None, tma: bool = False) -> list[Launch]:
    """Every launch kernels.triton makes for the benchmark's (full) cases, on meta tensors, its
    launch settings chosen as on an sm_`arch` GPU (the shared memory a program may use); the KV
    cache in blocks of `cache_block` tokens (the benchmark's own unless told), its K/V read as
    TMA copies where `tma`."""
    from . import _tiling

    _tiling.META_SHARED_BYTES = SHARED_LIMIT.get(arch)
    try:
        return _record_cases(dtypes, models, sets, ops, cache_block, tma)
    finally:
        _tiling.META_SHARED_BYTES = None


def _record_cases(dtypes: list[str], models, sets, ops, cache_block: int | None,
                  tma: bool) -> list[Launch]:
    from fastgen.bench.kernels import Selection
    from fastgen.plugin_manager import load_plugins

    from .backend import TritonBackend

    registry = load_plugins().registry
    selection = Selection.from_options(backends=None, ops=ops, models=models, sets=sets,
                                       device="cpu", dtypes=dtypes, block_size=cache_block,
                                       registry=registry)
    selection.backends = [registry.get("kernels", TritonBackend.name)]
    selection.device = META
    backend = TritonBackend(META)
    backend.attention_tma = tma
    launches: list[Launch] = []
    for case in selection.cases():
        with recorded_launches(launches, case.id):
            case.build(backend)()
    return launches


def _cuda_tool(name: str) -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def cuobjdump(cubin: bytes, option: str) -> str | None:
    """What cuobjdump `option` (`-sass`, `--dump-resource-usage`) prints of a compiled kernel, or
    None where no cuobjdump is found."""
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, option, f.name], capture_output=True, text=True,
                              check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None, int]:
    """(registers, local bytes, static shared bytes) from cuobjdump, or Nones without it."""
    text = cuobjdump(cubin, "--dump-resource-usage")
    if text is None:
        return None, None, 0
    usage = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text))
    return int(usage.get("REG", 0)), int(usage.get("LOCAL", 0)), int(usage.get("SHARED", 0))


def _specialise(launch: Launch, backend):
    """(signature, constexprs, attrs, options) as Triton's runtime derives them at a launch."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound,
                                                              specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, target, backend):
    """`launch` compiled for `target` as Triton's runtime would compile it there (its
    CompiledKernel: `.asm` holds the PTX and cubin)."""
    import triton
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _specialise(launch, backend)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def compile_launches(launches: list[Launch], arch: int) -> list[CompiledLaunch]:
    """Compile each distinct specialisation among `launches` once for sm_`arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    compiled: dict[tuple, CompiledLaunch] = {}
    for launch in launches:
        signature, constexprs, attrs, options = _specialise(launch, backend)
        names = [p.name for p in launch.kernel.params]
        # The element type of the first tensor argument: the activations' dtype.
        first_pointer = next((t for t in signature.values() if t.startswith("*")), "*-")
        shown = {"dtype": first_pointer[1:]}
        shown.update({names[path[0]]: value for path, value in constexprs.items() if len(path) == 1})
        shown.update(num_warps=options.num_warps, num_stages=options.num_stages)
        # Integer arguments the runtime found divisible by 16 compile differently: say which.
        aligned = [names[path[0]] for path, found in attrs.items() if len(path) == 1 and found
                   and signature[names[path[0]]].startswith("i")]
        if aligned:
            shown["16-aligned"] = "/".join(aligned)
        key = (launch.kernel.__name__, repr(sorted(signature.items())), repr(sorted(shown.items())),
               repr(sorted(attrs.items())))
        if key in compiled:
            compiled[key].cases.append(launch.case)
            continue
        result = CompiledLaunch(launch.kernel.__name__,
                                ", ".join(f"{k}={v}" for k, v in shown.items()), [launch.case])
        start = time.perf_counter()
        try:
            kernel = compile_launch(launch, target, backend)
            registers, local, static_shared = _resource_usage(kernel.asm["cubin"])
            result.registers, result.spill_bytes = registers, local
            result.shared_bytes = kernel.metadata.shared + static_shared
        except Exception as e:   # noqa: BLE001 - every compile failure is a finding to report
            result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        result.seconds = time.perf_counter() - start
        compiled[key] = result
    return list(compiled.values())


def format_report(results: list[CompiledLaunch], arch: int) -> str:
    lines = [f"kernels.triton compiled for sm_{arch}: {len(results)} distinct launches",
             "", "| kernel | constants | registers | spill bytes | shared KiB | cases | problems |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r.kernel, r.constants)):
        problems = "; ".join(r.problems(arch)) or "-"
        lines.append(f"| {r.kernel} | {r.constants} | {r.registers if r.registers is not None else '?'} "
                     f"| {r.spill_bytes if r.spill_bytes is not None else '?'} "
                     f"| {r.shared_bytes / 1024:.1f} | {len(r.cases)} | {problems} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastgen.plugins.kernels.triton.compile_check",
        description="Compile kernels.triton's kernels for a GPU architecture, without a GPU.")
    parser.add_argument("--arch", type=int, default=DEFAULT_ARCH,
                        help=f"compute capability as one number, e.g. 80 or 90 (default {DEFAULT_ARCH})")
    parser.add_argument("--dtype", default="bfloat16", metavar="A,B",
                        help="activation and cache dtypes (default: bfloat16)")
    parser.add_argument("--models", metavar="A,B", help="model shapes (default: all of the benchmark's)")
    parser.add_argument("--sets", metavar="A,B", help="shape sets: decode, prefill, mixed (default: all)")
    parser.add_argument("--ops", metavar="A,B", help="ops (default: all)")
    parser.add_argument("--cache-block", type=int, metavar="N",
                        help="tokens per KV cache block (default: the kernel benchmark's, 16)")
    parser.add_argument("--tma", action="store_true",
                        help="attention reads K/V as TMA copies (sm_90+; --cache-block a multiple "
                             "of the keys a step, e.g. 64)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check compiles kernels: run it with TRITON_INTERPRET unset.", file=sys.stderr)
        return 2
    launches = record_cases(args.dtype.split(","), args.models, args.sets, args.ops, args.arch,
                            args.cache_block, args.tma)
    results = compile_launches(launches, args.arch)
    print(format_report(results, args.arch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "launches": [asdict(r) for r in results]}, f, indent=1)
    failed = [r for r in results if r.problems(args.arch)]
    if failed:
        print(f"\n{len(failed)} of {len(results)} launches have problems (see the table).", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
