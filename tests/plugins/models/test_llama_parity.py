"""models.llama against transformers: the same greedy tokens, token for token (see model_parity)."""

from __future__ import annotations

import pytest

import fastgen
from model_parity import (KERNELS, SETTINGS, assert_greedy_parity, assert_parity_with_preemption,
                          reference_continuations)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """(arch, folder, prompts, transformers' greedy continuations), once per architecture."""
    arch, folder, model = tiny_checkpoint
    return (arch, folder, *reference_continuations(model))


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers(reference, kernels, device):
    arch, folder, prompts, expected = reference
    llm = fastgen.LLM(model=str(folder), kernels=kernels, device=device, **SETTINGS)
    if arch == "mistral":   # the window must be in force, or parity says nothing about it
        assert set(llm.engine.model.windows) == {24}
    assert_greedy_parity(llm, prompts, expected)


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers_with_preemption(tiny_checkpoint, kernels, device):
    _, folder, model = tiny_checkpoint
    assert_parity_with_preemption(folder, model, kernels, device)


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers_over_a_kv_cache_that_holds_nan(reference, kernels, device):
    """Every slot of the KV cache starts as NaN, as if earlier requests whose model overflowed in
    float16 had left it everywhere: each request reads only its own keys, so nothing changes. The
    kernels read blocks whole (the rest of a sequence's last block, the block a short row of the
    block table is padded with) and must keep what they did not write out of the output."""
    _, folder, prompts, expected = reference
    llm = fastgen.LLM(model=str(folder), kernels=kernels, device=device, **SETTINGS)
    for k_cache, v_cache in llm.engine.kv_cache:
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    assert_greedy_parity(llm, prompts, expected)
