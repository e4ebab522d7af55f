"""Penalties, min-p and log-probabilities: against transformers' own processors and model.

Penalties and logprobs run in the core, so they are tested end to end on the tiny Llama: greedy
tokens under a repetition penalty equal transformers' `generate(repetition_penalty=...)`, and
logprobs equal transformers' log-softmax at every position.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastgen import SamplingParams
from fastgen.errors import RequestError
from fastgen.logits_processors import apply_logits_processors
from fastgen.request import Sequence

from tiny_models import SERVE_SETTINGS


def seq_with(prompt: list[int], output: list[int], **params) -> Sequence:
    seq = Sequence("r", prompt, SamplingParams(**params))
    seq.token_ids += output
    return seq


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seq = seq_with([0], [1], repetition_penalty=2.0)        # tokens 0 (prompt) and 1 (output) seen
    out = apply_logits_processors(logits.clone(), [seq])
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    seq = seq_with([3, 3], [1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_logits_processors(logits, [seq])
    # token 1 twice: 2 * 0.25 + 0.5; token 2 once: 0.25 + 0.5; prompt token 3 untouched.
    assert out.tolist() == [[0.0, -1.0, -0.75, 0.0]]


def test_min_p_drops_tokens_below_the_share_of_the_best_at_the_temperature():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    logits = probs.log()
    seq = seq_with([0], [], min_p=0.2, temperature=1.0)       # keep p >= 0.1
    out = apply_logits_processors(logits.clone(), [seq])
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()
    # At temperature 2 the distribution is flatter: 0.08 ** 0.5 ... all are kept at min_p 0.2.
    flat = seq_with([0], [], min_p=0.2, temperature=2.0)
    assert torch.isfinite(apply_logits_processors(logits.clone(), [flat])).all()


def test_rows_without_processing_are_untouched_and_greedy_rows_ignore_min_p():
    logits = torch.randn(3, 16)
    seqs = [seq_with([1], [2]), seq_with([1], [2], min_p=0.9, temperature=0.0),
            seq_with([1], [2], repetition_penalty=1.5)]
    out = apply_logits_processors(logits.clone(), seqs)
    assert torch.equal(out[:2], logits[:2]) and not torch.equal(out[2], logits[2])


@pytest.mark.parametrize("field,value", [("min_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -2.5),
                                         ("repetition_penalty", 0), ("logprobs", 21), ("prompt_logprobs", -1)])
def test_out_of_range_values_are_request_errors(field, value):
    with pytest.raises(RequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


@pytest.fixture(scope="module")
def llm(tiny_llama):
    from fastgen import LLM

    return LLM(model=str(tiny_llama[0]), **SERVE_SETTINGS)


PROMPTS = [[5, 9, 9, 14, 5, 30, 7], list(range(40, 90))]


def test_repetition_penalty_matches_transformers_generate(llm, tiny_llama):
    model = tiny_llama[1]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                repetition_penalty=1.8))
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 repetition_penalty=1.8, min_new_tokens=12, max_new_tokens=12)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    plain = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert plain[0].token_ids != outs[0].token_ids   # the penalty changed something here


def transformers_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: log-softmax of transformers' logits at every position."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def test_logprobs_of_generated_and_prompt_tokens_match_transformers(llm, tiny_llama):
    model = tiny_llama[1]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True,
                            logprobs=3, prompt_logprobs=2)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        ref = transformers_logprobs(model, prompt + out.token_ids)
        assert [e.token_id for e in out.logprobs] == out.token_ids
        for i, entry in enumerate(out.logprobs):
            row = ref[len(prompt) - 1 + i]
            assert math.isclose(entry.logprob, row[entry.token_id].item(), abs_tol=1e-4)
            assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert len(out.prompt_logprobs) == len(prompt) - 1
        for i, entry in enumerate(out.prompt_logprobs):
            assert entry.token_id == prompt[i + 1]
            assert math.isclose(entry.logprob, ref[i, prompt[i + 1]].item(), abs_tol=1e-4)
            assert len(entry.top) == 2


def test_prompt_logprobs_survive_chunking_and_preemption(tiny_llama):
    """A 3-block pool preempts; a 16-token budget splits the 50-token prompt: each prompt token
    is still scored exactly once."""
    from fastgen import LLM

    small = LLM(model=str(tiny_llama[0]), token_budget=16, num_blocks=6, block_size=16,
                dtype="float32")   # transformers' dtype, whatever auto is on this CPU
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=0,
                            logprobs=0)
    outs = small.generate(PROMPTS, params)
    assert small.engine.totals.preemptions > 0
    ref = transformers_logprobs(tiny_llama[1], PROMPTS[1])
    got = [e.logprob for e in outs[1].prompt_logprobs]
    want = [ref[i, PROMPTS[1][i + 1]].item() for i in range(len(PROMPTS[1]) - 1)]
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert [len(o.logprobs) for o in outs] == [20, 20]


# --- logit_bias -------------------------------------------------------------------------------


def test_logit_bias_adds_to_its_rows_greedy_ones_included_in_one_call():
    logits = torch.randn(3, 8)
    seqs = [seq_with([1], [], logit_bias={"3": -100, 5: 2.5}, temperature=0),
            seq_with([1], []),
            seq_with([1], [], logit_bias={"0": 1}, temperature=0.7)]
    out = apply_logits_processors(logits.clone(), seqs)
    expected = logits.clone()
    expected[0, 3] -= 100
    expected[0, 5] += 2.5
    expected[2, 0] += 1
    assert torch.equal(out, expected)


def test_logit_bias_comes_before_the_penalties():
    """vLLM's order: the bias changes the logit that the repetition penalty then divides."""
    seq = seq_with([0], [], logit_bias={0: 1.0}, repetition_penalty=2.0)
    assert apply_logits_processors(torch.ones(1, 2), [seq]).tolist() == [[1.0, 1.0]]


def test_logit_bias_keys_may_be_decimal_strings():
    assert SamplingParams(logit_bias={"50256": -100, 7: 3}).logit_bias == {50256: -100.0, 7: 3.0}


@pytest.mark.parametrize("bias, pattern", [
    ({"abc": 1}, "keys must be token ids"), ({"-1": 1}, "keys must be token ids"),
    ({-1: 1}, "keys must be token ids"), ({"1.5": 1}, "keys must be token ids"),
    ({True: 1}, "keys must be token ids"), ({"5": 100.5}, r"values must be numbers in \[-100, 100\]"),
    ({"5": -101}, r"in \[-100, 100\]"), ({"5": float("nan")}, r"in \[-100, 100\]"),
    ({"5": "x"}, "values must be numbers"), ({"5": True}, "values must be numbers"),
    ([5], "must be an object mapping token ids to biases")])
def test_bad_logit_bias_is_a_request_error_naming_it(bias, pattern):
    with pytest.raises(RequestError, match=pattern) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"


@pytest.mark.parametrize("ids", [[-1], [3, True], [1.5], ["7"]], ids=repr)
def test_bad_stop_token_ids_are_a_request_error_naming_them(ids):
    with pytest.raises(RequestError, match=r"must be token ids \(integers of 0 or more\)") as info:
        SamplingParams(stop_token_ids=ids)
    assert info.value.param == "stop_token_ids"


@pytest.mark.parametrize("name, given", [("logit_bias", lambda ids: {t: 1 for t in ids}),
                                         ("stop_token_ids", list)])
def test_token_ids_outside_the_vocabulary_are_refused_before_queueing(llm, name, given):
    vocab = llm.engine.hf_config.vocab_size
    with pytest.raises(RequestError, match=rf"^{name} has token ids outside this model's vocabulary "
                                           rf"\[0, {vocab}\): \[{vocab}, {vocab + 7}\]\.$") as info:
        llm.generate([[5, 6]], SamplingParams(**{name: given([vocab + 7, 3, vocab])}))
    assert info.value.param == name and not llm.engine.has_unfinished()


def test_logit_bias_forces_and_bans_tokens_greedily_as_transformers_does(llm, tiny_llama):
    prompt = PROMPTS[0]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    forced = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                   logit_bias={"7": 100}))[0]
    assert forced.token_ids == [7] * 10
    # Ban the greedy answer's first token and nudge two others: a different answer, the one
    # transformers' SequenceBiasLogitsProcessor gives.
    bias = {greedy.token_ids[0]: -100.0, 12: 1.5, 40: -0.75}
    banned = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                   logit_bias=bias))[0]
    assert greedy.token_ids[0] not in banned.token_ids
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = tiny_llama[1].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     sequence_bias=[[[t], b] for t, b in bias.items()],
                                     min_new_tokens=10, max_new_tokens=10)
    assert banned.token_ids == ref[0, len(prompt):].tolist()


def test_logit_bias_bans_a_token_when_sampling_too(llm):
    common = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    outs = llm.generate([PROMPTS[0]] * 4, [SamplingParams(max_tokens=12, temperature=1.5, seed=s,
                                                          ignore_eos=True, logit_bias={common: -100})
                                           for s in range(4)])
    assert all(common not in out.token_ids for out in outs)


# --- cumulative logprob -----------------------------------------------------------------------


def test_cumulative_logprob_is_the_sum_of_the_sampled_tokens_logprobs(llm):
    common = dict(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    with_logprobs = llm.generate([PROMPTS[0]], SamplingParams(logprobs=0, **common))[0]
    alone = llm.generate([PROMPTS[0]], SamplingParams(cumulative_logprob=True, **common))[0]
    plain = llm.generate([PROMPTS[0]], SamplingParams(**common))[0]
    assert alone.token_ids == with_logprobs.token_ids == plain.token_ids
    total = sum(e.logprob for e in with_logprobs.logprobs)
    assert math.isclose(with_logprobs.cumulative_logprob, total, abs_tol=1e-4)
    assert math.isclose(alone.cumulative_logprob, total, abs_tol=1e-4)
    assert alone.logprobs is None and plain.cumulative_logprob is None
