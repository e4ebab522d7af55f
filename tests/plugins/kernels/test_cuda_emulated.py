"""kernels.cuda's kernels without a GPU: csrc/ run by the CPU emulator (cuda_emulator.py).

The shared conformance suite runs every op on the emulated kernels (its `cuda-emulated` cases);
here is what it does not reach: split-KV (long contexts with few tokens, parts that hold one key
or none, every dtype), the backend's choice of splits, the tensor-core kernel of prompt chunks over
every head size it takes (the emulator computes its mma.sync products from sm80.cuh's operand
layouts), and whole models token for token.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch

import cuda_emulator
import fastgen
from fastgen import SamplingParams
from fastgen.config import make_config
from fastgen.engine import Engine
from fastgen.kernels import REFERENCE_TOLERANCE
from fastgen.plugins.kernels.sampling_seeds import row_seeds
from kernel_batches import ragged_batch
from kernel_targets import CPU
from sampling_inputs import metadata, random_logits
from tiny_models import make_checkpoint, run_to_completion

REASON = cuda_emulator.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the CUDA emulator cannot run here: {REASON}")

# A long decode, a short one and a prompt chunk after a cached prefix.
SHAPES = [(400, 1), (37, 1), (100, 12)]
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def ops():
    return cuda_emulator.emulated_ops()


@pytest.fixture(scope="module")
def reference():
    from fastgen.plugins.kernels.torch_ref.backend import TorchBackend

    return TorchBackend(CPU)


def _inputs(dtype, dim=64, heads=8, kv_heads=2, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    batch = ragged_batch(shapes, 16, NUM_BLOCKS, seed=seed)
    caches = [torch.randn(NUM_BLOCKS, 16, kv_heads, dim, generator=g).to(dtype) for _ in range(2)]
    q = torch.randn(batch.num_tokens, heads, dim, generator=g).to(dtype)
    return batch, caches, q


SPLIT_CASES = ([(torch.float32, w, n) for w in (None, 100) for n in (1, 2, 7, 32)]
               + [(torch.float16, None, 7), (torch.bfloat16, None, 7), (torch.bfloat16, 100, 32)])


@pytest.mark.parametrize("dtype, window, num_splits", SPLIT_CASES,
                         ids=[f"{str(d)[6:]}-{'window' if w else 'full'}-{n}" for d, w, n in SPLIT_CASES])
def test_split_kv_matches_the_reference(ops, reference, dtype, window, num_splits):
    # 32 parts of a 38-key context hold one or two keys each; of the window's 100, some hold none.
    batch, caches, q = _inputs(dtype)
    out = ops.attention(q, *caches, batch.query_start_loc, batch.seq_lens, batch.block_tables, 0.125,
                        window or 0, num_splits)
    batch.attn_metadata = reference.prepare(batch)
    expected = reference.attention(q, *caches, batch, 0.125, window)
    atol, rtol = REFERENCE_TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


HEAD_SIZE_CASES = [(d, dim) for d in (torch.float32, torch.bfloat16) for dim in cuda_emulator.HEAD_SIZES]


@pytest.mark.parametrize("dtype, dim", HEAD_SIZE_CASES,
                         ids=[f"{str(d)[6:]}-d{dim}" for d, dim in HEAD_SIZE_CASES])
def test_the_per_token_kernel_matches_the_reference_at_every_head_size(ops, reference, dtype, dim):
    # A key goes to a group of 4-32 lanes, each a 16-byte run of its row (32 bytes: float32 at
    # 256), with lanes past the head's end idle (80, 96, 112): each size lays the lanes out anew.
    batch, caches, q = _inputs(dtype, dim=dim, heads=4, kv_heads=2, seed=dim)
    out = ops.attention(q, *caches, batch.query_start_loc, batch.seq_lens, batch.block_tables, dim ** -0.5,
                        0, 2)
    batch.attn_metadata = reference.prepare(batch)
    atol, rtol = REFERENCE_TOLERANCE[dtype]
    torch.testing.assert_close(out, reference.attention(q, *caches, batch, dim ** -0.5, None),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (8, 1), (6, 2), (5, 5)],
                         ids=["group3", "group8", "group3-of-2", "mha"])
def test_every_query_group_size_matches_the_reference(ops, reference, heads, kv_heads):
    # A block takes up to 4 query heads of a group: groups of 3 leave one idle, groups of 8 take two
    # blocks per key/value head, and without grouping a block takes one head.
    batch, caches, q = _inputs(torch.float32, heads=heads, kv_heads=kv_heads, seed=2)
    out = ops.attention(q, *caches, batch.query_start_loc, batch.seq_lens, batch.block_tables, 0.125,
                        0, 2)
    batch.attn_metadata = reference.prepare(batch)
    torch.testing.assert_close(out, reference.attention(q, *caches, batch, 0.125, None),
                               atol=2e-5, rtol=1e-5)


def test_the_backend_splits_few_long_decodes_and_matches_the_reference(reference):
    backend = cuda_emulator.EmulatedCudaBackend(CPU)
    batch, caches, q = _inputs(torch.float32, dim=128, heads=4, kv_heads=4, seed=1)
    decodes = ragged_batch([(600, 1), (300, 1)], 16, 64, seed=1)
    q = q[:2]
    decodes.attn_metadata = backend.prepare(decodes)
    # Off a GPU the target is 8 programs: two tokens could take 4 parts each, 601 keys make 3 of
    # at least 256.
    assert decodes.attn_metadata.num_splits == 3
    out = backend.attention(q, *caches, decodes, 0.1, None)
    decodes.attn_metadata = reference.prepare(decodes)
    torch.testing.assert_close(out, reference.attention(q, *caches, decodes, 0.1, None),
                               atol=2e-5, rtol=1e-5)


def test_rows_that_all_take_a_top_k_draw_what_the_whole_row_search_draws(ops):
    # The backend finds such rows' cuts among their largest logits (top_k_candidates) and hands
    # them to the op; the op alone searches whole rows. Same seeds, same kept sets: the same tokens.
    backend = cuda_emulator.EmulatedCudaBackend(CPU)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)
              for t in (0.5, 1.0, 2.0) for k in (1, 3, 20) for p in (0.3, 0.9, 1.0)]
    params += [SamplingParams(temperature=0), SamplingParams(temperature=0.8)]
    meta = metadata(params)
    assert meta.top_k_bound == 20
    logits = random_logits(len(params), 400, seed=3, scale=1.0)
    logits[::4, 100:130] = logits[::4, 5:6]      # ties with a row's candidates, outside them
    for seed in range(3):
        seeds = row_seeds(meta, len(params), CPU, torch.Generator().manual_seed(seed))
        whole_rows = ops.sample(logits, meta.temperatures, meta.top_k, meta.top_p, seeds)
        tokens = backend.sample(logits, meta, torch.Generator().manual_seed(seed))
        assert tokens.tolist() == whole_rows.tolist()
    # A cut given to the op is the one it applies: at each row's largest scaled logit, only the
    # argmax is left to draw, whatever the noise and with no top-k / top-p of its own.
    free = metadata([SamplingParams(temperature=1.0)] * 8)
    rows = logits[:8]
    seeds = row_seeds(free, 8, CPU, torch.Generator().manual_seed(0))
    drawn = ops.sample(rows, free.temperatures, free.top_k, free.top_p, seeds, rows.max(dim=1).values)
    assert drawn.tolist() == rows.argmax(dim=1).tolist()


# Prompt chunks for the tiled kernel: tiles cut short by the chunk's end (130 = 64 + 64 + 2 new
# tokens; 2, the least that is tiled; 17, a warp's 16 rows and one more), chunks after a cached
# prefix, and decodes beside them, which the per-token kernel takes.
PROMPT_SHAPES = [(0, 130), (7, 1), (50, 2), (200, 17), (37, 1)]
TILE_CASES = ([(d, dim, None, 2) for d in (torch.float16, torch.bfloat16) for dim in (64, 80, 96, 112, 128)]
              + [(torch.bfloat16, 64, w, g) for w in (5, 40, 100) for g in (1, 4)])


def _check_backend_attention(backend, reference, batch, caches, q, window):
    """The backend's attention over the batch, as the engine calls it (prepare, then attention),
    against the reference's."""
    scale = q.shape[-1] ** -0.5
    batch.attn_metadata = backend.prepare(batch)
    out = backend.attention(q, *caches, batch, scale, window)
    batch.attn_metadata = reference.prepare(batch)
    atol, rtol = REFERENCE_TOLERANCE[q.dtype]
    torch.testing.assert_close(out, reference.attention(q, *caches, batch, scale, window), atol=atol, rtol=rtol)


def test_the_backend_tiles_every_prompt_chunk_and_no_decode():
    backend = cuda_emulator.EmulatedCudaBackend(CPU)
    assert backend.prompt_tile_tokens == 64
    batch = ragged_batch(PROMPT_SHAPES, 16, NUM_BLOCKS)
    # The batch puts its decodes first: sequences 0 and 1. The tiles that see the most keys come
    # first: 217, 130, 128, 64 and 52 keys.
    assert backend.prepare(batch).prompt_tiles.tolist() == [[4, 0], [2, 128], [2, 64], [2, 0], [3, 0]]
    backend.longest_tiles_first = False
    assert backend.prepare(batch).prompt_tiles.tolist() == [[2, 0], [2, 64], [2, 128], [3, 0], [4, 0]]
    assert backend.prepare(ragged_batch([(7, 1), (37, 1)], 16, NUM_BLOCKS)).prompt_tiles is None


@pytest.mark.parametrize("dtype, dim, window, group", TILE_CASES,
                         ids=[f"{str(d)[6:]}-d{dim}-{f'window{w}' if w else 'full'}-group{g}"
                              for d, dim, w, g in TILE_CASES])
def test_prompt_tiles_match_the_reference(reference, dtype, dim, window, group):
    # Windows shorter than a warp's rows (5), than a step's keys (40), and across the cached prefix.
    batch, caches, q = _inputs(dtype, dim=dim, heads=2 * group, kv_heads=2, seed=dim, shapes=PROMPT_SHAPES)
    _check_backend_attention(cuda_emulator.EmulatedCudaBackend(CPU), reference, batch, caches, q, window)


SPLIT_TILE_CASES = [(torch.bfloat16, 128, None, 3), (torch.bfloat16, 64, 40, 5), (torch.float16, 80, None, 32)]


@pytest.mark.parametrize("dtype, dim, window, num_splits", SPLIT_TILE_CASES,
                         ids=[f"{str(d)[6:]}-d{dim}-{f'window{w}' if w else 'full'}-{n}"
                              for d, dim, w, n in SPLIT_TILE_CASES])
def test_split_prompt_tiles_match_the_reference(reference, dtype, dim, window, num_splits):
    # A tile's keys cut into parts of whole 64-key steps, merged with the decodes' parts; 32 parts
    # leave most of them empty.
    backend = cuda_emulator.EmulatedCudaBackend(CPU)
    backend.num_kv_splits = num_splits
    batch, caches, q = _inputs(dtype, dim=dim, heads=4, kv_heads=2, seed=dim + num_splits,
                               shapes=[(300, 70), (7, 1), (0, 20), (37, 1)])
    _check_backend_attention(backend, reference, batch, caches, q, window)


@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 256)],
                         ids=["tiled", "float32-untiled", "d256-untiled"])
def test_prompt_tiles_beside_split_decodes_match_the_reference(ops, reference, dtype, dim):
    # With the keys split, the merge must leave the tiled tokens' outputs alone; where the tiled
    # kernel does not run (fp32, head size 256), every token takes the per-token kernel.
    batch, caches, q = _inputs(dtype, dim=dim, heads=4, kv_heads=2, seed=3,
                               shapes=[(0, 70), (7, 1), (50, 2), (37, 1)])
    tiles = cuda_emulator.EmulatedCudaBackend(CPU).prepare(batch).prompt_tiles
    out = ops.attention(q, *caches, batch.query_start_loc, batch.seq_lens, batch.block_tables, 0.125,
                        0, 3, tiles)
    batch.attn_metadata = reference.prepare(batch)
    atol, rtol = REFERENCE_TOLERANCE[dtype]
    torch.testing.assert_close(out, reference.attention(q, *caches, batch, 0.125, None), atol=atol, rtol=rtol)


class _EmulatedCudaForEngines(cuda_emulator.EmulatedCudaBackend):
    """Registered under a name of its own, and splitting every step's keys into 3 parts."""

    name = "cuda_emulated"
    num_kv_splits = 3

    @classmethod
    def unavailable_reason(cls, device):
        return cuda_emulator.available()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_whole_model_gives_the_reference_tokens(tmp_path, plugin_manager, dtype):
    # float16: prompt chunks of up to 96 tokens (two tiles) take the tensor-core kernel, beside
    # decodes split 3 ways.
    class Plugin:
        @fastgen.hookimpl
        def register_kernels(self, register):
            register(_EmulatedCudaForEngines)

    plugin_manager.register(Plugin(), name="kernels.cuda_emulated")
    # Head size 64, which has a kernel (the shared tiny models' 16 falls back to the reference).
    make_checkpoint(tmp_path, "mistral", hidden_size=128, intermediate_size=256, num_attention_heads=2,
                    num_key_value_heads=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 30, 45, 150)]
    params = fastgen.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens = {}
    for kernels in ("cuda_emulated", "torch"):
        engine = Engine(make_config(model=str(tmp_path), kernels=kernels, device="cpu", token_budget=96,
                                    max_num_seqs=4, num_blocks=32, dtype=dtype), plugins=plugin_manager)
        tokens[kernels] = run_to_completion(engine, prompts, params)
    assert tokens["cuda_emulated"] == tokens["torch"]


def test_the_emulator_reports_threads_that_disagree_on_a_barrier(tmp_path):
    # Half the block skips a __syncthreads: a hang on a GPU, and here an abort that names it, not a
    # test run that never ends.
    program = tmp_path / "barriers.cpp"
    program.write_text(textwrap.dedent("""
        #include <cstdio>
        #include <cstring>
        __global__ void agree(int* out) { __syncthreads(); out[blockIdx.x * 64 + threadIdx.x] = 1; }
        __global__ void disagree(int* out) { if (threadIdx.x < 32) __syncthreads(); out[threadIdx.x] = 1; }
        int main(int argc, char** argv) {
          int out[128] = {};
          emu::Launch(dim3(2), dim3(64))(std::strcmp(argv[1], "agree") ? disagree : agree, out);
          int sum = 0;
          for (int v : out) sum += v;
          std::printf("%d threads wrote\\n", sum);
        }
    """))
    binary = tmp_path / "barriers"
    subprocess.run(["g++", "-std=c++20", "-O1", "-include", str(cuda_emulator.SRC / "emulator.h"),
                    str(program), "-o", str(binary)], check=True, capture_output=True)
    agree = subprocess.run([str(binary), "agree"], capture_output=True, text=True, timeout=60)
    assert agree.returncode == 0 and agree.stdout.strip() == "128 threads wrote"
    disagree = subprocess.run([str(binary), "disagree"], capture_output=True, text=True, timeout=60)
    assert disagree.returncode != 0
    assert "deadlock in block (0, 0, 0)" in disagree.stderr
