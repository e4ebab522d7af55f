"""kernels.cpu beyond the shared conformance suite: bf16 (the suite covers fp32 and fp16), where it
cannot run, its op checks, and the build cache (on a one-function source, so it builds in a second)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kernel_batches import make_backend, ragged_batch
from fastgen.errors import PluginError
from fastgen.plugins.kernels.cpu import backend as backend_module, build
from fastgen.plugins.kernels.cpu.backend import CpuBackend

pytestmark = pytest.mark.skipif(CpuBackend.unavailable_reason(torch.device("cpu")) is not None,
                                reason="kernels.cpu cannot be built here")

BF16 = dict(atol=2e-2, rtol=2e-2)
PROBE = 'extern "C" int fastgen_cpu_probe() { return %d; }\n'


def randn(*shape, seed, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def backends():
    return make_backend("cpu"), make_backend("torch")


@pytest.mark.parametrize("window", [None, 24], ids=["full", "window"])
def test_bf16_attention_matches_reference(backends, window):
    # Decodes at block edges and prompt chunks longer than one query tile, GQA 3 as in SmolLM2.
    batch = ragged_batch([(15, 1), (16, 1), (70, 1), (0, 40), (33, 20)], 16, 48)
    k_cache, v_cache = randn(48, 16, 3, 64, seed=1), randn(48, 16, 3, 64, seed=2)
    q = randn(batch.num_tokens, 9, 64, seed=3)
    outs = []
    for be in backends:
        batch.attn_metadata = be.prepare(batch)
        outs.append(be.attention(q, k_cache, v_cache, batch, 0.125, window))
    torch.testing.assert_close(outs[0], outs[1], **BF16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [12, 36, 200], ids=lambda d: f"d{d}")
def test_head_sizes_off_the_vector_width_match_reference(backends, dtype, dim):
    # The kernel reads rows a vector (8 or 16 floats) at a time and scores 8, 4 or 1 keys at a
    # time: a head size that leaves a partial vector (12 < one vector; 36, 200 after whole ones)
    # and decodes of 1 to 17 keys take every remainder path.
    batch = ragged_batch([(0, 1), (2, 1), (6, 1), (10, 1), (16, 1), (40, 1), (5, 9)], 16, 32)
    k_cache, v_cache = randn(32, 16, 2, dim, seed=4, dtype=dtype), randn(32, 16, 2, dim, seed=5, dtype=dtype)
    q = randn(batch.num_tokens, 6, dim, seed=6, dtype=dtype)
    outs = []
    for be in backends:
        batch.attn_metadata = be.prepare(batch)
        outs.append(be.attention(q, k_cache, v_cache, batch, dim ** -0.5, None))
    tolerance = BF16 if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tolerance)


@pytest.fixture
def eight_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 700], ids=["full", "window"])
def test_long_decodes_split_across_threads_match_reference(backends, eight_threads, dtype, window):
    # On 8 threads a step of 3 KV heads' work items is too few to fill them: the 1500- and 900-key
    # decodes are split along their keys (parts of 256 keys and up, a window's keys only) and
    # their parts combined; the short decode and the prompt chunk are not.
    batch = ragged_batch([(1500, 1), (900, 1), (5, 1), (40, 9)], 16, 200)
    k_cache, v_cache = randn(200, 16, 3, 64, seed=7, dtype=dtype), randn(200, 16, 3, 64, seed=8, dtype=dtype)
    q = randn(batch.num_tokens, 9, 64, seed=9, dtype=dtype)
    outs = []
    for be in backends:
        batch.attn_metadata = be.prepare(batch)
        outs.append(be.attention(q, k_cache, v_cache, batch, 0.125, window))
    tolerance = BF16 if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_chunks_run_sdpa_beside_the_kernel(backends, dtype):
    """A step whose long prompt chunk goes to SDPA and whose decodes and short chunk to the kernel:
    both write their own rows of one output."""
    cpu, ref = backends
    batch = ragged_batch([(40, 1), (0, 1), (30, 80), (3, 17)], 16, 48)
    meta = cpu.prepare(batch)
    assert [c.q_len for c in meta.sdpa_plan.chunks] == [80] and meta.kernel_seq_ids.tolist() == [0, 1, 3]
    k_cache, v_cache = randn(48, 16, 3, 64, seed=1, dtype=dtype), randn(48, 16, 3, 64, seed=2, dtype=dtype)
    q = randn(batch.num_tokens, 9, 64, seed=3, dtype=dtype)
    outs = []
    for be in backends:
        batch.attn_metadata = be.prepare(batch)
        outs.append(be.attention(q, k_cache, v_cache, batch, 0.125, 24))
    tolerance = BF16 if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tolerance)


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 17])
@pytest.mark.parametrize("dims", [(37, 100), (64, 64)], ids=["odd", "even"])
def test_bf16_linear_matches_torch_in_fp32(backends, rows, dims):
    # kernels.cpu's own linear (bf16 on a CPU without bf16 matrix instructions): rows in 4-row
    # tiles and one at a time, outputs in pairs and eights with one left over (37), and a length
    # off the vector width (100). Against the product in fp32, rounded once to bf16.
    outputs, length = dims
    x, weight, bias = randn(rows, length, seed=10), randn(outputs, length, seed=11), randn(outputs, seed=12)
    expected = F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(backends[0].ops.linear(x, weight, bias), expected, **BF16)
    torch.testing.assert_close(backends[0].ops.linear(x, weight, None),
                               F.linear(x.float(), weight.float()).to(torch.bfloat16), **BF16)


def test_linear_takes_the_op_or_torch_by_dtype_rows_and_cpu(backends, monkeypatch):
    cpu = backends[0]
    calls = []
    monkeypatch.setattr(cpu, "ops", type("Ops", (), {"linear": lambda self, *a: calls.append(a[0].shape) or 0})())
    monkeypatch.setattr(backend_module, "native_16bit_matmul", lambda: frozenset())
    w32, w16 = torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bfloat16)
    cpu.linear(torch.zeros(8, 8), w32)                                  # fp32, few rows: the op
    cpu.linear(torch.zeros(9, 8), w32)                                  # fp32, 9 rows: oneDNN or torch
    cpu.linear(torch.zeros(300, 8, dtype=torch.bfloat16), w16)          # bf16, any rows: the op
    cpu.linear(torch.zeros(2, 8, dtype=torch.bfloat16), w16.t().contiguous().t()[:, :8])   # strided weight
    assert calls == [(8, 8), (300, 8)]
    monkeypatch.setattr(backend_module, "native_16bit_matmul", lambda: frozenset({torch.bfloat16}))
    cpu.linear(torch.zeros(3, 8, dtype=torch.bfloat16), w16)           # bf16 matrix instructions: torch
    assert calls == [(8, 8), (300, 8)]


def test_bf16_elementwise_ops_match_reference(backends):
    cpu, ref = backends
    x, residual, weight = randn(5, 96, seed=4), randn(5, 96, seed=5), randn(96, seed=6)
    for a, b in zip(cpu.rms_norm(x, weight, 1e-6, residual), ref.rms_norm(x, weight, 1e-6, residual)):
        torch.testing.assert_close(a, b, **BF16)
    qkv = randn(5, 8 * 64, seed=7)
    q, k = qkv[:, :256].view(5, 4, 64), qkv[:, 256:384].view(5, 2, 64)
    angles = torch.rand(5, 16, generator=torch.Generator().manual_seed(8)) * 50
    for is_neox in (True, False):
        for a, b in zip(cpu.rotary(q, k, angles.cos(), angles.sin(), is_neox),
                        ref.rotary(q, k, angles.cos(), angles.sin(), is_neox)):
            torch.testing.assert_close(a, b, **BF16)
    gate_up = randn(5, 2 * 80, seed=9) * 4
    torch.testing.assert_close(cpu.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), **BF16)


def test_ops_reject_mismatched_dtypes(backends):
    with pytest.raises(RuntimeError, match="fastgen_cpu.add_rms_norm: tensors must share one dtype"):
        torch.ops.fastgen_cpu.add_rms_norm(torch.ones(2, 8), torch.ones(2, 8, dtype=torch.bfloat16),
                                           torch.ones(8), 1e-6)


def test_a_weight_of_another_dtype_runs_the_reference(backends):
    cpu, ref = backends
    x, weight = randn(3, 32, seed=10), randn(32, seed=11, dtype=torch.float32)
    normed, _ = cpu.rms_norm(x, weight, 1e-6)
    assert normed.dtype == torch.float32
    torch.testing.assert_close(normed, ref.rms_norm(x, weight, 1e-6)[0])


def test_unavailable_on_another_device_or_without_a_compiler(monkeypatch):
    assert "runs on the CPU only, not cuda" in CpuBackend.unavailable_reason(torch.device("cuda"))
    assert CpuBackend.unavailable_reason(None) is None
    monkeypatch.setenv("CXX", "no-such-compiler-fastgen")
    assert "no C++ compiler (no-such-compiler-fastgen)" in CpuBackend.unavailable_reason(torch.device("cpu"))


def test_build_is_cached_by_source(tmp_path, monkeypatch, caplog):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "probe.cpp").write_text(PROBE % 1)
    monkeypatch.setattr(build, "_loaded", {})
    caplog.set_level(logging.INFO, logger=build.__name__)

    first = build.load(str(tmp_path / "cache"), csrc=csrc)
    assert first.exists() and first.parent == build.build_dir(str(tmp_path / "cache"), csrc)
    assert "Building the fastgen CPU kernels" in caplog.text
    built_at = first.stat().st_mtime_ns

    # A new process (here: a cleared registry) loads the cached library without building.
    monkeypatch.setattr(build, "_loaded", {})
    caplog.clear()
    assert build.load(str(tmp_path / "cache"), csrc=csrc) == first
    assert "Building" not in caplog.text and first.stat().st_mtime_ns == built_at

    # An edited source gets a new key, so it is built anew beside the old one.
    (csrc / "probe.cpp").write_text(PROBE % 2)
    second = build.load(str(tmp_path / "cache"), csrc=csrc)
    assert second.parent != first.parent and first.exists() and second.exists()


def test_build_key_follows_the_compiler_flags_and_the_source_folder(tmp_path, monkeypatch):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "probe.cpp").write_text(PROBE % 1)
    key = build.build_key(tmp_path / "a")
    # Same sources in another checkout: its build commands differ, so it must not share the folder.
    assert build.build_key(tmp_path / "b") != key
    monkeypatch.setattr(build, "BASE_CFLAGS", [*build.BASE_CFLAGS, "-DFASTGEN_OTHER"])
    assert build.build_key(tmp_path / "a") != key


def test_a_failed_build_is_a_plugin_error(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("int broken( {\n")
    monkeypatch.setattr(build, "_loaded", {})
    with pytest.raises(PluginError, match=r"Building the CPU kernels in .* failed .*--verbose"):
        build.load(str(tmp_path / "cache"), csrc=tmp_path)


def test_the_sampler_draws_tokens_tied_at_the_cut_beyond_its_candidates():
    # Three tokens above 400 tied at 0: top_k 5 cuts at 0 and keeps all 403, more than the 256
    # candidates it looks at first, so the row draws over the whole vocabulary.
    from fastgen import SamplingParams
    from fastgen.plugins.kernels.cpu.sampling import FIRST_CANDIDATES, sample
    from sampling_inputs import metadata

    row = torch.full((500,), float("-inf"))
    row[:3] = torch.tensor([2.0, 1.5, 1.0])
    row[100:500] = 0.0
    draws = 4000
    tokens = sample(row.expand(draws, -1).contiguous(),
                    metadata([SamplingParams(temperature=1.0, top_k=5)] * draws),
                    torch.Generator().manual_seed(0))
    assert ((tokens < 3) | (tokens >= 100)).all()
    tied = tokens[tokens >= 100].unique()
    assert len(tied) > FIRST_CANDIDATES   # about 370 of the 400 show up in 4000 draws
    # The tied tokens hold 400 / (400 + e^2 + e^1.5 + e) of the mass: about 0.97.
    assert abs((tokens >= 100).double().mean().item() - 400 / (400 + sum(torch.tensor([2.0, 1.5, 1.0]).exp()).item())) < 0.02
