"""The memory-bound defaults. The KV cache's size when the settings do not give it: 1 GiB on a
CPU; on a GPU what gpu_memory_utilization leaves with the model loaded and a step's activations
kept. The token budget: 512 on a CPU; on a GPU 2048 where its activations leave the cache most of
the room."""

import pytest
import torch

from fastgen import LLM, SamplingParams
from fastgen.config import make_config
from fastgen.engine import Engine, default_max_num_seqs
from fastgen.errors import ConfigError
from fastgen.kv_memory import (GpuMemory, default_token_budget, gpu_kv_cache_bytes,
                               step_activation_bytes, step_reserve_bytes)

GiB = 2**30
CUDA = torch.device("cuda")


@pytest.fixture
def gpu_memory(monkeypatch):
    """A stand-in GPU: set `state["free"]` and `state["total"]` in GiB."""
    state = {"free": 60, "total": 80, "emptied": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (state["free"] * GiB, state["total"] * GiB))
    monkeypatch.setattr(torch.cuda, "empty_cache",
                        lambda: state.__setitem__("emptied", state["emptied"] + 1))
    return state


def test_the_gpu_cache_takes_the_share_left_after_what_is_in_use_and_the_reserve(gpu_memory):
    # 90% of 80 GiB = 72; 20 in use (the model, other processes); 2 kept for activations.
    assert (gpu_kv_cache_bytes(GpuMemory.measure(CUDA, 0.9), 2 * GiB)
            == int(0.9 * 80 * GiB) - 20 * GiB - 2 * GiB)
    assert gpu_memory["emptied"] == 1   # torch's cached blocks are counted as free first
    assert (gpu_kv_cache_bytes(GpuMemory.measure(CUDA, 0.5), 2 * GiB)
            == 40 * GiB - 20 * GiB - 2 * GiB)


def test_no_room_left_is_a_clear_error(gpu_memory):
    gpu_memory["free"] = 5   # another engine or process holds 75 of 80 GiB
    with pytest.raises(ConfigError, match=r"5\.0 of its 80\.0 GiB are free.*gpu_memory_utilization "
                                          r"0\.9.*kv_cache_gb or num_blocks"):
        gpu_kv_cache_bytes(GpuMemory.measure(CUDA, 0.9), GiB)


def test_the_activation_reserve_follows_the_budget_and_the_vocabulary(tiny_llama):
    config = tiny_llama[1].config
    small = step_activation_bytes(config, 64, 8, 2)
    assert step_activation_bytes(config, 128, 8, 2) > small
    assert step_activation_bytes(config, 64, 8, 4) > small
    # Every token of a step may be scored (prompt logprobs): float32 logits for each, with copies.
    assert small >= 3 * 64 * config.vocab_size * 4


def test_on_a_cpu_unset_is_one_gib_and_settings_win(tiny_llama):
    folder = str(tiny_llama[0])
    assert make_config().kv_cache_gb is None and make_config().gpu_memory_utilization == 0.9
    engine = Engine(make_config(model=folder, device="cpu", dtype="float32"))
    layers, kv_heads, head_dim = engine.model.kv_cache_spec
    per_block = 2 * layers * 16 * kv_heads * head_dim * 4
    assert len(engine.kv_cache[0][0]) == GiB // per_block
    engine = Engine(make_config(model=folder, device="cpu", dtype="float32", kv_cache_gb=0.25))
    assert len(engine.kv_cache[0][0]) == GiB // 4 // per_block
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="gpu_memory_utilization must be more than 0 and at most 1"):
            make_config(gpu_memory_utilization=bad)


def test_a_gpu_steps_2048_tokens_where_their_activations_leave_the_cache_most_of_the_room(
        gpu_memory, tiny_llama):
    config = tiny_llama[1].config
    reserve = step_reserve_bytes(config, 2048, 64, 2)
    # The room: 90% of the total less what is in use (the stand-in's 80 GiB, 20 in use: 52 GiB).
    assert default_token_budget(config, 64, 2, GpuMemory.measure(CUDA, 0.9)) == 2048
    # A GPU whose room is under four times the 2048-token reserve (a large model on a small GPU):
    # the cache keeps it, and steps are 512 tokens.
    gpu_memory["total"] = 10
    gpu_memory["free"] = 10 - 9 + (4 * reserve - 1) / GiB     # room = 9 - in use = 4 x reserve - 1 B
    assert default_token_budget(config, 64, 2, GpuMemory.measure(CUDA, 0.9)) == 512
    gpu_memory["free"] += 2 / GiB
    assert default_token_budget(config, 64, 2, GpuMemory.measure(CUDA, 0.9)) == 2048
    assert default_token_budget(config, 64, 2, None) == 512


def test_the_engine_fills_in_the_step_sizes_it_runs_with(tiny_llama):
    folder = str(tiny_llama[0])
    assert make_config().token_budget is None and make_config().max_num_seqs is None
    assert default_max_num_seqs(CUDA) == 256 and default_max_num_seqs(torch.device("cpu")) == 64
    engine = Engine(make_config(model=folder, device="cpu", dtype="float32", num_blocks=64))
    assert (engine.config.max_num_seqs, engine.scheduler.config.max_num_seqs) == (64, 64)
    for _ in range(70):                # 70 short prompts: the first step takes 64 of them
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=1))
    engine.step()
    assert engine.last_stats.num_seqs == 64 and engine.last_stats.num_tokens == 64 * 3
    for setting, budget in ((None, 512), (96, 96)):   # unset on a CPU: 512
        engine = Engine(make_config(model=folder, device="cpu", dtype="float32", num_blocks=64,
                                    token_budget=setting))
        assert engine.config.token_budget == budget
        engine.add_request([3 + i % 400 for i in range(700)], SamplingParams(max_tokens=1))
        engine.step()
        assert engine.last_stats.num_tokens == budget   # the first chunk of a 700-token prompt
    # LLM's config is the engine's, as it runs.
    assert LLM(model=folder, device="cpu", dtype="float32", num_blocks=64).config.token_budget == 512
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="token_budget must be at least 1"):
            make_config(token_budget=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_default_cache_takes_its_share_and_a_dropped_engine_gives_it_back(tiny_llama):
    def make():
        return Engine(make_config(model=str(tiny_llama[0]), device="cuda", dtype="float32",
                                  gpu_memory_utilization=0.5))

    def cache_bytes(engine):
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in engine.kv_cache)

    _, total = torch.cuda.mem_get_info()
    engine = make()
    # A tiny model's 2048-token steps take little of the GPU: the GPU's step sizes.
    assert (engine.config.token_budget, engine.config.max_num_seqs) == (2048, 256)
    first = cache_bytes(engine)
    del engine                    # dropped, its memory held until collected
    assert 0.4 * total < first <= 0.5 * total   # a tiny model: nearly all of the half
    assert cache_bytes(make()) >= 0.99 * first
