"""Qwen3 through models.llama against transformers: the same greedy tokens, token for token (see
model_parity), with per-head q/k RMSNorm, head_dim unlike hidden / heads, and a sliding window on
the layers from max_window_layers on."""

from __future__ import annotations

import pytest

import fastgen
from fastgen.errors import ModelLoadError
from model_parity import (KERNELS, SETTINGS, assert_greedy_parity, assert_parity_with_preemption,
                          checkpoint_fixtures, reference_continuations)
from tiny_models import make_checkpoint


checkpoint, reference = checkpoint_fixtures("qwen3")


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers(reference, kernels, device):
    _, folder, prompts, expected = reference
    llm = fastgen.LLM(model=str(folder), kernels=kernels, device=device, **SETTINGS)
    model = llm.engine.model
    # What makes Qwen3 differ from Qwen2 must be in force, or parity says nothing about it.
    assert model.head_dim == 32 != model.hidden // model.heads
    assert model.layers[0].q_norm is not None and model.layers[0].qkv_bias is None
    assert model.windows == [None, 24]
    assert_greedy_parity(llm, prompts, expected)


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers_with_preemption(checkpoint, kernels, device):
    _, folder, model = checkpoint
    assert_parity_with_preemption(folder, model, kernels, device)


def test_attention_bias_matches_transformers(tmp_path):
    # attention_bias puts biases on q, k, v and o alike.
    model = make_checkpoint(tmp_path, "qwen3", attention_bias=True, use_sliding_window=False)
    prompts, expected = reference_continuations(model)
    llm = fastgen.LLM(model=str(tmp_path), kernels="torch", **SETTINGS)
    layer = llm.engine.model.layers[0]
    assert layer.qkv_bias is not None and layer.o_bias is not None
    assert llm.engine.model.windows == [None, None]
    assert_greedy_parity(llm, prompts, expected)


def test_an_unknown_layer_type_is_refused_by_name(tmp_path):
    make_checkpoint(tmp_path, "qwen3")
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"sliding_attention"', '"chunked_attention"'))
    with pytest.raises(ModelLoadError, match=r"models\.llama serves layer_types full_attention and "
                                             r"sliding_attention, the checkpoint has 'chunked_attention'\."):
        fastgen.LLM(model=str(tmp_path), kernels="torch")
