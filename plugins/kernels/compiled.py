"""What the compiled backends (kernels.cpu, kernels.cuda) share.

Each subclasses the torch reference and runs it for inputs its kernels do not take (another
dtype, an unsupported head size), noting each such case once in the log; each builds its
sources at first use and can be built ahead of time with `python -m ...build`, and checks with
`... build --check OUT_DIR` that every source compiles to an object where it cannot run (no GPU;
another CPU's vector instructions).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastgen.errors import PluginError
from fastgen.plugins.kernels.torch_ref.attention import AttentionPlan, plan_attention
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend

log = logging.getLogger(__name__)

# The dtypes the compiled kernels take; others run the reference.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LazyReferencePlan:
    """The reference's attention plan for a step, made only when some layer falls back to it."""

    batch: Any
    plan: AttentionPlan | None = None

    def get(self) -> AttentionPlan:
        if self.plan is None:
            self.plan = plan_attention(self.batch)
        return self.plan


class ReferenceFallbackBackend(TorchBackend):
    """A torch reference whose subclass replaces ops with compiled kernels where they apply.

    The element-wise ops are the same call in every compiled backend, so they live here: the
    subclass sets `self.ops` to its `torch.ops` namespace, whose `rms_norm`, `add_rms_norm`,
    `rotary` and `silu_and_mul` take the DTYPES, with the reference's signatures and results.
    """

    ops: Any

    def __init__(self, device) -> None:
        super().__init__(device)
        self._noted: set[str] = set()

    def _note(self, message: str) -> None:
        """Log `message` once per backend: which inputs run the reference, and why."""
        if message not in self._noted:
            self._noted.add(message)
            log.info("kernels.%s: %s.", self.name, message)

    def rms_norm(self, x, weight, eps, residual=None):
        # x, residual: [T, E], weight: [E] -> (normed [T, E], new residual [T, E])
        if weight.dtype != x.dtype or x.dtype not in DTYPES:
            self._note(f"rms_norm of {x.dtype} with a {weight.dtype} weight runs the torch reference")
            return super().rms_norm(x, weight, eps, residual)
        if residual is None:
            return self.ops.rms_norm(x, weight, eps), x
        return self.ops.add_rms_norm(x, residual, weight, eps)

    def rotary(self, q, k, cos, sin, is_neox=True):
        # q: [T, H, D], k: [T, Hkv, D], cos/sin: [T, R/2] -> new contiguous q and k
        if q.dtype not in DTYPES:
            self._note(f"rotary of {q.dtype} runs the torch reference")
            return super().rotary(q, k, cos, sin, is_neox)
        return self.ops.rotary(q, k, cos, sin, is_neox)

    def silu_and_mul(self, x):
        # x: [T, 2I] -> [T, I]
        if x.dtype not in DTYPES:
            self._note(f"silu_and_mul of {x.dtype} runs the torch reference")
            return super().silu_and_mul(x)
        return self.ops.silu_and_mul(x)


def library_name(backend: str, directory: Path) -> str:
    """The name torch's extension tools build kernels.BACKEND's library under in `directory`, the
    folder of one build key, whose name it carries."""
    return f"fastgen_{backend}_{directory.name}"


def library_built(backend: str, directory: Path) -> bool:
    """Whether kernels.BACKEND's library has been built into `directory` (its .so is there)."""
    return (directory / f"{library_name(backend, directory)}.so").exists()


def build_parser(name: str) -> argparse.ArgumentParser:
    """The arguments of `python -m fastgen.plugins.kernels.NAME.build`."""
    parser = argparse.ArgumentParser(prog=f"python -m fastgen.plugins.kernels.{name}.build",
                                     description=f"Build the kernels.{name} library ahead of time.")
    parser.add_argument("--cache-dir", help="cache root (default: $XDG_CACHE_HOME/fastgen or ~/.cache/fastgen)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    return parser


def build_ahead(args: argparse.Namespace, backend_cls: type, load: Callable[..., Any]) -> int:
    """Build the library into the cache and print where it is: 0, or 2 when the backend cannot
    run here, or 1 when the build fails."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = backend_cls.unavailable_reason(None)
    if reason:
        print(f"kernels.{backend_cls.name} cannot be built here: {reason}", file=sys.stderr)
        return 2
    try:
        print(load(args.cache_dir, verbose=args.verbose))
    except PluginError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


@dataclass
class CompileResult:
    """One source compiled to an object by a build's check: the command, its exit code and output;
    `target` names what it was compiled for (a CPU capability, a GPU architecture) where a check
    compiles a source more than once."""

    source: Path
    command: list[str]
    returncode: int
    output: str
    target: str = ""


def compile_all(commands: list[tuple[Path, str, list[str]]],
                result: type[CompileResult] = CompileResult) -> list[CompileResult]:
    """Run each (source, target, command) in parallel, one result each, in the order given."""
    def run(item: tuple[Path, str, list[str]]) -> CompileResult:
        source, target, cmd = item
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return result(source, cmd, done.returncode, done.stdout + done.stderr, target)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(run, commands))


def report_check(results: list[CompileResult], verbose: bool,
                 detail: Callable[[CompileResult], str] = lambda r: "") -> int:
    """Print a line per compiled source (ok or FAILED, what it was compiled for, and `detail`), the
    compiler's output where it failed (or always, verbose); 0 when every source compiled, else 1."""
    for r in results:
        target = f" for {r.target}" if r.target else ""
        print(f"{'ok    ' if r.returncode == 0 else 'FAILED'} {r.source.name}{target}{detail(r)}")
        if r.returncode or verbose:
            print(r.output, file=sys.stderr)
    return 0 if all(r.returncode == 0 for r in results) else 1


def extension_flags(name: str, csrc: Path) -> list[str]:
    """The flags torch's extension tools give every compile of a library named `name`: its defines,
    the C++ standard, and the include paths (the sources' folder, torch's, Python's)."""
    from torch.utils import cpp_extension

    # The tools hard-code the standard they build with (C++17 up to some 2.x, C++20 after): read it
    # from them, so the check compiles as a real build of this torch would.
    standard = "c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "c++17"
    dirs = [str(csrc), *cpp_extension.include_paths(), sysconfig.get_path("include")]
    return [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-std={standard}",
            *(flag for d in dirs for flag in ("-isystem", d))]
