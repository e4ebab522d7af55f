"""kernels.cuda's kernels on the CPU: csrc/ built with g++ against an emulated CUDA runtime
(cuda_emulator_src/emulator.h: a thread per CUDA thread, barriers for __syncthreads and the warp
shuffles), called through ctypes.

`EmulatedOps` stands in for `torch.ops.fastgen_cuda` with the same op signatures on CPU tensors,
and `EmulatedCudaBackend` is kernels.cuda's backend over it, so the conformance suite and whole
models run kernels.cuda's kernels here. Its glue mirrors ops.cpp's (outputs, strides,
the params structs of kernels.h); the argument checks of ops.cpp are tested on a GPU.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fastgen.plugins.kernels.cuda import build
from fastgen.plugins.kernels.cuda.backend import CudaBackend

SRC = Path(__file__).parent / "cuda_emulator_src"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}   # kernels.h's DType

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;]*?>)?)<<<(.*?)>>>\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def emulated_source(text: str) -> str:
    """A .cu file's text with each launch and dynamic shared array in the emulator's terms."""
    text = _LAUNCH.sub(lambda m: f"emu::Launch({m.group(2)})({m.group(1)}, ", text)
    return _DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = emu::dynamic_shared<{m.group(1)}>();",
                               text)


def build_library(work_dir: Path) -> Path:
    """Compile every .cu of csrc/ and the C entry points into one shared library."""
    source_dir = work_dir / "src"
    source_dir.mkdir(parents=True, exist_ok=True)
    # A header with a stand-in of the same name (sm80.cuh) is left out: `#include "..."` would find
    # the copy beside the sources before the stand-in.
    stand_ins = {h.name for h in (SRC / "include").iterdir()}
    for header in build.CSRC.glob("*.*h"):
        if header.name not in stand_ins:
            shutil.copy(header, source_dir)
    sources = []
    for cu in sorted(build.CSRC.glob("*.cu")):
        target = source_dir / f"{cu.stem}.cpp"
        target.write_text(emulated_source(cu.read_text()))
        sources.append(str(target))
    library = work_dir / "libfastgen_cuda_emulated.so"
    command = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-include",
               str(SRC / "emulator.h"), f"-I{SRC / 'include'}", f"-I{source_dir}", *sources,
               str(SRC / "entry.cpp"), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"building the emulated CUDA kernels failed:\n{' '.join(command)}\n{done.stderr}")
    return library


# The params structs of kernels.h, field for field.
class AttentionParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("q", ctypes.c_void_p), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("query_start_loc", ctypes.c_void_p),
                ("seq_lens", ctypes.c_void_p), ("block_tables", ctypes.c_void_p),
                ("num_tokens", ctypes.c_int), ("num_seqs", ctypes.c_int), ("max_blocks", ctypes.c_int),
                ("block_size", ctypes.c_int), ("num_heads", ctypes.c_int), ("num_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("q_token_stride", ctypes.c_int64),
                ("q_head_stride", ctypes.c_int64), ("scale", ctypes.c_float),
                ("sliding_window", ctypes.c_int), ("num_splits", ctypes.c_int),
                ("part_out", ctypes.c_void_p), ("part_max", ctypes.c_void_p), ("part_sum", ctypes.c_void_p),
                ("prompt_tiles", ctypes.c_void_p), ("num_prompt_tiles", ctypes.c_int)]


class WriteKVParams(ctypes.Structure):
    _fields_ = [("key", ctypes.c_void_p), ("value", ctypes.c_void_p), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("slot_mapping", ctypes.c_void_p),
                ("num_tokens", ctypes.c_int), ("num_kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("key_token_stride", ctypes.c_int64), ("key_head_stride", ctypes.c_int64),
                ("value_token_stride", ctypes.c_int64), ("value_head_stride", ctypes.c_int64)]


class RMSNormParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("residual_out", ctypes.c_void_p), ("x", ctypes.c_void_p),
                ("residual", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("num_tokens", ctypes.c_int),
                ("hidden", ctypes.c_int), ("x_row_stride", ctypes.c_int64),
                ("residual_row_stride", ctypes.c_int64), ("eps", ctypes.c_float)]


class RotaryParams(ctypes.Structure):
    _fields_ = [("q_out", ctypes.c_void_p), ("k_out", ctypes.c_void_p), ("q", ctypes.c_void_p),
                ("k", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("num_tokens", ctypes.c_int), ("num_heads", ctypes.c_int), ("num_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("rotary_half", ctypes.c_int),
                ("q_token_stride", ctypes.c_int64), ("q_head_stride", ctypes.c_int64),
                ("k_token_stride", ctypes.c_int64), ("k_head_stride", ctypes.c_int64),
                ("is_neox", ctypes.c_bool)]


class SiluAndMulParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("num_tokens", ctypes.c_int),
                ("inter", ctypes.c_int), ("x_row_stride", ctypes.c_int64)]


class SampleParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("logits", ctypes.c_void_p), ("temperatures", ctypes.c_void_p),
                ("top_k", ctypes.c_void_p), ("top_p", ctypes.c_void_p), ("seeds", ctypes.c_void_p),
                ("num_rows", ctypes.c_int), ("vocab", ctypes.c_int), ("row_stride", ctypes.c_int64),
                ("cuts", ctypes.c_void_p), ("given_cuts", ctypes.c_void_p)]


STRUCTS = (AttentionParams, WriteKVParams, RMSNormParams, RotaryParams, SiluAndMulParams, SampleParams)
HEAD_SIZES = (64, 80, 96, 112, 128, 256)   # kAttentionHeadSizes
MAX_SPLITS = 32                           # kMaxAttentionSplits


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class EmulatedOps:
    """torch.ops.fastgen_cuda's ops on CPU tensors, run by the emulated kernels."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.lib.emu_sizeof.restype = ctypes.c_size_t
        for i, struct in enumerate(STRUCTS):
            assert self.lib.emu_sizeof(i) == ctypes.sizeof(struct), f"{struct.__name__} differs from kernels.h"

    def _launch(self, name: str, params: ctypes.Structure, dtype: torch.dtype) -> None:
        error = getattr(self.lib, f"emu_{name}")(ctypes.byref(params), DTYPE_CODES[dtype])
        assert error == 0, f"{name} returned {error}"

    def attention_head_sizes(self):
        return list(HEAD_SIZES)

    def attention_prompt_tile_tokens(self):
        return self.lib.emu_prompt_tile_tokens()

    def attention(self, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                  sliding_window, num_splits=1, prompt_tiles=None):
        tokens, heads, dim = q.shape
        out = torch.empty(tokens, heads, dim, dtype=q.dtype)
        parts = [None] * 3
        if num_splits > 1:
            parts = [torch.empty(num_splits, tokens, heads, dim), torch.empty(num_splits, tokens, heads),
                     torch.empty(num_splits, tokens, heads)]
        tables = block_tables.contiguous()
        keep = (query_start_loc.contiguous(), seq_lens.contiguous(), tables)
        # As ops.cpp: the tiles run where the caches start on 16 bytes (the emulated GPU has
        # tensor cores).
        aligned = k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0
        tiles = None
        if prompt_tiles is not None and prompt_tiles.shape[0] > 0 and aligned:
            tiles = prompt_tiles.contiguous()
        p = AttentionParams(_ptr(out), _ptr(q), _ptr(k_cache), _ptr(v_cache), *map(_ptr, keep),
                            tokens, seq_lens.shape[0], tables.shape[1], k_cache.shape[1], heads,
                            k_cache.shape[2], dim, q.stride(0), q.stride(1), scale,
                            max(sliding_window, 0), num_splits, *map(_ptr, parts), _ptr(tiles),
                            0 if tiles is None else tiles.shape[0])
        self._launch("attention", p, q.dtype)
        return out

    def _sample(self, logits, temperatures, top_k, top_p, seeds, cuts, given_cuts=None):
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        keep = [t.contiguous() for t in (temperatures, top_k, top_p, seeds)]
        given = None if given_cuts is None else given_cuts.contiguous()
        p = SampleParams(_ptr(out), _ptr(logits), *map(_ptr, keep), logits.shape[0], logits.shape[1],
                         logits.stride(0), _ptr(cuts), _ptr(given))
        self._launch("sample", p, torch.float32)
        return out

    def sample(self, logits, temperatures, top_k, top_p, seeds, cuts=None):
        return self._sample(logits, temperatures, top_k, top_p, seeds, None, cuts)

    def sample_cuts(self, logits, temperatures, top_k, top_p):
        cuts = torch.empty(logits.shape[0])
        self._sample(logits, temperatures, top_k, top_p, torch.zeros(logits.shape[0], dtype=torch.int64), cuts)
        return cuts

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping):
        slots = slot_mapping.contiguous()
        p = WriteKVParams(_ptr(key), _ptr(value), _ptr(k_cache), _ptr(v_cache), _ptr(slots),
                          key.shape[0], key.shape[1], key.shape[2], key.stride(0), key.stride(1),
                          value.stride(0), value.stride(1))
        self._launch("write_kv", p, key.dtype)

    def _rms_norm(self, x, residual, weight, eps):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        residual_out = None if residual is None else torch.empty_like(out)
        w = weight.contiguous()
        p = RMSNormParams(_ptr(out), _ptr(residual_out), _ptr(x), _ptr(residual), _ptr(w), x.shape[0],
                          x.shape[1], x.stride(0), 0 if residual is None else residual.stride(0), eps)
        self._launch("rms_norm", p, x.dtype)
        return out, residual_out

    def rms_norm(self, x, weight, eps):
        return self._rms_norm(x, None, weight, eps)[0]

    def add_rms_norm(self, x, residual, weight, eps):
        return self._rms_norm(x, residual, weight, eps)

    def rotary(self, q, k, cos, sin, is_neox):
        c, s = cos.float().contiguous(), sin.float().contiguous()
        q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
        p = RotaryParams(_ptr(q_out), _ptr(k_out), _ptr(q), _ptr(k), _ptr(c), _ptr(s), q.shape[0],
                         q.shape[1], k.shape[1], q.shape[2], c.shape[1], q.stride(0), q.stride(1),
                         k.stride(0), k.stride(1), is_neox)
        self._launch("rotary", p, q.dtype)
        return q_out, k_out

    def silu_and_mul(self, x):
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
        p = SiluAndMulParams(_ptr(out), _ptr(x), x.shape[0], out.shape[1], x.stride(0))
        self._launch("silu_and_mul", p, x.dtype)
        return out


# --- kernels.cuda's backend over the emulated kernels ----------------------------------------

def available() -> str | None:
    """None where the emulator builds and runs (g++ and glibc's ucontext on Linux); else why not."""
    if shutil.which("g++") is None:
        return "g++ was not found"
    if not sys.platform.startswith("linux"):
        return f"the emulator's fibers need glibc's ucontext (Linux), not {sys.platform}"
    return None


@functools.lru_cache(maxsize=1)
def emulated_ops() -> EmulatedOps:
    """The emulated ops, built once per test process into a temporary folder (~10 s)."""
    work_dir = Path(tempfile.mkdtemp(prefix="fastgen-cuda-emulated-"))
    atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    return EmulatedOps(build_library(work_dir))


class EmulatedCudaBackend(CudaBackend):
    """kernels.cuda as it is (its Python side, csrc/'s kernels) with the kernels run by the
    emulator on CPU tensors instead of built by nvcc and run on a GPU."""

    @classmethod
    def load_ops(cls, cache_dir):
        return emulated_ops()
