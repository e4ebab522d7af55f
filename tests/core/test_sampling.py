"""Sampling: the kernel backends' sample op, and how generation ends (stop strings, stop ids, lengths).

The op tests run on every registered kernel backend that can run on the CPU here (the torch
reference backend at least); the end-of-generation tests run end to end on the tiny Llama.
"""

from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen import SamplingParams
from fastgen.kernels import SamplingMetadata
from fastgen.plugin_manager import load_plugins
from fastgen.request import Sequence

CPU = torch.device("cpu")
BACKENDS = sorted(name for name, info in load_plugins().registry.items["kernels"].items()
                  if not info.cls.unavailable_reason(CPU))


@pytest.fixture(params=BACKENDS, ids=[f"kernels.{n}" for n in BACKENDS])
def backend(request):
    return load_plugins().registry.get("kernels", request.param).cls(CPU)


def meta_for(params: list[SamplingParams]) -> SamplingMetadata:
    """Sampling metadata as the engine builds it, seeded generators included."""
    seqs = []
    for p in params:
        seq = Sequence("r", [0], p)
        if p.seed is not None:
            seq.generator = torch.Generator(device=CPU).manual_seed(p.seed)
        seqs.append(seq)
    return SamplingMetadata.build(seqs, CPU)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def sample(backend, logits, params, seed: int = 1234):
    generator = torch.Generator(device=CPU).manual_seed(seed)
    return backend.sample(logits, meta_for(params), generator).tolist()


def test_greedy_is_argmax(backend):
    logits = random_logits(16, 50)
    assert sample(backend, logits, [SamplingParams(temperature=0)] * 16) == logits.argmax(-1).tolist()


def test_greedy_rows_stay_greedy_in_a_mixed_batch(backend):
    logits = random_logits(16, 50, scale=0.1)    # flat: sampled rows rarely hit the argmax
    params = [SamplingParams(temperature=0 if i % 2 else 1.0) for i in range(16)]
    tokens = sample(backend, logits, params)
    argmax = logits.argmax(-1).tolist()
    assert [t for i, t in enumerate(tokens) if i % 2] == argmax[1::2]
    assert [t for i, t in enumerate(tokens) if not i % 2] != argmax[0::2]   # and others sample


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_is_greedy_at_any_temperature(backend, temperature):
    logits = random_logits(32, 50, scale=0.5)
    tokens = sample(backend, logits, [SamplingParams(temperature=temperature, top_k=1)] * 32)
    assert tokens == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token(backend):
    logits = random_logits(32, 50, scale=0.5)
    tokens = sample(backend, logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 32)
    assert tokens == logits.argmax(-1).tolist()


def draws(backend, logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 7):
    """n draws from one distribution, as one batch of n identical rows."""
    counts = torch.bincount(torch.tensor(sample(backend, logits_row.expand(n, -1).clone(),
                                                [params] * n, seed=seed)),
                            minlength=logits_row.numel())
    return counts.double()


def test_top_k_and_top_p_sample_only_from_the_kept_tokens(backend):
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()
    # top_k=2 keeps tokens 1 and 3
    counts = draws(backend, logits, SamplingParams(temperature=1.0, top_k=2), 4000)
    assert set(counts.nonzero().flatten().tolist()) == {1, 3}
    # top_p=0.65: 0.4, then 0.3 (mass before it 0.4 < 0.65), then 0.15 (0.7, not < 0.65)
    counts = draws(backend, logits, SamplingParams(temperature=1.0, top_p=0.65), 4000)
    assert set(counts.nonzero().flatten().tolist()) == {1, 3}
    ratio = counts[1] / counts[3]
    assert 4 / 3 * 0.85 < ratio < 4 / 3 * 1.15      # renormalised in proportion


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax(backend, temperature):
    logits = random_logits(1, 8, seed=3, scale=1.0)[0]
    n = 20000
    counts = draws(backend, logits, SamplingParams(temperature=temperature), n)
    expected = torch.softmax(logits.double() / temperature, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 40) is about 1e-6; a wrong temperature gives thousands.
    assert chi2 < 40, (chi2, counts.tolist(), expected.tolist())


def test_same_seed_same_tokens_other_seed_other_tokens(backend):
    logits = random_logits(64, 100, scale=0.5)
    same = [sample(backend, logits, [SamplingParams(temperature=1.0, seed=11)] * 64, seed=s)
            for s in (1, 2)]
    assert same[0] == same[1], "a request seed must fix the tokens whatever the engine's generator"
    other = sample(backend, logits, [SamplingParams(temperature=1.0, seed=12)] * 64)
    assert other != same[0]
    # without a request seed, the engine's generator decides
    unseeded = [sample(backend, logits, [SamplingParams(temperature=1.0)] * 64, seed=s)
                for s in (1, 1, 2)]
    assert unseeded[0] == unseeded[1] != unseeded[2]


def test_seeded_row_does_not_depend_on_its_batch(backend):
    logits = random_logits(8, 100, scale=0.5)
    params = SamplingParams(temperature=1.0, seed=5)
    alone = [sample(backend, logits[i:i + 1], [params])[0] for i in range(8)]
    others = [SamplingParams(temperature=0.7), SamplingParams(temperature=0),
              SamplingParams(temperature=1.5, top_k=3)]
    batch = torch.cat([logits, random_logits(3, 100, seed=9)])
    together = sample(backend, batch, [params] * 8 + others)
    assert together[:8] == alone


# --- how generation ends, end to end on the tiny Llama -----------------------------------------

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
