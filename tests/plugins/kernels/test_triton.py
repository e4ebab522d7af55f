"""What is particular to kernels.triton: where it can run, split-KV planning and its forced path.

The cases that run kernels run on every device where kernels.triton runs here: the GPU with
compiled kernels, or the CPU under the interpreter (never the CPU on a GPU machine, where
TRITON_INTERPRET is unset: compiled Triton cannot take CPU tensors).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastgen import SamplingParams
from kernel_batches import (BLOCK_SIZE_DEFAULT, device_fixture, devices_for, make_backend,
                            poisoned_outside_keys, ragged_batch)
from kernel_targets import CPU
from sampling_inputs import metadata, random_logits

pytest.importorskip("triton", reason="kernels.triton needs triton: pip install triton")

from fastgen.plugins.kernels.query_tiles import tile_keys  # noqa: E402
from fastgen.plugins.kernels.split_kv import target_programs  # noqa: E402
from fastgen.plugins.kernels.triton.backend import TritonBackend  # noqa: E402

device = device_fixture("triton")
# float32 tolerance as in the conformance suite: on a GPU tiled and warp-level sums reorder more.
FLOAT32 = {"cpu": dict(atol=2e-5, rtol=1e-5), "cuda": dict(atol=1e-4, rtol=1e-4)}


def test_cpu_without_the_interpreter_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = TritonBackend.unavailable_reason(CPU)
    assert "CUDA GPU" in reason and "TRITON_INTERPRET=1" in reason


def test_cpu_with_the_interpreter_can_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonBackend.unavailable_reason(CPU) is None


def test_without_triton_the_plugin_still_registers_and_says_how_to_install():
    # A fresh interpreter where `import triton` fails, as on a machine without it.
    code = ("import sys; sys.modules['triton'] = None\n"
            "from fastgen.plugin_manager import load_plugins\n"
            "cls = load_plugins().registry.get('kernels', 'triton').cls\n"
            "print(cls.unavailable_reason(None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert "pip install triton" in out.stdout


def test_split_kv_is_planned_for_few_long_sequences_only(device):
    backend = make_backend("triton", device)
    few_long = ragged_batch([(700, 1), (650, 1)], BLOCK_SIZE_DEFAULT, num_blocks=96, device=device)
    many_short = ragged_batch([(40, 1)] * 12 + [(0, 30)], BLOCK_SIZE_DEFAULT, num_blocks=96,
                              device=device)
    assert backend.prepare(few_long).num_splits > 1
    assert backend.prepare(many_short).num_splits == 1


def test_split_kv_counts_each_tiles_programs_one_per_kv_head(device):
    """Two long decodes split while their programs fall short of the device's target; told there
    are enough KV heads that one program per (sequence, KV head) fills it, they are not split."""
    backend = make_backend("triton", device)
    few_long = ragged_batch([(700, 1), (650, 1)], BLOCK_SIZE_DEFAULT, num_blocks=96, device=device)
    assert backend.prepare(few_long).num_splits > 1
    backend.configure_kv_cache(num_kv_heads=-(-target_programs(device) // 2), head_dim=64)
    assert backend.prepare(few_long).num_splits == 1


def _with_reference(backend, shapes, num_blocks, seed, window, block_size=BLOCK_SIZE_DEFAULT,
                    stale=None):
    """(backend's attention, the reference's, the batch) on a batch of (cached, new) `shapes`, with
    random caches (2 KV heads of 64) and queries (4 heads) drawn on the CPU: the same values on
    every device. `stale`: the value every slot that is none of the batch's keys holds (what earlier
    owners of the blocks left there)."""
    device = backend.device
    batch = ragged_batch(shapes, block_size, num_blocks=num_blocks, device=device)
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, 2, 64, generator=g) for _ in range(2))
    if stale is not None:
        k_cache, v_cache = (poisoned_outside_keys(c, batch, stale) for c in (k_cache, v_cache))
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    q = torch.randn(batch.num_tokens, 4, 64, generator=g).to(device)
    outs = []
    for be in (backend, make_backend("torch", device)):
        batch.attn_metadata = be.prepare(batch)
        outs.append(be.attention(q, k_cache, v_cache, batch, 0.125, window))
    return outs[0], outs[1], batch


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("window", [None, 40], ids=["full", "window40"])
def test_forced_split_kv_matches_reference(device, splits, window):
    backend = make_backend("triton", device)
    backend.num_kv_splits = splits
    # Decodes with long contexts and a chunk: some splits of a short tile have no keys at all.
    actual, expected, batch = _with_reference(backend, [(200, 1), (75, 1), (3, 1), (30, 20)],
                                              num_blocks=32, seed=0, window=window)
    assert batch.attn_metadata is not None
    assert backend.prepare(batch).num_splits == splits
    torch.testing.assert_close(actual, expected, **FLOAT32[device.type])


def test_attention_pipelines_less_deep_where_three_stages_would_not_fit():
    from fastgen.plugins.kernels.triton.attention import pipeline_stages

    ampere_consumer = 101376   # bytes one program may use on an RTX 3090 or 4090 (sm_86, sm_89)
    # A prompt tile of Llama-3-8B (64 rows, 32 keys a step, head size 128): in 16 bits three
    # stages fit anywhere; in float32 they fit an H100's 227 KB, not 99 KB.
    assert pipeline_stages(64, 32, 128, 2, ampere_consumer) == 3
    assert pipeline_stages(64, 32, 128, 4, ampere_consumer) == 2
    assert pipeline_stages(64, 32, 128, 4, 232448) == 3
    assert pipeline_stages(64, 32, 128, 4, None) == 3


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [None, 40], ids=["full", "window40"])
def test_short_key_steps_through_every_kind_of_step_match_reference(device, splits, window):
    """Steps of 16 keys and tiles of 8 tokens: a tile after a long context walks steps below its
    window's edge (masked), steps every row sees whole (unmasked), and the diagonal (masked)."""
    backend = make_backend("triton", device)
    backend.attention_block_n, backend.tile_tokens, backend.num_kv_splits = 16, 8, splits
    actual, expected, _ = _with_reference(backend, [(150, 1), (33, 1), (97, 30), (0, 45)],
                                          num_blocks=40, seed=1, window=window)
    torch.testing.assert_close(actual, expected, **FLOAT32[device.type])


@pytest.mark.parametrize("tma", [False, True], ids=["gather", "tma"])
@pytest.mark.parametrize("block_n, window", [(16, 40), (32, None)], ids=["16keys-window40", "32keys-full"])
def test_cache_blocks_holding_whole_steps_match_reference(device, tma, block_n, window):
    """Cache blocks of 32 tokens, steps of 16 or 32 keys: each step's keys lie in one block, read
    at one block id, or (tma) as one box copy each of K and V, which reads the rest of a
    sequence's last block too (the random cache's other keys: they must get no weight). Decodes,
    a chunk after a context that ends mid-block, and a fresh prompt; with 16-key steps each tile's
    keys split in three (a split starts mid-block)."""
    if tma and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA copies need sm_90 or later")
    backend = make_backend("triton", device)
    backend.attention_block_n, backend.tile_tokens, backend.attention_tma = block_n, 8, tma
    backend.num_kv_splits = 3 if block_n == 16 else 1
    actual, expected, batch = _with_reference(backend, [(150, 1), (33, 1), (97, 30), (0, 45)],
                                              num_blocks=20, seed=5, window=window, block_size=32)
    assert backend.prepare(batch).num_splits == backend.num_kv_splits
    torch.testing.assert_close(actual, expected, **FLOAT32[device.type])


# A box of keys holds the poisoned slots, whose scores come out NaN before the mask drops them:
# numpy, running the interpreter's products, says so.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("tma", [False, True], ids=["gather", "tma"])
@pytest.mark.parametrize("stale", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_what_a_blocks_earlier_owner_left_past_a_sequences_end_is_never_read(device, tma, stale):
    """The slots that are none of the sequences' keys hold NaN or inf (a model that overflowed in
    float16 wrote them before the blocks were freed): a TMA box reads the rest of a sequence's last
    block with its keys, and none of it may reach the output, not even as 0 x inf."""
    if tma and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA copies need sm_90 or later")
    backend = make_backend("triton", device)
    backend.attention_block_n, backend.tile_tokens, backend.attention_tma = 32, 8, tma
    actual, expected, _ = _with_reference(backend, [(150, 1), (33, 1), (97, 30), (0, 45)],
                                          num_blocks=20, seed=5, window=None, block_size=32,
                                          stale=stale)
    assert expected.isfinite().all()
    torch.testing.assert_close(actual, expected, **FLOAT32[device.type])


def test_tma_copies_where_the_cache_does_not_allow_them_say_why(device):
    backend = make_backend("triton", device)
    backend.attention_block_n, backend.attention_tma = 32, True
    with pytest.raises(ValueError, match="a step's 32 keys must lie in one cache block, and a block "
                                         "holds 16 tokens: use a block_size that is a multiple of 32"):
        _with_reference(backend, [(20, 1)], num_blocks=4, seed=0, window=None)


@pytest.mark.parametrize("longest_first", [True, False], ids=["longest-first", "batch-order"])
def test_prompt_tiles_start_longest_first_and_match_reference_in_either_order(device, longest_first):
    """The plan lists the tiles that walk the most keys first (or in batch order when told), and
    the kernel reads each tile's sequence and start from it: the output is the same either way."""
    backend = make_backend("triton", device)
    backend.tile_tokens, backend.longest_tiles_first = 8, longest_first
    actual, expected, batch = _with_reference(backend, [(20, 1), (0, 30), (70, 12), (3, 1)],
                                              num_blocks=24, seed=2, window=None)
    plan = batch.attn_metadata = backend.prepare(batch)
    tiles = list(zip(plan.tile_seq.tolist(), plan.tile_start.tolist()))
    keys = [tile_keys(batch.context_lens[s], batch.query_lens[s], start, 8) for s, start in tiles]
    assert len(set(tiles)) == len(tiles) == 8   # tiles of up to 8 new tokens: 1 + 1 + 4 + 2
    if longest_first:
        assert keys == sorted(keys, reverse=True) and keys[0] == 82
    else:
        assert tiles == sorted(tiles)
    torch.testing.assert_close(actual, expected, **FLOAT32[device.type])


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
def test_one_token_tiles_with_prompt_chunks_are_listed_and_match_reference(device, window):
    """A tile of one new token in a step with prompt chunks is still a listed tile (its sequence and
    start read from the plan), not a decode-only step's implied one: every token of a chunk sees
    its own causal range, and the step is not one a CUDA graph replays."""
    backend = make_backend("triton", device)
    backend.tile_tokens = 1
    actual, expected, batch = _with_reference(backend, [(20, 1), (9, 13), (0, 5)], num_blocks=8,
                                              seed=4, window=window)
    plan = backend.prepare(batch)
    assert plan.tile_tokens == 1 and plan.num_tiles == batch.num_tokens == 19
    assert sorted(zip(plan.tile_seq.tolist(), plan.tile_start.tolist())) == (
        [(0, 0)] + [(1, i) for i in range(13)] + [(2, i) for i in range(5)])
    assert backend.graph_key(plan) is None
    torch.testing.assert_close(actual, expected, **FLOAT32[device.type])


def test_only_decode_only_steps_have_a_graph_key(device):
    backend = make_backend("triton", device)
    decodes = ragged_batch([(20, 1), (3, 1)], BLOCK_SIZE_DEFAULT, num_blocks=4, device=device)
    chunk = ragged_batch([(20, 1), (3, 2)], BLOCK_SIZE_DEFAULT, num_blocks=4, device=device)
    assert backend.graph_key(backend.prepare(decodes)) == 1
    assert backend.graph_key(backend.prepare(chunk)) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_16bit_rotary_rounds_where_the_reference_does(device, dtype, is_neox):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter truncates fp32 to bf16 (the GPU rounds to nearest even)")
    # Rows where x1 * cos and x2 * sin nearly cancel: a kernel that keeps the products in fp32
    # and rounds once is several ulps off the reference there (seen at Llama-3-8B's shapes on an
    # H200). Rounded as the reference rounds, every value is the same bit for bit.
    backend, reference = make_backend("triton", device), make_backend("torch", device)
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(64, 16, generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(64, 3, 32, generator=g) * 4
    half = torch.arange(16)
    first, second = (half, half + 16) if is_neox else (2 * half, 2 * half + 1)
    # x2 = x1 * cos / sin, so the first output's two products are (nearly) equal.
    x[..., second] = x[..., first] * (cos / sin)[:, None, :].clamp(-8, 8)
    q, k = x.to(dtype).to(device), x[:, :2].to(dtype).to(device)
    cos, sin = cos.to(device), sin.to(device)
    got = backend.rotary(q, k, cos, sin, is_neox)
    want = reference.rotary(q, k, cos, sin, is_neox)
    for a, b in zip(got, want):
        assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} values differ"


def test_sampling_draws_the_same_tokens_however_a_row_is_cut_into_chunks(device):
    # Programs draw chunks of a row and the best chunk wins: the noise is keyed by token, so the
    # tokens are those of one program per row, ties included (the lowest token wins).
    from fastgen.plugins.kernels.triton.sampling import sample

    params = [SamplingParams(temperature=0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.3, seed=4),
              SamplingParams(temperature=1.0)]
    logits = random_logits(len(params), 3000, seed=0, scale=1.0)
    logits[1, 10] = logits[1, 2500] = 10.0          # a greedy tie across chunks
    logits[6] = float("-inf")                        # nothing to draw: token 0
    logits = logits.to(device)
    for seed in range(3):
        # Fresh metadata per draw: a seeded request's generator moves on with each.
        drawn = [sample(logits, metadata(params, device),
                        torch.Generator(device=device).manual_seed(seed), chunk_tokens=chunk).tolist()
                 for chunk in (3000, 1024, 4096 * 3)]
        assert drawn[0] == drawn[1] == drawn[2]
        assert drawn[0][1] == 10 and drawn[0][6] == 0


def test_engine_with_triton_generates_what_the_reference_generates(tiny_llama, device):
    """A short end-to-end run in the main suite; the full parity with transformers is in the slow step."""
    import fastgen

    folder, model = tiny_llama
    g = torch.Generator().manual_seed(3)
    # Two prompts longer than the token budget: chunks fused with the other prompts' decodes.
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 20, 45)]
    params = [fastgen.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
              fastgen.SamplingParams(max_tokens=4, temperature=0.8, seed=11, ignore_eos=True),
              fastgen.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)]
    settings = dict(model=str(folder), token_budget=16, max_num_seqs=64, device=device.type,
                    dtype="float32", kv_cache_gb=1.0)
    triton_out = fastgen.LLM(kernels="triton", **settings).generate(prompts, params)
    torch_out = fastgen.LLM(kernels="torch", **settings).generate(prompts, params)
    assert [o.token_ids for o in triton_out][0::2] == [o.token_ids for o in torch_out][0::2]
    # The seeded request reproduces itself (samplers' streams differ between backends).
    again = fastgen.LLM(kernels="triton", **settings).generate(prompts, params)
    assert again[1].token_ids == triton_out[1].token_ids


# Under the interpreter it costs the main suite 8 s for a path the kernel tests above cover: there
# it runs with the slow cases; on a GPU (sm_90+) it is the first whole-engine run of the TMA path,
# with CUDA graphs captured over it (the engine's GPU default).
@pytest.mark.parametrize("device", [pytest.param(d, marks=[pytest.mark.slow] if d.type == "cpu" else [])
                                    for d in devices_for("triton")], ids=lambda d: d.type)
def test_engine_reading_kv_as_tma_copies_generates_what_the_reference_generates(tiny_llama, device,
                                                                               monkeypatch):
    import fastgen

    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA copies need sm_90 or later")
    monkeypatch.setattr(TritonBackend, "attention_tma", True)
    folder, model = tiny_llama
    g = torch.Generator().manual_seed(4)
    # Prompts that end inside their first 64-token block and past it; chunks of 16 tokens.
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 70, 130)]
    params = fastgen.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    settings = dict(model=str(folder), token_budget=16, max_num_seqs=64, device=device.type,
                    dtype="float32", kv_cache_gb=1.0, block_size=64)
    tma = fastgen.LLM(kernels="triton", **settings)
    assert tma.engine.backend.attention_tma
    want = fastgen.LLM(kernels="torch", **settings).generate(prompts, params)
    assert [o.token_ids for o in tma.generate(prompts, params)] == [o.token_ids for o in want]


def test_more_tiles_than_a_launch_takes_is_a_clear_error(device):
    """A CUDA grid's second dimension, where the tiles go, holds at most 65535: more would fail
    to launch with no word of why. The step's plan says so, before any layer runs."""
    from fastgen.plugins.kernels.triton.attention import MAX_GRID_TILES

    backend = make_backend("triton", device)
    backend.tile_tokens = 2
    tokens = 2 * (MAX_GRID_TILES + 1)
    batch = ragged_batch([(0, tokens)], BLOCK_SIZE_DEFAULT, num_blocks=tokens // BLOCK_SIZE_DEFAULT,
                         device=device)
    with pytest.raises(ValueError, match="65536 attention tiles in one step.*lower max_num_seqs"):
        backend.prepare(batch)
    backend.tile_tokens = 4   # half as many tiles: planned
    assert backend.prepare(batch).num_tiles == tokens // 4


@pytest.mark.parametrize("window", [None, 40], ids=["full", "window40"])
def test_caches_addressed_with_64_bit_offsets_give_the_same_output(device, window, monkeypatch):
    """A cache of 2**31 elements or more is addressed with 64-bit offsets, a smaller one with
    32-bit ones: with the threshold lowered, these small caches take the 64-bit path."""
    from fastgen.plugins.kernels.triton import attention

    shapes = [(200, 1), (75, 1), (30, 20)]
    small, expected, _ = _with_reference(make_backend("triton", device), shapes, 32, seed=5, window=window)
    monkeypatch.setattr(attention, "LARGE_CACHE_ELEMENTS", 1)
    large, _, _ = _with_reference(make_backend("triton", device), shapes, 32, seed=5, window=window)
    torch.testing.assert_close(large, expected, **FLOAT32[device.type])
    assert torch.equal(large, small)


def test_k_and_v_caches_of_different_layouts_are_refused(device):
    """The kernel reads K and V at the same offsets, so caches laid out differently are an error,
    not wrong values."""
    backend = make_backend("triton", device)
    batch = ragged_batch([(20, 1)], BLOCK_SIZE_DEFAULT, num_blocks=4, device=device)
    batch.attn_metadata = backend.prepare(batch)
    k_cache = torch.randn(4, BLOCK_SIZE_DEFAULT, 2, 64, device=device)
    v_cache = torch.randn(4, 2, BLOCK_SIZE_DEFAULT, 64, device=device).transpose(1, 2)
    q = torch.randn(batch.num_tokens, 4, 64, device=device)
    with pytest.raises(ValueError, match="must share a shape and strides"):
        backend.attention(q, k_cache, v_cache, batch, 0.125)


def test_host_launch_arithmetic_agrees_with_triton():
    """The launch wrappers size their grids and blocks with _tiling's plain-int cdiv and
    next_power_of_2 (Triton's are constexpr functions, slow to call from host code): the same
    numbers as Triton's."""
    import triton

    from fastgen.plugins.kernels.triton import _tiling

    for n in range(0, 4200):
        assert _tiling.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 1000):
            assert _tiling.cdiv(n, d) == triton.cdiv(n, d), (n, d)
