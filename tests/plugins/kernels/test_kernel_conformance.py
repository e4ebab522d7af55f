"""Every op of the kernel set against the torch reference, on fresh random inputs.

Shapes are small (the Triton interpreter runs each program in numpy) but awkward: ragged batches
mixing decodes and prompt chunks, lengths crossing block boundaries, GQA ratios 1/2/4, sliding
windows, head sizes 64, 80 and 128, float32 and float16.
"""

from __future__ import annotations

import pytest
import torch

from kernel_batches import ragged_batch

DTYPES = [torch.float32, torch.float16]
# (absolute, relative) tolerance by dtype: fp16 rounds to ~1e-3 and accumulation order differs.
TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3)}
BLOCK_SIZE = 16
NUM_BLOCKS = 48


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def random(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def fill_cache(kv_heads, dim, dtype, seed):
    """A key and a value cache of random values in every slot of the pool."""
    shape = (NUM_BLOCKS, BLOCK_SIZE, kv_heads, dim)
    return random(*shape, dtype=dtype, seed=seed), random(*shape, dtype=dtype, seed=seed + 1)


def run_attention(be, q, k_cache, v_cache, batch, window):
    batch.attn_metadata = be.prepare(batch)
    return be.attention(q, k_cache, v_cache, batch, q.shape[-1] ** -0.5, window)


# (cached, new) per sequence: decodes at block edges (15, 16, 31 cached), prompt chunks that start
# mid-block and cross blocks, a fresh prompt, a single-token prompt.
MIXED = [(15, 1), (16, 1), (31, 1), (70, 1), (0, 1), (5, 27), (0, 21), (40, 20)]
DECODES = [(100, 1), (47, 1), (9, 1)]
CHUNKS = [(0, 33), (17, 16)]


HEADS = {"mha-d64": (4, 4, 64), "gqa2-d128": (4, 2, 128), "gqa4-d80": (8, 2, 80)}
# The mixed batch over every head shape, window and dtype; decode-only and chunk-only steps (planned
# with other tile shapes) over fewer combinations, to keep the interpreter's run short.
ATTENTION_CASES = (
    [("mixed", h, w, d) for h in HEADS for w in (None, 24) for d in DTYPES]
    + [("decodes", h, 24, torch.float16) for h in HEADS]
    + [("chunks", h, None, torch.float32) for h in HEADS]
    + [("chunks", "gqa4-d80", 24, torch.float16)])
SHAPES = {"mixed": MIXED, "decodes": DECODES, "chunks": CHUNKS}


@pytest.mark.parametrize("shapes,heads,window,dtype", ATTENTION_CASES,
                         ids=[f"{s}-{h}-{'window' if w else 'full'}-{str(d)[6:]}"
                              for s, h, w, d in ATTENTION_CASES])
def test_attention_matches_reference(backend, reference, shapes, heads, window, dtype):
    heads, kv_heads, dim = HEADS[heads]
    batch = ragged_batch(SHAPES[shapes], BLOCK_SIZE, NUM_BLOCKS)
    k_cache, v_cache = fill_cache(kv_heads, dim, dtype, seed=1)
    q = random(batch.num_tokens, heads, dim, dtype=dtype, seed=3)
    expected = run_attention(reference, q, k_cache, v_cache, batch, window)
    actual = run_attention(backend, q, k_cache, v_cache, batch, window)
    assert_close(actual, expected, dtype)


def test_kv_cache_write_matches_reference(backend, reference):
    for dtype in DTYPES:
        batch = ragged_batch(MIXED, BLOCK_SIZE, NUM_BLOCKS)
        key = random(batch.num_tokens, 2, 80, dtype=dtype, seed=5)
        value = random(batch.num_tokens, 2, 80, dtype=dtype, seed=6)
        caches = {}
        for be in (backend, reference):
            k_cache, v_cache = fill_cache(2, 80, dtype, seed=7)
            be.write_kv(key, value, k_cache, v_cache, batch.slot_mapping)
            caches[be.name] = (k_cache, v_cache)
        assert torch.equal(caches[backend.name][0], caches[reference.name][0])
        assert torch.equal(caches[backend.name][1], caches[reference.name][1])


def test_kv_cache_write_from_a_fused_projection(backend, reference):
    """key and value as the models pass them: strided views into one qkv projection."""
    batch = ragged_batch(CHUNKS, BLOCK_SIZE, NUM_BLOCKS)
    qkv = random(batch.num_tokens, (4 + 2 + 2) * 64, dtype=torch.float32, seed=8)
    _, key, value = qkv.split([4 * 64, 2 * 64, 2 * 64], dim=-1)
    key, value = key.view(-1, 2, 64), value.view(-1, 2, 64)
    results = []
    for be in (backend, reference):
        k_cache, v_cache = fill_cache(2, 64, torch.float32, seed=9)
        be.write_kv(key, value, k_cache, v_cache, batch.slot_mapping)
        results.append((k_cache, v_cache))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 1000])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(backend, reference, dtype, hidden, with_residual):
    x = random(7, hidden, dtype=dtype, seed=10)
    residual = random(7, hidden, dtype=dtype, seed=11) if with_residual else None
    weight = random(hidden, dtype=dtype, seed=12)
    normed, new_residual = backend.rms_norm(x, weight, 1e-6, residual)
    exp_normed, exp_residual = reference.rms_norm(x, weight, 1e-6, residual)
    assert_close(normed, exp_normed, dtype)
    assert_close(new_residual, exp_residual, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dim,rotary_dims", [(64, 64), (128, 128), (80, 80), (64, 32)],
                         ids=["d64", "d128", "d80", "partial"])
def test_rotary_matches_reference(backend, reference, dtype, is_neox, dim, rotary_dims):
    tokens = 9
    qkv = random(tokens, (4 + 2 + 2) * dim, dtype=dtype, seed=13)
    q, k, _ = qkv.split([4 * dim, 2 * dim, 2 * dim], dim=-1)    # strided, as the models pass them
    q, k = q.view(tokens, 4, dim), k.view(tokens, 2, dim)
    angles = torch.rand(tokens, rotary_dims // 2, generator=torch.Generator().manual_seed(14)) * 50
    cos, sin = angles.cos(), angles.sin()
    q_out, k_out = backend.rotary(q, k, cos, sin, is_neox)
    q_exp, k_exp = reference.rotary(q, k, cos, sin, is_neox)
    assert_close(q_out, q_exp, dtype)
    assert_close(k_out, k_exp, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [128, 344])
def test_silu_and_mul_matches_reference(backend, reference, dtype, inter):
    x = random(6, 2 * inter, dtype=dtype, seed=15) * 4
    assert_close(backend.silu_and_mul(x), reference.silu_and_mul(x), dtype)
