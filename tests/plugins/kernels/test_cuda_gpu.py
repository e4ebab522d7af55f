"""kernels.cuda on a GPU: what is particular to it. Its ops against kernels.torch on the same GPU
are in the shared conformance suite (its `cuda-cuda` cases); here are its build cache, its argument
errors and whole models token for token. Everything here skips where kernels.cuda is unavailable."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastgen
from fastgen.plugins.kernels.cuda import build
from fastgen.plugins.kernels.cuda.backend import CudaBackend
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend
from kernel_batches import ragged_batch
from tiny_models import make_checkpoint

CUDA = torch.device("cuda")
REASON = CudaBackend.unavailable_reason(CUDA)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernels.cuda is unavailable: {REASON}")


@pytest.fixture(scope="module")
def cuda():
    return CudaBackend(CUDA)


def test_the_library_is_cached_under_its_key(cuda):
    assert (build.build_dir() / f"fastgen_cuda_{build.build_key()}.so").exists()
    assert build.load() == build.load()


# Each bad call, in a process of its own: on the H200 and H100 machines (torch 2.11.0+cu130, gcc
# 13.3, 2026-11-27 and -28) the first of them ended the process with a segmentation fault where it
# should raise, inside the ostream that TORCH_CHECK's message formatting instantiated in the
# library (csrc/ops.cpp now formats its messages itself); here a crash is one failed test, not a
# dead test run.
ARGUMENT_ERRORS = r"""
import sys
import torch
from fastgen.plugins.kernels.cuda import build

build.load()
ops, dev = torch.ops.fastgen_cuda, "cuda"
x = torch.randn(4, 64, device=dev)
cache = torch.zeros(4, 16, 2, 72, device=dev)
lens = torch.tensor([3], dtype=torch.int32, device=dev)
qsl = torch.tensor([0, 3], dtype=torch.int32, device=dev)
table = torch.zeros(1, 1, dtype=torch.int32, device=dev)
q72, q64, cache64 = torch.randn(3, 4, 72, device=dev), torch.randn(3, 4, 64, device=dev), cache[..., :64].contiguous()
calls = [
    lambda: ops.rms_norm(x, torch.ones(32, device=dev), 1e-6),
    lambda: ops.add_rms_norm(x, x.half(), torch.ones(64, device=dev), 1e-6),
    lambda: ops.attention(q72, cache, cache, qsl, lens, table, 1.0, 0),
    lambda: ops.attention(q72, cache, cache, qsl, lens.long(), table, 1.0, 0),
    lambda: ops.attention(q64, cache64, cache64, qsl, lens, table, 1.0, 0, 0),
    lambda: ops.attention(q64, cache64, cache64, qsl, lens, table, 1.0, 0, 1,
                          torch.zeros(1, 2, dtype=torch.long, device=dev)),
]
for call in calls:
    try:
        call()
        print("no error", flush=True)
    except RuntimeError as e:
        print(str(e).splitlines()[0], flush=True)
"""


def test_ops_name_the_argument_at_fault(cuda):
    done = subprocess.run([sys.executable, "-c", ARGUMENT_ERRORS], capture_output=True, text=True,
                          timeout=300)
    said = done.stdout.splitlines()
    assert done.returncode == 0, (f"exit {done.returncode} after {len(said)} of the bad calls "
                                  f"(-11: a segmentation fault): {said}\n{done.stderr[-2000:]}")
    expected = ["fastgen_cuda::rms_norm: weight must hold one value per feature",
                "fastgen_cuda::add_rms_norm: x and residual must share one dtype",
                "fastgen_cuda::attention: head size 72 has no kernel",
                "fastgen_cuda::attention: seq_lens must be int32",
                "fastgen_cuda::attention: num_splits must be in [1, 32], got 0",
                "fastgen_cuda::attention: prompt_tiles must be int32"]
    assert len(said) == len(expected)
    for line, start in zip(said, expected):
        assert start in line, (line, start)


@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("num_splits", [1, 2, 7, 32])
def test_split_kv_matches_the_reference(cuda, num_splits, window):
    # Long decodes and a prompt chunk, so that parts cross blocks, hold one key or none.
    batch = ragged_batch([(1500, 1), (37, 1), (600, 20)], block_size=16, num_blocks=160, device=CUDA)
    caches = [torch.randn(160, 16, 2, 128, device=CUDA) for _ in range(2)]
    q = torch.randn(batch.num_tokens, 8, 128, device=CUDA)
    out = torch.ops.fastgen_cuda.attention(q, *caches, batch.query_start_loc, batch.seq_lens,
                                           batch.block_tables, 0.08, window or 0, num_splits)
    reference = TorchBackend(CUDA)
    batch.attn_metadata = reference.prepare(batch)
    torch.testing.assert_close(out, reference.attention(q, *caches, batch, 0.08, window),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_prompt_tiles_match_the_reference(cuda, dtype, dim, window, num_splits, monkeypatch):
    # The tensor-core kernel of prompt chunks on the GPU's own mma.sync (sm_80 or newer; older GPUs
    # run the per-token kernel, which this checks as well): tiles cut short, cached prefixes,
    # decodes beside them.
    batch = ragged_batch([(0, 300), (7, 1), (50, 2), (900, 77), (37, 1)], block_size=16, num_blocks=160,
                         device=CUDA)
    caches = [torch.randn(160, 16, 2, dim, device=CUDA).to(dtype) for _ in range(2)]
    q = torch.randn(batch.num_tokens, 8, dim, device=CUDA).to(dtype)
    monkeypatch.setattr(cuda, "num_kv_splits", num_splits)   # 4: tiles split too
    batch.attn_metadata = cuda.prepare(batch)
    assert batch.attn_metadata.prompt_tiles is not None
    out = cuda.attention(q, *caches, batch, dim ** -0.5, window)
    reference = TorchBackend(CUDA)
    batch.attn_metadata = reference.prepare(batch)
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out, reference.attention(q, *caches, batch, dim ** -0.5, window),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("arch", ["llama", "mistral"])   # mistral: sliding window 24
def test_whole_models_give_the_reference_tokens(tmp_path, arch):
    # Head size 64, which has a CUDA kernel (the shared tiny models use 16, which falls back).
    make_checkpoint(tmp_path, arch, hidden_size=256, intermediate_size=512)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 17, 40, 130)]
    params = fastgen.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = {}
    for kernels in ("cuda", "torch"):
        llm = fastgen.LLM(model=str(tmp_path), kernels=kernels, device="cuda", token_budget=32,
                          max_num_seqs=8, num_blocks=64, dtype="float32")
        tokens[kernels] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["cuda"] == tokens["torch"]


def test_top_p_cuts_are_the_same_on_every_run(cuda):
    # The mass histogram's sums are integers, so the order in which the block's threads add them
    # cannot move a cut (float atomics could, by the last bit of a sum near the target).
    ops = torch.ops.fastgen_cuda
    g = torch.Generator(device=CUDA).manual_seed(0)
    rows, vocab = 64, 32000
    logits = torch.randn(rows, vocab, device=CUDA, generator=g) * 3
    temperatures = torch.full((rows,), 0.7, device=CUDA)
    top_k = torch.zeros(rows, dtype=torch.int64, device=CUDA)
    top_p = torch.linspace(0.05, 0.99, rows, device=CUDA)
    first = ops.sample_cuts(logits, temperatures, top_k, top_p)
    for _ in range(20):
        assert torch.equal(ops.sample_cuts(logits, temperatures, top_k, top_p), first)
