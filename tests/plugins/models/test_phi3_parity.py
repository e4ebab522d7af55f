"""Phi-3 through models.llama against transformers: the same greedy tokens, token for token (see
model_parity), for Phi-3-mini's layout (fused qkv_proj and gate_up_proj, a sliding window) and the
longrope one of Phi-3.5 / Phi-4-mini (short and long factors, partial rotary)."""

from __future__ import annotations

import pytest

import fastgen
from model_parity import (KERNELS, SETTINGS, assert_greedy_parity, assert_parity_with_preemption,
                          checkpoint_fixtures, generate, random_prompts, transformers_greedy)
from tiny_models import ARCHS, make_checkpoint


checkpoint, reference = checkpoint_fixtures("phi3", "phi3-longrope")


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers(reference, kernels, device):
    arch, folder, prompts, expected = reference
    llm = fastgen.LLM(model=str(folder), kernels=kernels, device=device, **SETTINGS)
    rope = llm.engine.model.rope
    # The layout under test must be the one built, or parity says nothing about it.
    if arch == "phi3":
        assert llm.engine.model.windows == [24, 24] and rope.long_from is None
    else:   # prompts longer than 28 run on the long factors, the others on the short ones
        assert rope.long_from == 28 and rope.rotary_dims == 12 < llm.engine.model.head_dim
    assert_greedy_parity(llm, prompts, expected)


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers_with_preemption(checkpoint, kernels, device):
    _, folder, model = checkpoint
    assert_parity_with_preemption(folder, model, kernels, device)


def test_a_short_prompt_keeps_the_short_factors_past_original_max_position_embeddings(tmp_path):
    # transformers' generate recomputes such a sequence with the long factors when it grows past
    # 28 tokens; fastgen keeps the short ones (models/rope.py): its tokens are those of transformers
    # with long_factor = short_factor, and the same as transformers' up to the switch.
    scaling = dict(ARCHS["phi3-longrope"][1]["rope_scaling"])
    short_only = make_checkpoint(tmp_path / "short-only", "phi3-longrope",
                                 rope_scaling=dict(scaling, long_factor=scaling["short_factor"]))
    model = make_checkpoint(tmp_path / "longrope", "phi3-longrope")
    prompts = random_prompts(model.config.vocab_size, (20, 26), seed=2)   # cross 28 while decoding
    llm = fastgen.LLM(model=str(tmp_path / "longrope"), kernels="torch", **SETTINGS)
    outputs, _ = generate(llm, prompts, new_tokens=16)

    for prompt, output in zip(prompts, outputs):
        assert output.token_ids == transformers_greedy(short_only, prompt, 16)
        before_switch = 28 - len(prompt) + 1     # the tokens sampled from sequences of <= 28 tokens
        assert output.token_ids[:before_switch] == transformers_greedy(model, prompt, before_switch)
