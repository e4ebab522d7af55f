"""Build the C++ sources in csrc/ with torch's extension tools, once per source, toolchain and CPU.

The library lands in `<cache>/cpu-kernels/<key>/`, where the key hashes the sources and their
folder, the torch version and folder, the compiler's version and the compiler flags. The flags
follow the vector instruction set torch itself dispatches to on this CPU (AVX512, AVX2 or none),
so a cache shared between machines never hands one CPU a library built for another's
instructions. Build ahead of time with

    python -m fastgen.plugins.kernels.cpu.build [--cache-dir DIR] [--verbose]
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
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
# -fopenmp: at::parallel_for is a header template whose `omp parallel` pragma compiles into the
# caller, so without it every op would run on one thread. The library then links libgomp.so.1,
# which resolves to the copy torch has already loaded: one OpenMP runtime in the process.
BASE_CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# torch's names for its CPU dispatch levels -> the flags its own kernels of that level build with.
CAPABILITY_CFLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}

_lock = threading.Lock()
# build key -> the library loaded for it. Keyed by the key, not the folder: a second copy of the
# library would register the fastgen_cpu ops again, which torch refuses, so a library loaded from
# one cache root also serves a later backend of the same process made with another.
_loaded: dict[str, Path] = {}


def compiler() -> str | None:
    """The C++ compiler torch's extension tools will call ($CXX, else c++), as a path; None if absent."""
    return shutil.which(os.environ.get("CXX", "c++"))


def capability_cflags(capability: str) -> list[str]:
    """The flags for torch's CPU dispatch level `capability`; the plain fallback for any other."""
    return CAPABILITY_CFLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])


def cflags() -> list[str]:
    return BASE_CFLAGS + capability_cflags(torch.backends.cpu.get_cpu_capability())


def sources(csrc: Path = CSRC) -> list[Path]:
    return sorted(p for p in csrc.iterdir() if p.suffix == ".cpp")


def build_key(csrc: Path = CSRC) -> str:
    """Changes with any file in csrc/ (headers too), the torch and compiler versions and the flags,
    and with where the sources and torch live: the build commands name both paths, so two checkouts
    sharing one key would rebuild over each other's library."""
    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    cxx = compiler()
    toolchain = [str(csrc.resolve()), str(Path(torch.__file__).parent), torch.__version__, str(cxx),
                 _compiler_version(cxx), " ".join(cflags() + LDFLAGS)]
    digest.update("|".join(toolchain).encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str | None) -> str:
    if cxx is None:
        return ""
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout


def build_dir(cache_dir: str | None = None, csrc: Path = CSRC) -> Path:
    return cache_root(cache_dir) / "cpu-kernels" / build_key(csrc)


def is_built(cache_dir: str | None = None, csrc: Path = CSRC) -> bool:
    """Whether load() would find a library, loaded or on disk, without compiling."""
    directory = build_dir(cache_dir, csrc)
    return directory.name in _loaded or library_built("cpu", directory)


def load(cache_dir: str | None = None, verbose: bool = False, csrc: Path = CSRC) -> Path:
    """Build (first use) or load the library, registering torch.ops.fastgen_cpu; once per process."""
    with _lock:
        directory = build_dir(cache_dir, csrc)
        if directory.name in _loaded:
            return _loaded[directory.name]
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        name = library_name("cpu", directory)
        if not library_built("cpu", directory):
            log.info("Building the fastgen CPU kernels into %s (first use: about a minute).", directory)
        try:
            # Copies of the flag lists: torch's extension tools append to the ones they are given.
            library = cpp_extension.load(
                name=name, sources=[str(s) for s in sources(csrc)], extra_include_paths=[str(csrc)],
                extra_cflags=cflags(), extra_ldflags=list(LDFLAGS), build_directory=str(directory),
                is_python_module=False, verbose=verbose)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            raise PluginError(f"Building the CPU kernels in {directory} failed ({_first_line(e)}); "
                              f"run `python -m fastgen.plugins.kernels.cpu.build --verbose` to see the "
                              f"compiler output, or choose another backend with --kernels torch.") from e
        log.info("Loaded the fastgen CPU kernels from %s.", directory)
        _loaded[directory.name] = Path(library) if library else directory
        return _loaded[directory.name]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- compile check: every source to an object for every CPU capability, as a build there would --

def check_capabilities() -> list[str]:
    """The capabilities the check compiles for: each one torch dispatches to on x86-64, and the
    plain C++ fallback of every other CPU."""
    return [*CAPABILITY_CFLAGS, "DEFAULT"]


def compile_objects(out_dir: Path, capabilities: list[str] | None = None,
                    csrc: Path = CSRC) -> list[CompileResult]:
    """Compile every source to an object (no link) with each capability's flags, in parallel, so a
    source that a machine with other vector instructions cannot build fails here too. Needs only
    the compiler, not the CPU: the objects are never run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = compiler() or "c++"
    common = [*extension_flags("fastgen_cpu_check", csrc), "-fPIC", *BASE_CFLAGS]
    commands = []
    for capability in capabilities or check_capabilities():
        for source in sources(csrc):
            out = out_dir / f"{source.stem}.{capability}.o"
            commands.append((source, capability, [cxx, "-c", str(source), "-o", str(out), *common,
                                                  *capability_cflags(capability)]))
    return compile_all(commands)


def main(argv: list[str] | None = None) -> int:
    from .backend import CpuBackend

    parser = build_parser("cpu")
    parser.add_argument("--check", metavar="OUT_DIR", type=Path,
                        help="only compile each source to an object in OUT_DIR for every CPU capability "
                             f"({', '.join(check_capabilities())}); runs none of them")
    args = parser.parse_args(argv)
    if args.check:
        if compiler() is None:
            print("No C++ compiler was found (set CXX, or install g++).", file=sys.stderr)
            return 2
        return report_check(compile_objects(args.check), args.verbose)
    return build_ahead(args, CpuBackend, load)


if __name__ == "__main__":
    sys.exit(main())
