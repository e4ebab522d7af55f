"""The split-KV rule (plugins/kernels/split_kv.py): the split counts it picks for the shapes the
H100 sweep timed (docs/gpu-runs/2026-11-28-h100/sweep.md) are the fastest ones there."""

from __future__ import annotations

import types

import pytest
import torch

from fastgen.plugins.kernels import split_kv
from fastgen.plugins.kernels.split_kv import num_kv_splits, target_programs

H100_SMS = 132


def test_the_target_is_programs_per_multiprocessor(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(multi_processor_count=H100_SMS))
    cuda = torch.device("cuda")
    assert target_programs(cuda) == 2 * H100_SMS
    assert target_programs(cuda, per_multiprocessor=1) == H100_SMS
    assert target_programs(torch.device("cpu"), per_multiprocessor=1) == 8


def test_the_sweeps_fastest_split_counts():
    # kernels.triton, two programs per SM, one program per (tile, KV head); llama3-8b: 8 KV heads.
    assert num_kv_splits(1 * 8, 8192, 2 * H100_SMS) == 32          # 21.3 us; 16 splits 23.2
    assert num_kv_splits(16 * 8, 8192, 2 * H100_SMS) == 3           # within 1% of the best
    assert num_kv_splits(64 * 8, 1024, 2 * H100_SMS) == 1           # 96.7 us, the best
    # kernels.cuda, one program per SM, one per token.
    assert num_kv_splits(1, 8192, H100_SMS) == 32                   # 29.5 us; 16 splits 33.8
    assert num_kv_splits(16, 8192, H100_SMS) == 9                   # 8 splits 212 us; 16: 224
    assert num_kv_splits(64, 1024, H100_SMS) == 3                   # 1-4 splits 128-131 us; 5: 134
    assert num_kv_splits(1, split_kv.MIN_SPLIT_KEYS - 1, H100_SMS) == 1


def test_each_gpu_backend_asks_for_its_own_target(monkeypatch):
    """kernels.cuda plans for one program per SM, kernels.triton for two."""
    pytest.importorskip("triton", reason="kernels.triton needs triton")
    from fastgen.plugins.kernels.cuda import build
    from fastgen.plugins.kernels.cuda.backend import CudaBackend
    from kernel_batches import make_backend, ragged_batch

    asked = []

    def target(device, per_multiprocessor=2):
        asked.append(per_multiprocessor)
        return 8

    monkeypatch.setattr(split_kv, "target_programs", target)
    monkeypatch.setattr(build, "load", lambda cache_dir=None: None)
    monkeypatch.setattr(torch.ops, "fastgen_cuda", types.SimpleNamespace(
        attention_head_sizes=lambda: [64], attention_prompt_tile_tokens=lambda: 4), raising=False)
    batch = ragged_batch([(1200, 1)], block_size=16, num_blocks=80)
    CudaBackend(torch.device("cpu")).prepare(batch)
    make_backend("triton", torch.device("cpu")).prepare(batch)
    assert asked == [1, 2]
