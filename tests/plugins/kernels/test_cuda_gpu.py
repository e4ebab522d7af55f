"""kernels.cuda on a GPU: its ops against the torch reference on the same device, and whole models
token for token. The shared conformance suite runs backends on the CPU, where this one cannot run,
so these are its GPU checks; everything here skips where kernels.cuda is unavailable."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastgen
from conftest import ragged_batch
from fastgen.plugins.kernels.cuda import build
from fastgen.plugins.kernels.cuda.backend import CudaBackend
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend
from tiny_models import make_checkpoint

CUDA = torch.device("cuda")
REASON = CudaBackend.unavailable_reason(CUDA)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernels.cuda is unavailable: {REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (absolute, relative): fp32 differs by summation order only; fp16/bf16 by an ulp of the output.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
BLOCK_SIZE, NUM_BLOCKS = 16, 48
# (cached, new) per sequence: decodes at block edges, chunks starting mid-block, a fresh prompt.
MIXED = [(15, 1), (16, 1), (31, 1), (70, 1), (0, 1), (5, 27), (0, 21), (40, 20)]


@pytest.fixture(scope="module")
def cuda():
    return CudaBackend(CUDA)


@pytest.fixture(scope="module")
def reference():
    return TorchBackend(CUDA)


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, dtype, seed):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=CUDA).to(dtype)


def gpu_batch(shapes):
    batch = ragged_batch(shapes, BLOCK_SIZE, NUM_BLOCKS)
    moved = {f.name: getattr(batch, f.name).to(CUDA) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **moved)


def test_the_library_is_cached_under_its_key(cuda):
    assert (build.build_dir() / f"fastgen_cuda_{build.build_key()}.so").exists()
    assert build.load() == build.load()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 80), (4, 2, 96), (4, 1, 128)])
@pytest.mark.parametrize("window", [None, 24])
def test_attention_matches_the_reference(cuda, reference, dtype, heads, kv_heads, head_dim, window):
    batch = gpu_batch(MIXED)
    k_cache = randn(NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, seed=1)
    v_cache = randn(NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, seed=2)
    q = randn(batch.num_tokens, heads, head_dim, dtype=dtype, seed=3)
    outs = []
    for be in (cuda, reference):
        batch.attn_metadata = be.prepare(batch)
        outs.append(be.attention(q, k_cache, v_cache, batch, head_dim ** -0.5, window))
    assert_close(outs[0], outs[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_from_strided_views_matches_the_reference(cuda, reference, dtype):
    batch = gpu_batch(MIXED)
    heads, kv_heads, dim = 4, 2, 64
    # k and v as the model makes them: column slices of one fused qkv projection.
    qkv = randn(batch.num_tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=4)
    key = qkv[:, heads * dim:(heads + kv_heads) * dim].view(-1, kv_heads, dim)
    value = qkv[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
    caches = []
    for be in (cuda, reference):
        k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, kv_heads, dim, dtype=dtype, device=CUDA)
        v_cache = torch.zeros_like(k_cache)
        be.write_kv(key, value, k_cache, v_cache, batch.slot_mapping)
        caches.append((k_cache, v_cache))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert caches[0][0].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(cuda, reference, dtype, hidden, with_residual):
    x = randn(7, hidden, dtype=dtype, seed=5)
    weight = randn(hidden, dtype=dtype, seed=6)
    residual = randn(7, hidden, dtype=dtype, seed=7) if with_residual else None
    normed, new_residual = cuda.rms_norm(x, weight, 1e-6, residual)
    expected_normed, expected_residual = reference.rms_norm(x, weight, 1e-6, residual)
    assert_close(normed, expected_normed, dtype)
    assert torch.equal(new_residual, expected_residual)


def test_ops_name_the_argument_at_fault(cuda):
    ops = torch.ops.fastgen_cuda
    x = torch.randn(4, 64, device=CUDA)
    with pytest.raises(RuntimeError, match="fastgen_cuda::rms_norm: weight must hold one value per feature"):
        ops.rms_norm(x, torch.ones(32, device=CUDA), 1e-6)
    with pytest.raises(RuntimeError, match="fastgen_cuda::add_rms_norm: x and residual must share one dtype"):
        ops.add_rms_norm(x, x.half(), torch.ones(64, device=CUDA), 1e-6)
    cache = torch.zeros(4, 16, 2, 72, device=CUDA)
    lens = torch.tensor([3], dtype=torch.int32, device=CUDA)
    qsl = torch.tensor([0, 3], dtype=torch.int32, device=CUDA)
    table = torch.zeros(1, 1, dtype=torch.int32, device=CUDA)
    with pytest.raises(RuntimeError, match="fastgen_cuda::attention: head size 72 has no kernel"):
        ops.attention(torch.randn(3, 4, 72, device=CUDA), cache, cache, qsl, lens, table, 1.0, 0)
    with pytest.raises(RuntimeError, match="fastgen_cuda::attention: seq_lens must be int32"):
        ops.attention(torch.randn(3, 4, 72, device=CUDA), cache, cache, qsl, lens.long(), table, 1.0, 0)


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
                          max_num_seqs=8, num_blocks=64)
        tokens[kernels] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["cuda"] == tokens["torch"]
