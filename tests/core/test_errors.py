"""Bad input gets one clear error of the right type, and the engine keeps serving afterwards."""

from __future__ import annotations

import json
import math
import re

import pytest

import fastgen
from fastgen import ConfigError, ModelLoadError, PluginError, RequestError, SamplingParams
from fastgen.config import make_config


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return fastgen.LLM(model=str(tiny_llama[0]), device="cpu", max_model_len=32)


# --- plugins and models -------------------------------------------------------------------------

@pytest.mark.parametrize("setting, kind", [("scheduler", "schedulers"), ("kernels", "kernels")])
def test_unknown_plugin_lists_the_installed_ones(tiny_llama, setting, kind):
    from fastgen.plugin_manager import load_plugins

    installed = [info.full_name for info in load_plugins().registry.items[kind].values()]
    with pytest.raises(PluginError) as e:
        fastgen.LLM(model=str(tiny_llama[0]), **{setting: "nope"})
    message = str(e.value)
    assert f"{kind}.nope" in message
    assert installed and all(name in message for name in installed)


def test_unknown_scheduler_names_splitfuse(tiny_llama):
    with pytest.raises(PluginError, match=r"schedulers\.splitfuse"):
        fastgen.LLM(model=str(tiny_llama[0]), scheduler="nope")


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        fastgen.LLM(model=str(tmp_path))


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        fastgen.LLM(model=str(missing))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    with pytest.raises(ModelLoadError) as e:
        fastgen.LLM(model=str(tmp_path))
    message = str(e.value)
    assert "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM" in message      # says what is served instead


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        fastgen.LLM(model=str(tmp_path))


def _broken_copy(tiny_llama, tmp_path, break_it):
    """A copy of the tiny Llama's folder, broken by `break_it(folder)`."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama[0], folder)
    break_it(folder)
    return folder


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _add_a_layer_past_the_config(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.weight"] = next(
        t for n, t in tensors.items() if n.endswith("layers.0.mlp.up_proj.weight")).clone()
    save_file(tensors, folder / "model.safetensors")


def _zero_heads(folder):
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = 0
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("break_it, message", [
    (_truncate_weights, r"Cannot read weights file .*model\.safetensors: .*header"),
    (_add_a_layer_past_the_config,
     r"Checkpoint weight model\.layers\.9\.mlp\.up_proj\.weight is for layer 9, and config\.json's "
     r"num_hidden_layers is 2"),
    (_zero_heads, r"Cannot read .*config\.json: ZeroDivisionError")],
    ids=["truncated-weights", "layer-past-the-config", "zero-heads"])
def test_a_broken_checkpoint_is_a_model_load_error_that_says_what_is_wrong(tiny_llama, tmp_path,
                                                                           break_it, message):
    with pytest.raises(ModelLoadError, match=message):
        fastgen.LLM(model=str(_broken_copy(tiny_llama, tmp_path, break_it)), device="cpu")


# --- settings -----------------------------------------------------------------------------------

def test_unknown_setting_lists_the_settings(tiny_llama):
    with pytest.raises(ConfigError) as e:
        fastgen.LLM(model=str(tiny_llama[0]), token_budgett=64)
    message = str(e.value)
    assert "token_budgett" in message
    for known in ("token_budget", "max_num_seqs", "block_size", "scheduler", "kernels"):
        assert known in message


@pytest.mark.parametrize("settings", [dict(token_budget=0), dict(max_num_seqs=0),
                                      dict(block_size=0), dict(num_blocks=0),
                                      dict(dtype="float64"), dict(token_budget="many")])
def test_out_of_range_settings(settings):
    name = next(iter(settings))
    with pytest.raises(ConfigError, match=name):
        make_config(**settings)


@pytest.mark.parametrize("settings", [dict(max_model_len=-5), dict(kv_cache_gb=-1.0),
                                      dict(threads=-1), dict(threads=10**6), dict(port=-1),
                                      dict(port=70000), dict(shutdown_timeout=-1.0),
                                      dict(shutdown_timeout=math.nan), dict(seed=-1),
                                      dict(seed=2**64)],
                         ids=lambda d: "=".join(map(str, next(iter(d.items())))))
def test_more_out_of_range_settings(settings):
    """Each refused with its name and value, in one sentence (a million threads crashed torch; a
    seed past 64 bits failed as an overflow deep in the engine)."""
    name, value = next(iter(settings.items()))
    with pytest.raises(ConfigError, match=f"{name} must be .*, got {value}") as e:
        make_config(**settings)
    assert str(e.value).endswith(".") and not str(e.value).endswith("..")


@pytest.mark.parametrize("device, message", [
    ("meta", r"Unknown device 'meta'; use auto, cpu or cuda\[:N\]\."),
    ("tpu", r"Unknown device 'tpu'"),
    ("cuda:99", r"Device 'cuda:99': (this torch build .* has no CUDA support|torch sees no CUDA GPU|"
                r"this machine has \d+ CUDA GPUs)")])
def test_a_device_that_is_not_here_says_why(tiny_llama, device, message):
    with pytest.raises(fastgen.FastgenError, match=message):
        fastgen.LLM(model=str(tiny_llama[0]), device=device)


@pytest.mark.parametrize("settings", [dict(kv_cache_gb=10.0**6), dict(num_blocks=10**9)],
                         ids=["kv_cache_gb", "num_blocks"])
def test_a_kv_cache_larger_than_the_free_memory_is_refused_before_it_is_allocated(tiny_llama, settings):
    with pytest.raises(ConfigError, match=r"A KV cache of [\d.]+ GiB \(\d+ blocks of 16 tokens\) does not "
                                          r"fit in the [\d.]+ GiB free on cpu; lower kv_cache_gb or num_blocks"):
        fastgen.LLM(model=str(tiny_llama[0]), device="cpu", **settings)


# --- requests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [dict(max_tokens=0), dict(max_tokens=-3),
                                    dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_p=-0.5), dict(stop=[""]),
                                    dict(stop="")])
def test_bad_sampling_params(params):
    name = next(iter(params))
    with pytest.raises(RequestError, match=name if name != "stop" else "stop strings"):
        SamplingParams(**params)


def test_nan_temperature_is_refused():
    with pytest.raises(RequestError):
        SamplingParams(temperature=math.nan)


def test_prompt_longer_than_the_context(llm):
    engine = llm.engine
    assert engine.max_model_len == 32
    with pytest.raises(RequestError) as e:
        llm.generate(list(range(1, 41)), SamplingParams(max_tokens=2))
    message = str(e.value)
    assert "40" in message and "32" in message
    # a prompt of exactly max_model_len leaves no room to generate: refused too
    with pytest.raises(RequestError, match="32"):
        llm.generate(list(range(1, 33)), SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()
    # and the engine still serves: the longest prompt that fits runs into the context limit
    out = llm.generate(list(range(1, 32)), SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.finished and len(out.token_ids) == 4
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_one_bad_prompt_queues_none_of_the_batch(llm):
    with pytest.raises(RequestError):
        llm.generate([[1, 2, 3], list(range(1, 50))], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished() and not llm.engine.sequences


@pytest.mark.parametrize("prompt", [[-1], [10**6], [1, 2.5], [True], []])
def test_bad_prompt_token_ids(llm, prompt):
    with pytest.raises(RequestError):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("prompts, sampling_params, message", [
    (None, None, "prompts must be a string, token ids, or a list of those; got NoneType"),
    (7.5, None, "prompts must be a string, token ids, or a list of those; got float"),
    ([{"role": "user"}], None, "A prompt is a string or token ids; got dict"),
    ("x", {"max_tokens": 2}, "sampling_params must be a SamplingParams or a list of them; got dict")],
    ids=["none", "a-number", "a-message", "params-as-a-dict"])
def test_offline_arguments_of_the_wrong_type_say_what_was_expected(llm, prompts, sampling_params,
                                                                   message):
    with pytest.raises(TypeError, match=re.escape(message)):
        llm.generate(prompts, sampling_params)


def test_token_ids_in_numpy_arrays_and_tensors_are_prompts_like_lists(llm):
    import numpy as np
    import torch

    params = SamplingParams(max_tokens=3, temperature=0)
    want = [o.token_ids for o in llm.generate([[5, 6, 7], [9, 10, 11]], params)]
    for prompts in (np.array([[5, 6, 7], [9, 10, 11]]), torch.tensor([[5, 6, 7], [9, 10, 11]]),
                    [np.array([5, 6, 7]), torch.tensor([9, 10, 11])],
                    [[np.int64(5), np.int32(6), torch.tensor(7)], (9, 10, 11)]):
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert llm.generate(np.array([5, 6, 7]), params)[0].token_ids == want[0]
    with pytest.raises(RequestError, match=r"integers in \[0, \d+\); got \[1.5\]"):
        llm.generate(np.array([1.5]), params)


def test_duplicate_request_id(llm):
    engine = llm.engine
    engine.add_request([1, 2], SamplingParams(max_tokens=1), request_id="same")
    try:
        with pytest.raises(RequestError, match="same"):
            engine.add_request([3, 4], SamplingParams(max_tokens=1), request_id="same")
    finally:
        engine.abort_request("same")
    assert not engine.has_unfinished()


def test_errors_are_fastgen_errors():
    for cls in (ConfigError, ModelLoadError, PluginError, RequestError):
        assert issubclass(cls, fastgen.FastgenError)
