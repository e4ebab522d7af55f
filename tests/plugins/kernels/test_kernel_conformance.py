"""Every op of the kernel set against the torch reference, on fresh random inputs.

Each case runs on every (backend, device) pair where the backend can run here (`triton-cuda`,
`cpu-cpu`, ...), against kernels.torch on the same device from the same inputs; kernels.torch on
a GPU is checked against itself on the CPU; kernels.cuda's kernels, emulated on the CPU where g++
builds them (`cuda-emulated`, tests/plugins/kernels/cuda_emulator.py), against kernels.torch on
the CPU. The inputs are drawn on the CPU, so every device
sees the same values.

Shapes are small (the Triton interpreter runs each program in numpy) but awkward: ragged batches
mixing decodes and prompt chunks, lengths crossing block boundaries, GQA ratios 1/2/4, sliding
windows, head sizes 64, 80 and 128, float32 and float16, and bfloat16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastgen.kernels import linear_of, reference_tolerance
from fastgen.step_graphs import MixedRows, padded_tokens
from kernel_batches import (REFERENCE, make_backend, poisoned_outside_keys, ragged_batch, target_name,
                           with_emulated_cuda)
from kernel_targets import CPU, kernel_targets

# bfloat16 on GPUs only: the Triton interpreter has none, so the CPU cases stay as they were.
GPU_DTYPES = [torch.bfloat16] if torch.cuda.is_available() else []
DTYPES = [torch.float32, torch.float16] + GPU_DTYPES
BLOCK_SIZE = 16
NUM_BLOCKS = 48

# kernels.torch is the reference on each device, so on the CPU it has nothing to be checked against.
# kernels.cuda's kernels also run here without a GPU, emulated on the CPU (`cuda-emulated`).
TARGETS = with_emulated_cuda([t for t in kernel_targets() if t != (REFERENCE, CPU)])


@pytest.fixture(params=TARGETS, ids=[target_name(t) for t in TARGETS])
def backend(request):
    name, device = request.param
    if request.node.callspec.params.get("dtype") in GPU_DTYPES and device.type != "cuda":
        pytest.skip("bfloat16 cases run on GPUs only")
    return make_backend(name, device)


@pytest.fixture
def reference(backend):
    """kernels.torch on the backend's device; for kernels.torch itself, on the CPU."""
    return make_backend(REFERENCE, CPU if backend.name == REFERENCE else backend.device)


def dtypes_on(device: torch.device) -> list[torch.dtype]:
    return DTYPES if device.type == "cuda" else [d for d in DTYPES if d not in GPU_DTYPES]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = reference_tolerance(dtype, on_gpu="cuda" in (actual.device.type, expected.device.type))
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol)


def random(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def fill_cache(kv_heads, dim, dtype, seed):
    """A key and a value cache of random values in every slot of the pool."""
    shape = (NUM_BLOCKS, BLOCK_SIZE, kv_heads, dim)
    return random(*shape, dtype=dtype, seed=seed), random(*shape, dtype=dtype, seed=seed + 1)


def on(be, *tensors):
    """The inputs on the backend's device (the same tensors where that is the CPU)."""
    return [None if t is None else t.to(be.device) for t in tensors]


def run_both(backend, reference, op, *inputs):
    """[op(backend, *inputs), op(reference, *inputs)], each with the inputs on its own device."""
    return [op(be, *on(be, *inputs)) for be in (backend, reference)]


def split_qkv(qkv, heads, kv_heads, dim):
    """q, k, v as the models pass them: strided views into one fused projection [T, (H+2Hkv)*D]."""
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)


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
    shapes = SHAPES[shapes]
    k_cache, v_cache = fill_cache(kv_heads, dim, dtype, seed=1)
    q = random(sum(new for _, new in shapes), heads, dim, dtype=dtype, seed=3)

    def attention(be, q, k_cache, v_cache):
        batch = ragged_batch(shapes, BLOCK_SIZE, NUM_BLOCKS, device=be.device)
        batch.attn_metadata = be.prepare(batch)
        return be.attention(q, k_cache, v_cache, batch, dim ** -0.5, window)

    actual, expected = run_both(backend, reference, attention, q, k_cache, v_cache)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("block_size", [5, 12, 32, 128])
def test_attention_matches_reference_with_other_block_sizes(backend, reference, block_size):
    """Blocks of sizes other than 16, powers of two or not: a key's block and slot within it are
    the backends' own arithmetic (kernels.cuda divides by a multiply and a shift; kernels.triton
    reads one block id a step where a block holds whole steps of keys, as 128 does)."""
    heads, kv_heads, dim = HEADS["gqa2-d128"]
    num_blocks = sum(-(-(c + n) // block_size) for c, n in MIXED) + 4
    shape = (num_blocks, block_size, kv_heads, dim)
    k_cache, v_cache = random(*shape, dtype=torch.float32, seed=1), random(*shape, dtype=torch.float32, seed=2)
    q = random(sum(new for _, new in MIXED), heads, dim, dtype=torch.float32, seed=3)

    def attention(be, q, k_cache, v_cache):
        batch = ragged_batch(MIXED, block_size, num_blocks, device=be.device)
        batch.attn_metadata = be.prepare(batch)
        return be.attention(q, k_cache, v_cache, batch, dim ** -0.5, 24)

    actual, expected = run_both(backend, reference, attention, q, k_cache, v_cache)
    assert_close(actual, expected, torch.float32)


EVERY_TARGET = with_emulated_cuda(kernel_targets())


@pytest.mark.parametrize("target", EVERY_TARGET, ids=[target_name(t) for t in EVERY_TARGET])
@pytest.mark.parametrize("stale", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("window", [None, 24], ids=["full", "window"])
def test_slots_that_hold_no_key_of_the_sequence_never_reach_its_output(target, stale, window):
    """Every cache slot that is not one of a sequence's keys holds NaN or inf: the rest of its
    last block (left by the block's earlier owner, say a request whose model overflowed in
    float16), the blocks of other sequences and those of none (what a short decode's padded block
    table points at). The output equals the one from a cache of finite values everywhere: a key
    that gets no weight may still not be read as 0 x inf."""
    be = make_backend(*target)
    heads, kv_heads, dim = HEADS["gqa2-d128"]
    k_cache, v_cache = fill_cache(kv_heads, dim, torch.float16, seed=1)
    q = random(sum(new for _, new in MIXED), heads, dim, dtype=torch.float16, seed=3)
    batch = ragged_batch(MIXED, BLOCK_SIZE, NUM_BLOCKS, device=be.device)
    batch.attn_metadata = be.prepare(batch)

    def attention(k_cache, v_cache):
        return be.attention(*on(be, q, k_cache, v_cache), batch, dim ** -0.5, window).cpu()

    actual = attention(*(poisoned_outside_keys(cache, batch, stale) for cache in (k_cache, v_cache)))
    assert actual.isfinite().all()
    assert_close(actual, attention(k_cache, v_cache), torch.float16)


# A graph's padded batch (core/step_graphs.py, MixedRows): the step's tokens padded to 128 with a
# sink sequence over the scratch block (the pool's last), its sequences to 8 + 2.
GRAPH_MAX_TOKENS, GRAPH_MAX_SEQS = 128, 8


def graph_padded(batch, be):
    """`batch` copied into a graph's buffers (on its device) and padded as a replay pads it."""
    rows = MixedRows(GRAPH_MAX_TOKENS, GRAPH_MAX_SEQS, max_blocks_per_seq=8, block_size=BLOCK_SIZE,
                     scratch_block=NUM_BLOCKS, device=be.device)
    return rows.pad(batch, padded_tokens(batch.num_tokens, GRAPH_MAX_TOKENS))


@pytest.mark.parametrize("shapes,dtype", [("mixed", torch.float32), ("mixed", torch.float16),
                                          ("chunks", torch.float16)],
                         ids=["mixed-float32", "mixed-float16", "chunks-float16"])
def test_attention_over_a_graphs_padded_batch_matches_reference(backend, reference, shapes, dtype):
    """The step's tokens get the reference's outputs through the padded plan (tiles to the most
    128 tokens over 9 sequences can need, the extra ones empty), and any step padded to the same
    size gets the same graph key: the launches a graph would replay."""
    if not hasattr(backend, "graph_inputs"):
        pytest.skip(f"kernels.{backend.name} does not replay steps with prompt chunks from graphs")
    heads, kv_heads, dim = HEADS["gqa2-d128"]
    shapes = SHAPES[shapes]
    tokens = sum(new for _, new in shapes)
    k_cache, v_cache = (random(NUM_BLOCKS + 1, BLOCK_SIZE, kv_heads, dim, dtype=dtype, seed=s)
                        for s in (1, 2))
    q = random(GRAPH_MAX_TOKENS, heads, dim, dtype=dtype, seed=3)
    k_cache, v_cache, q = on(backend, k_cache, v_cache, q)
    padded = graph_padded(ragged_batch(shapes, BLOCK_SIZE, NUM_BLOCKS, device=backend.device), backend)
    padded.attn_metadata = plan = backend.prepare(padded)
    actual = backend.attention(q[:padded.num_tokens], k_cache, v_cache, padded, dim ** -0.5, 24)

    def attention(be, q, k_cache, v_cache):
        batch = ragged_batch(shapes, BLOCK_SIZE, NUM_BLOCKS, device=be.device)
        batch.attn_metadata = be.prepare(batch)
        return be.attention(q, k_cache, v_cache, batch, dim ** -0.5, 24)

    expected = attention(reference, *on(reference, q[:tokens], k_cache, v_cache))
    assert_close(actual[:tokens], expected, dtype)
    assert not actual[tokens:].isnan().any()   # the sink's tokens attend over the scratch block
    assert backend.graph_key(plan) is not None and backend.graph_inputs(plan)
    other = graph_padded(ragged_batch([(3, 40), (0, 1), (60, 30)], BLOCK_SIZE, NUM_BLOCKS,
                                      device=backend.device), backend)
    if other.num_tokens == padded.num_tokens:
        assert backend.graph_key(backend.prepare(other)) == backend.graph_key(plan)


def write_kv(be, key, value, shapes, dtype, seed):
    """The caches (random values in every slot first) after `be` wrote key and value [T, Hkv, D]."""
    batch = ragged_batch(shapes, BLOCK_SIZE, NUM_BLOCKS, device=be.device)
    k_cache, v_cache = on(be, *fill_cache(key.shape[1], key.shape[2], dtype, seed))
    be.write_kv(key, value, k_cache, v_cache, batch.slot_mapping)
    return k_cache.cpu(), v_cache.cpu()


def test_kv_cache_write_matches_reference(backend, reference):
    tokens = sum(new for _, new in MIXED)
    for dtype in dtypes_on(backend.device):
        key = random(tokens, 2, 80, dtype=dtype, seed=5)
        value = random(tokens, 2, 80, dtype=dtype, seed=6)
        (k_out, v_out), (k_exp, v_exp) = run_both(
            backend, reference, lambda be, key, value: write_kv(be, key, value, MIXED, dtype, seed=7),
            key, value)
        assert torch.equal(k_out, k_exp) and torch.equal(v_out, v_exp)


def test_kv_cache_write_from_a_fused_projection(backend, reference):
    """key and value as the models pass them: strided views into one qkv projection."""
    qkv = random(sum(new for _, new in CHUNKS), (4 + 2 + 2) * 64, dtype=torch.float32, seed=8)

    def write_fused(be, qkv):
        _, key, value = split_qkv(qkv, 4, 2, 64)    # split on the device: still strided
        return write_kv(be, key, value, CHUNKS, torch.float32, seed=9)

    (k_out, v_out), (k_exp, v_exp) = run_both(backend, reference, write_fused, qkv)
    assert torch.equal(k_out, k_exp) and torch.equal(v_out, v_exp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 1000])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(backend, reference, dtype, hidden, with_residual):
    x = random(7, hidden, dtype=dtype, seed=10)
    residual = random(7, hidden, dtype=dtype, seed=11) if with_residual else None
    weight = random(hidden, dtype=dtype, seed=12)
    (normed, new_residual), (exp_normed, exp_residual) = run_both(
        backend, reference, lambda be, x, weight, residual: be.rms_norm(x, weight, 1e-6, residual),
        x, weight, residual)
    assert_close(normed, exp_normed, dtype)
    assert_close(new_residual, exp_residual, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dim,rotary_dims", [(64, 64), (128, 128), (80, 80), (64, 32)],
                         ids=["d64", "d128", "d80", "partial"])
def test_rotary_matches_reference(backend, reference, dtype, is_neox, dim, rotary_dims):
    tokens = 9
    qkv = random(tokens, (4 + 2 + 2) * dim, dtype=dtype, seed=13)
    angles = torch.rand(tokens, rotary_dims // 2, generator=torch.Generator().manual_seed(14)) * 50

    def rotary(be, qkv, cos, sin):
        q, k, _ = split_qkv(qkv, 4, 2, dim)    # split on the device: strided, as the models pass them
        return be.rotary(q, k, cos, sin, is_neox)

    (q_out, k_out), (q_exp, k_exp) = run_both(backend, reference, rotary, qkv, angles.cos(), angles.sin())
    assert_close(q_out, q_exp, dtype)
    assert_close(k_out, k_exp, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [128, 344])
def test_silu_and_mul_matches_reference(backend, reference, dtype, inter):
    x = random(6, 2 * inter, dtype=dtype, seed=15) * 4
    actual, expected = run_both(backend, reference, lambda be, x: be.silu_and_mul(x), x)
    assert_close(actual, expected, dtype)


# Rows around kernels.cpu's limits for its own kernel (8 fp32 rows; 16-bit rows in tiles of 4) and
# its oneDNN path (32, and 64 for wide weights); 16400 outputs is a vocabulary-sized (wide) weight.
# Small values: fp32 sums in another order stay within 1e-5.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 9, 16, 33, 70])
@pytest.mark.parametrize("outputs", [48, 16400])
def test_linear_matches_reference(backend, reference, dtype, rows, outputs):
    x = random(rows, 72, dtype=dtype, seed=16)[:, :64] * 0.2    # strided, like a split's view
    weight = random(outputs, 64, dtype=dtype, seed=17) * 0.2
    bias = random(outputs, dtype=dtype, seed=18) if outputs == 48 else None
    actual, expected = run_both(backend, reference,
                                lambda be, x, w, b: linear_of(be)(x, w, b), x, weight, bias)
    assert_close(actual, expected, dtype)
