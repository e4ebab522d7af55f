"""models.opt against transformers: the same greedy tokens, token for token (see model_parity),
for the pre-LayerNorm layout (opt-125m ... 6.7b) and opt-350m's post-LayerNorm one with its
embedding projections; the config variants OPT allows; the CLI on an OPT folder."""

from __future__ import annotations

import pytest

import fastgen
from fastgen import cli
from fastgen.errors import ModelLoadError
from model_parity import (KERNELS, SETTINGS, assert_greedy_parity, assert_parity_with_preemption,
                          checkpoint_fixtures, reference_continuations, transformers_greedy)
from tiny_models import make_checkpoint

# Every switch of OPTConfig we serve, away from its default at once.
VARIANT = dict(activation_function="gelu", enable_bias=False, layer_norm_elementwise_affine=False,
               tie_word_embeddings=False, _remove_final_layer_norm=True)


checkpoint, reference = checkpoint_fixtures("opt", "opt-post-ln")


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers(reference, kernels, device):
    arch, folder, prompts, expected = reference
    llm = fastgen.LLM(model=str(folder), kernels=kernels, device=device, **SETTINGS)
    model = llm.engine.model
    # The layout under test must be the one built, or parity says nothing about it.
    assert model.pre_norm == (arch == "opt")
    assert (model.project_in is not None) == (arch == "opt-post-ln")
    assert_greedy_parity(llm, prompts, expected)


@pytest.mark.parametrize("kernels,device", KERNELS)
def test_greedy_matches_transformers_with_preemption(checkpoint, kernels, device):
    _, folder, model = checkpoint
    assert_parity_with_preemption(folder, model, kernels, device)


@pytest.mark.parametrize("arch", ["opt", "opt-post-ln"])
def test_config_variants_match_transformers(tmp_path, arch):
    model = make_checkpoint(tmp_path, arch, **VARIANT)
    prompts, expected = reference_continuations(model)
    llm = fastgen.LLM(model=str(tmp_path), kernels="torch", **SETTINGS)
    assert llm.engine.model.lm_head is not None and llm.engine.model.layers[0].qkv_bias is None
    assert_greedy_parity(llm, prompts, expected)


def test_generate_command_on_an_opt_folder(tmp_path, capsys):
    model = make_checkpoint(tmp_path, "opt")
    tokenizer = fastgen.LLM(model=str(tmp_path), kernels="torch").tokenizer
    prompt = "The quick brown"
    expected = transformers_greedy(model, tokenizer.encode(prompt), 6)

    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-tokens", "6",
                     "--no-chat", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out == tokenizer.decode(expected, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False) + "\n"
    assert "[6 tokens" in captured.err


def test_an_unsupported_activation_is_refused_by_name(tmp_path):
    make_checkpoint(tmp_path, "opt", activation_function="gelu_new")
    with pytest.raises(ModelLoadError, match=r"models\.opt serves activation_function relu or gelu, "
                                             r"the checkpoint has 'gelu_new'\."):
        fastgen.LLM(model=str(tmp_path), kernels="torch")


def test_a_weight_the_config_has_no_place_for_is_refused(tmp_path):
    # Biases in the checkpoint, a config that says there are none: serving would drop them.
    make_checkpoint(tmp_path, "opt")
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"enable_bias": true', '"enable_bias": false'))
    with pytest.raises(ModelLoadError, match=r"Checkpoint weight model\.decoder\.layers\.0\.\S+\.bias "
                                             r"has no place in a model built from this config\.json"):
        fastgen.LLM(model=str(tmp_path), kernels="torch")
