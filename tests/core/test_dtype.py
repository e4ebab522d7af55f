"""dtype = auto: on a CPU bfloat16 where it has bf16 matrix instructions, else float32; on a GPU
the checkpoint's own 16-bit dtype, else bfloat16, or float16 where the GPU has none."""

import json

import pytest
import torch

from fastgen import checkpoint
from fastgen.checkpoint import resolve_dtype
from fastgen.config import make_config
from fastgen.engine import Engine

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def folder_with(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("own,bf16,expected", [
    ("float32", True, "bfloat16"), ("bfloat16", True, "bfloat16"), ("float16", True, "float16"),
    (None, True, "bfloat16"), ("float32", False, "float16"), ("bfloat16", False, "float16"),
])
def test_auto_on_a_gpu_runs_a_16_bit_dtype(tmp_path, monkeypatch, own, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    model = folder_with(tmp_path, torch_dtype=own) if own else folder_with(tmp_path)
    assert resolve_dtype("auto", model, CUDA) == expected


def test_auto_reads_the_newer_dtype_key_and_takes_a_gguf_or_the_demo_as_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", folder_with(tmp_path, dtype="float16"), CUDA) == "float16"
    assert resolve_dtype("auto", str(tmp_path / "model.gguf"), CUDA) == "bfloat16"
    assert resolve_dtype("auto", None, CUDA) == "bfloat16"


@pytest.mark.parametrize("native", [{torch.bfloat16}, {torch.bfloat16, torch.float16}])
def test_auto_on_a_cpu_with_bf16_matrix_instructions_is_bfloat16(tmp_path, tiny_llama, monkeypatch, native):
    """AMX or AVX512-BF16: bf16 is the fast CPU dtype there, whatever the checkpoint's own (an
    fp16 checkpoint too: fp16 is served slowly where AMX-FP16 is missing, and bf16 holds its range)."""
    monkeypatch.setattr(checkpoint, "native_16bit_matmul", lambda: frozenset(native))
    for own in ("float32", "float16", "bfloat16"):
        assert resolve_dtype("auto", folder_with(tmp_path, torch_dtype=own), CPU) == "bfloat16"
    assert resolve_dtype("auto", None, CPU) == "bfloat16"
    engine = Engine(make_config(model=str(tiny_llama[0]), device="cpu", num_blocks=8))
    assert engine.dtype == torch.bfloat16 and engine.kv_cache[0][0].dtype == torch.bfloat16


def test_auto_on_a_cpu_without_them_is_float32_and_a_setting_wins(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(checkpoint, "native_16bit_matmul", lambda: frozenset())
    model = folder_with(tmp_path, torch_dtype="bfloat16")
    assert resolve_dtype("auto", model, CPU) == "float32"
    assert resolve_dtype("float16", model, CUDA) == "float16"
    assert make_config().dtype == "auto"
    engine = Engine(make_config(model=str(tiny_llama[0]), device="cpu", num_blocks=8))
    assert engine.dtype == torch.float32 and engine.kv_cache[0][0].dtype == torch.float32
