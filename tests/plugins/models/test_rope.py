"""The rotary tables of models.llama against transformers' rotary embeddings, position for position:
every rope type served, partial rotary, and longrope's choice between its short and long factors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastgen.errors import ModelLoadError
from fastgen.plugins.models.rope import RotaryTables
from tiny_models import ARCHS

NUM_POSITIONS = 1024


def configs(arch: str, **overrides):
    """(transformers config of the tiny `arch` checkpoints, its rotary embedding module)."""
    import transformers

    prefix, settings = ARCHS[arch]
    config = getattr(transformers, f"{prefix}Config")(
        **dict(settings, vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=NUM_POSITIONS, **overrides))
    module = getattr(transformers.models, prefix.lower())
    rotary = getattr(getattr(module, f"modeling_{prefix.lower()}"), f"{prefix}RotaryEmbedding")
    return config, rotary(config)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def forward_pass(prompt_len: int, start: int, count: int) -> SimpleNamespace:
    """A step's batch metadata for one sequence: its tokens at positions start..start+count-1."""
    return SimpleNamespace(positions=torch.arange(start, start + count),
                           sequences=[SimpleNamespace(prompt_len=prompt_len)], query_lens=[count])


def reference(rotary, positions: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos, sin [T, R/2] of one forward pass over `positions`."""
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    return cos[0, :, :half], sin[0, :, :half]


def assert_rows(tables: RotaryTables, batch, rotary) -> None:
    cos, sin = tables.lookup(batch)
    expected_cos, expected_sin = reference(rotary, batch.positions, tables.rotary_dims // 2)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "phi3-longrope"])
def test_a_prompt_matches_transformers(arch):
    config, rotary = configs(arch)
    tables = RotaryTables(config, head_dim(config), NUM_POSITIONS, torch.device("cpu"))
    assert tables.rotary_dims == (12 if arch == "phi3-longrope" else head_dim(config))
    for prompt_len in (1, 7, 28, 29, 300):
        assert_rows(tables, forward_pass(prompt_len, 0, prompt_len), rotary)


@pytest.mark.parametrize("named", [dict(factor=4.0), dict(attention_factor=1.3)])
def test_longrope_takes_a_named_factor_or_attention_factor(named):
    # Without them, both derive from max_position_embeddings / original_max_position_embeddings.
    scaling = dict(ARCHS["phi3-longrope"][1]["rope_scaling"], **named)
    config, rotary = configs("phi3-longrope", rope_scaling=scaling)
    tables = RotaryTables(config, head_dim(config), NUM_POSITIONS, torch.device("cpu"))
    assert_rows(tables, forward_pass(7, 0, 7), rotary)
    assert_rows(tables, forward_pass(33, 0, 33), rotary)


def test_longrope_takes_the_factors_of_the_prompt_length():
    # original_max_position_embeddings is 28: a prompt of 28 tokens or fewer runs on the short
    # factors, past position 28 too (where transformers' generate would recompute the sequence with
    # the long ones); a longer prompt is long from its start, however the engine splits it.
    config, rotary = configs("phi3-longrope")
    tables = RotaryTables(config, head_dim(config), NUM_POSITIONS, torch.device("cpu"))
    assert tables.long_from == 28
    scaling = dict(ARCHS["phi3-longrope"][1]["rope_scaling"])
    _, short_only = configs("phi3-longrope", rope_scaling=dict(scaling, long_factor=scaling["short_factor"]))
    for position in (15, 27, 28, 29, 500):        # decodes of a sequence with a 28-token prompt
        assert_rows(tables, forward_pass(28, position, 1), short_only)
    cos, _ = tables.lookup(forward_pass(33, 5, 10))    # a chunk of a 33-token prompt
    torch.testing.assert_close(cos, reference(rotary, torch.arange(33), 6)[0][5:15], rtol=0, atol=0)
    short, _ = tables.lookup(forward_pass(15, 5, 10))
    assert not torch.equal(cos, short)   # the two sets differ, or the checks above say nothing


def test_a_ragged_step_takes_each_sequence_its_own_factors():
    config, _ = configs("phi3-longrope")
    tables = RotaryTables(config, head_dim(config), NUM_POSITIONS, torch.device("cpu"))
    mixed = SimpleNamespace(positions=torch.tensor([40, 41, 3, 4, 3, 4]),
                            sequences=[SimpleNamespace(prompt_len=n) for n in (10, 30, 5, 40)],
                            query_lens=[1, 1, 2, 2])
    alone = [forward_pass(10, 40, 1), forward_pass(30, 41, 1), forward_pass(5, 3, 2),
             forward_pass(40, 3, 2)]
    cos, sin = tables.lookup(mixed)
    torch.testing.assert_close(cos, torch.cat([tables.lookup(b)[0] for b in alone]), rtol=0, atol=0)
    torch.testing.assert_close(sin, torch.cat([tables.lookup(b)[1] for b in alone]), rtol=0, atol=0)
    assert not torch.equal(cos[:1], tables.lookup(forward_pass(30, 40, 1))[0])


def test_an_unsupported_rope_type_is_refused_by_name():
    config, _ = configs("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ModelLoadError, match=r"Rope type 'dynamic' is not supported by models\.llama; "
                                             r"supported: default, linear, llama3, longrope\."):
        RotaryTables(config, head_dim(config), NUM_POSITIONS, torch.device("cpu"))
