"""How generation ends (length, stop ids, end of sequence, stop strings) and what a request seed
fixes, end to end on the tiny Llama. The sample op itself is tested per kernel backend in
tests/plugins/kernels/test_sampling_ops.py.
"""

from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen import SamplingParams

PROMPTS = ["The quick brown fox", "Paris is the capital of", "Ragged batches mix"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return fastgen.LLM(model=str(tiny_llama[0]), device="cpu", token_budget=64)


@pytest.fixture(scope="module")
def greedy(llm):
    """Each prompt's 24 greedy tokens and their text, with nothing to stop them early."""
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    return {p: o for p, o in zip(PROMPTS, outs)}


@pytest.mark.parametrize("max_tokens", [1, 5, 24])
def test_max_tokens_ends_with_length(llm, greedy, max_tokens):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.finish_reason == "length"
        assert out.token_ids == greedy[prompt].token_ids[:max_tokens]



def test_each_output_holds_its_prompt_and_the_tokens_so_far(llm, greedy):
    engine = llm.engine
    prompts = {engine.add_request(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)):
               engine.tokenize(p) for p in PROMPTS}
    seen = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.prompt_token_ids == prompts[out.request_id]
            seen[out.request_id].append(list(out.token_ids))
    for rid, prompt in zip(prompts, PROMPTS):
        steps = seen[rid]
        assert steps == [greedy[prompt].token_ids[:n] for n in range(1, 25)]


def test_finished_only_steps_return_the_same_last_outputs_and_nothing_before(llm, greedy):
    """step(finished_only=True), as LLM.generate steps: no output while a request runs, then the
    one every step would have ended with, its new_text the whole text; a stop string still cuts."""
    engine = llm.engine
    stops = {p: pick_stop_string(greedy[p].text) for p in PROMPTS[:2]}
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stops[p]] if p in stops
                             else []) for p in PROMPTS]
    finals = {}
    for finished_only in (False, True):
        ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
        outs = []
        while engine.has_unfinished():
            outs += engine.step(finished_only=finished_only)
        finals[finished_only] = [next(o for o in outs if o.request_id == rid and o.finished) for rid in ids]
        if finished_only:
            assert len(outs) == len(PROMPTS)
    for every_step, last_only in zip(finals[False], finals[True]):
        assert (last_only.token_ids, last_only.text, last_only.finish_reason) == (
            every_step.token_ids, every_step.text, every_step.finish_reason)
        assert last_only.new_text == last_only.text
    assert [o.finish_reason for o in finals[True]] == ["stop", "stop", "length"]
    assert finals[True][0].text == greedy[PROMPTS[0]].text[:greedy[PROMPTS[0]].text.find(stops[PROMPTS[0]])]


def test_stop_token_id_ends_with_stop(llm, greedy):
    for prompt in PROMPTS:
        tokens = greedy[prompt].token_ids
        stop_id = tokens[3]
        first = tokens.index(stop_id)
        out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[stop_id]))[0]
        assert out.finish_reason == "stop"
        assert out.token_ids == tokens[:first + 1]


def test_eos_ends_with_stop_unless_ignored(llm, greedy):
    eos = llm.engine.eos_token_ids
    hit = 0
    for prompt in PROMPTS:
        tokens = greedy[prompt].token_ids
        out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
        ends = [i for i, t in enumerate(tokens) if t in eos]
        if ends:
            hit += 1
            assert out.finish_reason == "stop"
            assert out.token_ids == tokens[:ends[0] + 1]
        else:
            assert out.finish_reason == "length" and out.token_ids == tokens
    assert hit, "no prompt's greedy answer holds an end-of-sequence token; pick other prompts"


def pick_stop_string(text: str) -> str:
    """A 3-character piece of `text` that first occurs after its start, free of U+FFFD."""
    for i in range(3, len(text) - 3):
        piece = text[i:i + 3]
        if "\ufffd" not in piece and not piece.isspace() and text.find(piece) > 0:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_ends_with_stop_and_is_cut(llm, greedy):
    engine = llm.engine
    for prompt in PROMPTS:
        full = greedy[prompt]
        stop = pick_stop_string(full.text)
        request_id = engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0,
                                                               ignore_eos=True, stop=[stop]))
        pieces, final = [], None
        while engine.has_unfinished():
            for out in engine.step():
                pieces.append(out.new_text)
                assert stop not in "".join(pieces), "streamed text showed the stop string"
                final = out
        assert final.request_id == request_id and final.finished
        assert final.finish_reason == "stop"
        assert final.text == full.text[:full.text.find(stop)]
        assert stop not in final.text
        assert "".join(pieces) == final.text
        assert full.token_ids[:len(final.token_ids)] == final.token_ids
        assert len(final.token_ids) < len(full.token_ids)


def test_seeded_requests_repeat_across_batches_and_preemption(tiny_llama):
    """A request seed fixes the tokens: alone, batched with others, or preempted and recomputed."""
    folder = str(tiny_llama[0])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (10, 14, 15, 30, 47, 60)]
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=100 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    roomy = fastgen.LLM(model=folder, device="cpu", token_budget=64)
    alone = [roomy.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    batched = [o.token_ids for o in roomy.generate(prompts, params)]
    tight = fastgen.LLM(model=folder, device="cpu", token_budget=64, num_blocks=10)
    preempted = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.totals.preemptions > 0
    assert batched == alone
    assert preempted == alone
    # and the seeds matter: other seeds, other tokens
    reseeded = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=200 + i,
                               ignore_eos=True) for i in range(len(prompts))]
    assert [o.token_ids for o in roomy.generate(prompts, reseeded)] != alone


@pytest.mark.parametrize("top_k", [None, 2**63, 2**70], ids=["vocab", "2**63", "2**70"])
def test_a_top_k_of_the_whole_vocabulary_or_more_is_no_cut(llm, top_k):
    """A top_k of the vocabulary's size (None here) or any larger integer, even one no int64
    holds, keeps every token and samples what no top_k does; the caller's params keep the top_k
    it gave (reused on a model with a larger vocabulary, it still means what it said)."""
    def sampled(k):
        params = SamplingParams(max_tokens=12, temperature=1.0, top_k=k, seed=7, ignore_eos=True)
        tokens = [o.token_ids for o in llm.generate(PROMPTS, params)]
        assert params.top_k == k
        return tokens

    vocab = llm.engine.hf_config.vocab_size
    assert sampled(vocab if top_k is None else top_k) == sampled(0)
    assert sampled(2) != sampled(0)   # top_k is not simply ignored
