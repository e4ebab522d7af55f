"""Build the CUDA sources in csrc/ with torch's extension tools, once per source and toolchain.

The library lands in `<cache>/cuda-kernels/<key>/`, where the key hashes the sources and the torch,
CUDA and nvcc versions, so an edited source or an upgraded torch builds anew and an unchanged one
loads in a moment. Build ahead of time (on the GPU machine, before serving) with

    python -m fastgen.plugins.kernels.cuda.build [--cache-dir DIR]

and check that every source compiles, without a GPU, with `... build --check OUT_DIR`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from fastgen.checkpoint import cache_root
from fastgen.errors import PluginError
from fastgen.plugins.kernels.compiled import (CompileResult, build_ahead, build_parser, compile_all,
                                              extension_flags, library_built, library_name,
                                              report_check)

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3", "-lineinfo"]
# The check type-checks device code for sm_80 (bf16 arithmetic needs it) and builds it for Hopper
# (sm_90) through ptxas, whose report (-v) gives each kernel's registers and spills.
CHECK_ARCH_FLAGS = ["-gencode=arch=compute_80,code=compute_80", "-gencode=arch=compute_90,code=sm_90",
                    "-Xptxas", "-v"]

_lock = threading.Lock()
_loaded: Path | None = None


def sources(csrc: Path = CSRC) -> list[Path]:
    """The translation units, in a stable order."""
    return sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".cu"))


def nvcc_path() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH as torch's extension tools look for it, else from PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidate = Path(home) / "bin" / "nvcc"
        return str(candidate) if candidate.exists() else None
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> str:
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "unknown"


def build_key(csrc: Path = CSRC) -> str:
    """Changes with any file in csrc/ (headers too) and with the torch, CUDA and nvcc versions."""
    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    nvcc = nvcc_path()
    toolchain = f"{torch.__version__}|{torch.version.cuda}|{nvcc_version(nvcc) if nvcc else None}"
    digest.update(toolchain.encode())
    return digest.hexdigest()[:16]


def build_dir(cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "cuda-kernels" / build_key()


def is_built(cache_dir: str | None = None) -> bool:
    """Whether load() would find a library, loaded or on disk, without compiling."""
    return _loaded is not None or library_built("cuda", build_dir(cache_dir))


def load(cache_dir: str | None = None, verbose: bool = False) -> Path:
    """Build (first use) or load the library, registering torch.ops.fastgen_cuda; once per process."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        from torch.utils import cpp_extension

        directory = build_dir(cache_dir)
        directory.mkdir(parents=True, exist_ok=True)
        name = library_name("cuda", directory)
        if not library_built("cuda", directory):
            log.info("Building the fastgen CUDA kernels into %s (first use: a minute or two).", directory)
        try:
            library = cpp_extension.load(
                name=name, sources=[str(s) for s in sources()], extra_include_paths=[str(CSRC)],
                extra_cflags=EXTRA_CFLAGS, extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
                build_directory=str(directory), is_python_module=False, verbose=verbose)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            raise PluginError(f"Building the CUDA kernels in {directory} failed ({_first_line(e)}); "
                              f"run `python -m fastgen.plugins.kernels.cuda.build --verbose` to see "
                              f"the compiler output, or choose another backend with --kernels torch."
                              ) from e
        log.info("Loaded the fastgen CUDA kernels from %s.", directory)
        _loaded = Path(library) if library else directory
        return _loaded


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- compile check: every source to an object, as the real build would, without a GPU ---------


class NvccResult(CompileResult):
    """A source compiled by nvcc, and what ptxas reported of its kernels (sm_90)."""

    @property
    def registers(self) -> list[int]:
        """Registers per thread of each kernel ptxas built (sm_90), from its -v report."""
        return [int(n) for n in re.findall(r"Used (\d+) registers", self.output)]

    @property
    def spill_bytes(self) -> int:
        """Bytes spilled to local memory (stores + loads) by the worst kernel; 0 is none."""
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", self.output)
        return max((int(a) + int(b) for a, b in spills), default=0)


def _cuda_stub_include(work_dir: Path) -> list[str]:
    """CPU wheels of torch ship the c10/cuda headers without a generated one; a CUDA wheel's copy
    defines only the shared-library switch, so a stand-in in work_dir compiles the same code."""
    from torch.utils import cpp_extension

    torch_include = Path(cpp_extension.include_paths()[0])
    if (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        return []
    stub = work_dir / "stub-include" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return ["-isystem", str(work_dir / "stub-include")]


def compile_commands(out_dir: Path, nvcc: str, csrc: Path = CSRC) -> list[tuple[Path, str, list[str]]]:
    """(source, target, command) compiling each source in csrc/ to an object in out_dir, with the
    defines, include paths and -std that torch's extension tools use. nvcc compiles the .cpp files
    too: it hands them to the host compiler with the CUDA include path the c10/cuda headers need."""
    from torch.utils import cpp_extension

    common = [*extension_flags("fastgen_cuda_check", csrc), *_cuda_stub_include(out_dir),
              "--compiler-options", "-fPIC"]
    commands = []
    for source in sources(csrc):
        flags = ([*cpp_extension.COMMON_NVCC_FLAGS, *CHECK_ARCH_FLAGS, *EXTRA_CUDA_CFLAGS]
                 if source.suffix == ".cu" else EXTRA_CFLAGS)
        out = out_dir / f"{source.name}.o"
        commands.append((source, "", [nvcc, "-c", str(source), "-o", str(out), *common, *flags]))
    return commands


def compile_objects(out_dir: Path, nvcc: str, csrc: Path = CSRC) -> list[NvccResult]:
    """Compile every source to an object (no link, no GPU), in parallel; one result per source."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return compile_all(compile_commands(out_dir, nvcc, csrc), NvccResult)


def _register_usage(r: NvccResult) -> str:
    if r.returncode or not r.registers:
        return ""
    return (f" (sm_90: {min(r.registers)}-{max(r.registers)} registers, "
            f"{f'{r.spill_bytes} bytes spilled' if r.spill_bytes else 'no spills'})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("cuda")
    parser.add_argument("--check", metavar="OUT_DIR", type=Path,
                        help="only compile each source to an object in OUT_DIR; needs nvcc, no GPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        nvcc = nvcc_path()
        if nvcc is None:
            print("nvcc was not found; install the CUDA toolkit or set CUDA_HOME.", file=sys.stderr)
            return 2
        return report_check(compile_objects(args.check, nvcc), args.verbose, _register_usage)

    from .backend import CudaBackend

    return build_ahead(args, CudaBackend, load)


if __name__ == "__main__":
    sys.exit(main())
