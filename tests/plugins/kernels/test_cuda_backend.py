"""kernels.cuda without a GPU: how it reports that it cannot run, how it is keyed and built, and
which ops it routes to the reference. Its kernels against the reference are the conformance
suite's job, which it joins on a machine where it is available."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from fastgen import SamplingParams, cli, plugin_manager as manager_module
from fastgen.config import Config
from fastgen.engine import Engine
from fastgen.errors import PluginError
from fastgen.plugins.kernels.cuda import build
from fastgen.plugins.kernels.cuda.backend import CudaBackend, StepMetadata
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend
from kernel_batches import ragged_batch
from kernel_targets import CPU, CUDA
from sampling_inputs import metadata

needs_cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="torch here has CUDA")


@pytest.fixture
def entry_point_manager(monkeypatch):
    manager = manager_module.PluginManager()
    manager.load_entry_points()
    monkeypatch.setattr(manager_module, "_manager", manager)
    return manager


@needs_cpu_torch
def test_plugins_command_lists_cuda_as_unavailable_with_the_reason(capsys, entry_point_manager):
    assert cli.main(["plugins", "--json"]) == 0
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["kernels.cuda"]
    assert row["available"] is False and row["package"] == "fastgen"
    assert "has no CUDA support" in row["reason"] and "CUDA build of torch" in row["reason"]


@needs_cpu_torch
def test_engine_asked_for_cuda_on_cpu_names_the_usable_backends(entry_point_manager):
    with pytest.raises(PluginError) as error:
        Engine(Config(kernels="cuda", device="cpu"), entry_point_manager)
    message = str(error.value)
    assert message.startswith("kernels.cuda cannot run on cpu: this torch build")
    assert "Usable here:" in message and "kernels.torch" in message


@pytest.fixture
def cuda_machine(monkeypatch):
    """Pretend to be a CUDA build of torch with a GPU, nvcc and ninja; tests take one away."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "nvcc_path", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    return monkeypatch


def test_available_where_torch_has_cuda_and_a_gpu_nvcc_and_ninja(cuda_machine):
    assert CudaBackend.unavailable_reason(CUDA) is None
    assert CudaBackend.unavailable_reason(None) is None


def test_unavailable_reasons_say_what_is_missing_and_what_to_do(cuda_machine):
    from torch.utils import cpp_extension

    assert "CUDA devices only, not cpu" in CudaBackend.unavailable_reason(CPU)
    cuda_machine.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "pip install ninja" in CudaBackend.unavailable_reason(CUDA)
    cuda_machine.setattr(build, "nvcc_path", lambda: None)
    assert "nvcc" in CudaBackend.unavailable_reason(CUDA) and "CUDA_HOME" in CudaBackend.unavailable_reason(CUDA)
    cuda_machine.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in CudaBackend.unavailable_reason(CUDA)
    cuda_machine.setattr(torch.version, "cuda", None)
    assert "has no CUDA support" in CudaBackend.unavailable_reason(None)


def test_build_key_follows_every_source_file(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    assert build.build_key(csrc) == build.build_key(build.CSRC)
    header = csrc / "kernels.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert build.build_key(csrc) != build.build_key(build.CSRC)
    assert {p.name for p in build.sources()} >= {"ops.cpp", "attention.cu", "kv_cache.cu", "rms_norm.cu",
                                                  "rotary.cu", "activation.cu"}


def test_build_lands_in_the_cache_dir_keyed_by_sources(tmp_path):
    assert build.build_dir(str(tmp_path)) == tmp_path / "cuda-kernels" / build.build_key()


def test_is_built_where_load_would_compile_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "_loaded", None)   # as in a fresh process
    assert not build.is_built(str(tmp_path))
    library = build.build_dir(str(tmp_path))
    library.mkdir(parents=True)
    (library / f"fastgen_cuda_{library.name}.so").write_bytes(b"")
    assert build.is_built(str(tmp_path))
    monkeypatch.setattr(build, "_loaded", tmp_path / "elsewhere.so")   # loaded once, serves any root
    assert build.is_built(str(tmp_path / "other"))


def test_a_failed_build_is_one_clear_error(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        assert kwargs["build_directory"].startswith(str(tmp_path))
        raise RuntimeError("Error building extension 'fastgen_cuda'\nmore compiler noise")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(build, "_loaded", None)
    with pytest.raises(PluginError, match=r"Building the CUDA kernels in .* failed \(Error building "
                                          r"extension 'fastgen_cuda'\); run .*--kernels torch"):
        build.load(str(tmp_path))


class FakeOps:
    """Stands in for torch.ops.fastgen_cuda: records each call, answers like the reference."""

    def __init__(self):
        self.calls = []
        self.reference = TorchBackend(CPU)

    def attention_head_sizes(self):
        return [64, 128]

    def attention_prompt_tile_tokens(self):
        return 4

    def attention(self, q, k_cache, v_cache, qsl, seq_lens, block_tables, scale, window, num_splits,
                  prompt_tiles):
        self.calls.append(("attention", window, num_splits, None if prompt_tiles is None else prompt_tiles.tolist()))
        return torch.zeros_like(q)

    def sample(self, logits, temperatures, top_k, top_p, seeds):
        self.calls.append(("sample", logits.dtype, seeds.tolist()))
        return logits.argmax(-1)

    def rms_norm(self, x, weight, eps):
        self.calls.append(("rms_norm",))
        return self.reference.rms_norm(x, weight, eps)[0]

    def add_rms_norm(self, x, residual, weight, eps):
        self.calls.append(("add_rms_norm",))
        return self.reference.rms_norm(x, weight, eps, residual)

    def rotary(self, q, k, cos, sin, is_neox):
        self.calls.append(("rotary", is_neox))
        return self.reference.rotary(q, k, cos, sin, is_neox)

    def silu_and_mul(self, x):
        self.calls.append(("silu_and_mul",))
        return self.reference.silu_and_mul(x)


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setattr(build, "load", lambda cache_dir=None: None)
    ops = FakeOps()
    monkeypatch.setattr(torch.ops, "fastgen_cuda", ops, raising=False)
    return CudaBackend(CPU), ops


def test_inputs_without_a_kernel_run_the_reference_and_say_so_once(backend, caplog):
    be, ops = backend
    x, weight = torch.randn(3, 8), torch.randn(8)
    q, k, angles = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 2, 8), torch.rand(3, 4)
    with caplog.at_level(logging.INFO, "fastgen.plugins.kernels.compiled"):
        for _ in range(2):
            out, residual = be.rms_norm(x, weight.double(), 1e-6)
            q_out, _ = be.rotary(q, k.double(), angles.cos(), angles.sin())
            gated = be.silu_and_mul(x.double())
    assert ops.calls == [] and out.dtype == torch.float64 and residual is x
    torch.testing.assert_close(q_out, ops.reference.rotary(q, k, angles.cos(), angles.sin())[0])
    torch.testing.assert_close(gated, ops.reference.silu_and_mul(x.double()))
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["kernels.cuda: rms_norm of torch.float32 with a torch.float64 weight runs the "
                     "torch reference.", "kernels.cuda: rotary of torch.float64 runs the torch reference.",
                     "kernels.cuda: silu_and_mul of torch.float64 runs the torch reference."]


def test_sample_runs_the_kernel_with_a_seed_per_row(backend):
    be, ops = backend
    logits = torch.randn(3, 10, dtype=torch.float64)
    greedy = metadata([SamplingParams(temperature=0)] * 3)
    assert be.sample(logits, greedy).tolist() == logits.argmax(-1).tolist()
    assert ops.calls == []   # an all-greedy step is one argmax, no kernel and no seeds
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    be.sample(logits[:2], metadata(params), torch.Generator().manual_seed(1))
    assert ops.calls[-1][:2] == ("sample", torch.float32) and ops.calls[-1][2][0] != 0
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=5),
              SamplingParams(temperature=0.5)]
    seeds = []
    for _ in range(2):
        be.sample(logits, metadata(params), torch.Generator().manual_seed(1))
        seeds.append(ops.calls[-1][2])
    # The engine's generator fixes the seeds; no two rows share one.
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 3


def test_rotary_and_silu_and_mul_use_the_kernels(backend):
    be, ops = backend
    q, k, angles = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.rand(3, 2)
    for is_neox in (True, False):
        for actual, expected in zip(be.rotary(q, k, angles.cos(), angles.sin(), is_neox),
                                    ops.reference.rotary(q, k, angles.cos(), angles.sin(), is_neox)):
            torch.testing.assert_close(actual, expected)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(be.silu_and_mul(x), ops.reference.silu_and_mul(x))
    assert ops.calls == [("rotary", True), ("rotary", False), ("silu_and_mul",)]


def test_rms_norm_uses_the_kernels_and_keeps_the_residual_contract(backend):
    be, ops = backend
    x, residual, weight = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    normed, same = be.rms_norm(x, weight, 1e-6)
    assert same is x
    normed, new_residual = be.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(new_residual, x + residual)
    assert ops.calls == [("rms_norm",), ("add_rms_norm",)]


def test_attention_head_sizes_without_a_kernel_run_the_reference(backend):
    be, ops = backend
    batch = ragged_batch([(5, 1), (0, 7)], block_size=4, num_blocks=8)
    batch.attn_metadata = be.prepare(batch)
    assert isinstance(batch.attn_metadata, StepMetadata)
    caches = [torch.randn(8, 4, 2, 96) for _ in range(2)]
    q = torch.randn(batch.num_tokens, 4, 96)
    out = be.attention(q, *caches, batch, 0.1, None)
    reference = TorchBackend(CPU)
    batch.attn_metadata = reference.prepare(batch)
    torch.testing.assert_close(out, reference.attention(q, *caches, batch, 0.1, None))
    assert ops.calls == []

    batch.attn_metadata = be.prepare(batch)
    be.attention(torch.randn(batch.num_tokens, 4, 64), *[c[..., :64] for c in caches], batch, 0.1, 24)
    be.attention(torch.randn(batch.num_tokens, 4, 64), *[c[..., :64] for c in caches], batch, 0.1, None)
    # The 7-token chunk (sequence 1, after the decode) in tiles of 4 new tokens, the one that sees
    # more keys first.
    tiles = [[1, 4], [1, 0]]
    assert ops.calls == [("attention", 24, 1, tiles), ("attention", 0, 1, tiles)]
    assert batch.attn_metadata.plan is None   # the kernel path plans nothing


def test_few_tokens_with_a_long_context_split_their_keys(backend):
    be, ops = backend
    caches = [torch.randn(130, 16, 2, 64) for _ in range(2)]
    long_decodes = ragged_batch([(1200, 1), (700, 1)], block_size=16, num_blocks=130)
    short = ragged_batch([(100, 1), (0, 30)], block_size=16, num_blocks=130)
    for batch in (long_decodes, short):
        batch.attn_metadata = be.prepare(batch)
        be.attention(torch.randn(batch.num_tokens, 4, 64), *caches, batch, 0.1, None)
    # Off a GPU the target is 8 programs: 2 tokens get ceil(8 / 2) = 4 parts each (1201 keys
    # would allow 5); 31 tokens over 100 keys are enough work whole.
    assert [call[:3] for call in ops.calls] == [("attention", 0, 4), ("attention", 0, 1)]
    be.num_kv_splits = 3
    short.attn_metadata = be.prepare(short)
    be.attention(torch.randn(short.num_tokens, 4, 64), *caches, short, 0.1, None)
    assert ops.calls[-1][:3] == ("attention", 0, 3)
