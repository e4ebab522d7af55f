"""Prefix caching: a request whose tokens begin as an earlier one's did starts from that one's
cached blocks; what it generates is what it would generate computing everything, and transformers
agrees with it."""

from __future__ import annotations

import pytest
import torch

from fastgen.config import make_config
from fastgen.engine import Engine
from fastgen.request import SamplingParams

BS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tiny_llama):
    return str(tiny_llama[0])


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_engine(folder: str, caching: bool = True, **settings) -> Engine:
    # max_num_seqs named: a GPU's default (256) would capture four times the decode graphs.
    settings = {"token_budget": 64, "max_num_seqs": 64, "device": "cpu", "dtype": "float32",
                "kv_cache_gb": 1.0, **settings}
    return Engine(make_config(model=folder, prefix_caching=caching, **settings))


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY):
    """Each request's finished output, the requests added together."""
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.allocator.num_free == engine.allocator.num_blocks
    return [done[i] for i in ids]


def computed_and_cached(engine: Engine, prompts, params=GREEDY):
    """(outputs' token ids, tokens computed, tokens taken from the cache) of one batch."""
    tokens, cached = engine.totals.tokens, engine.totals.cached_tokens
    outs = run(engine, prompts, params)
    return [o.token_ids for o in outs], engine.totals.tokens - tokens, engine.totals.cached_tokens - cached


def test_a_request_beginning_as_an_earlier_one_computes_only_what_is_new(folder):
    shared = random_ids(70, 0)
    first, second = shared + random_ids(5, 1), shared[:64] + random_ids(9, 2)
    engine, plain = make_engine(folder), make_engine(folder, caching=False)
    computed_and_cached(engine, [first])
    tokens, computed, cached = computed_and_cached(engine, [second])
    assert cached == 64                                  # the 4 whole blocks of the shared part
    assert computed == len(second) - 64 + GREEDY.max_tokens - 1
    assert tokens == [o.token_ids for o in run(plain, [second])]


def test_each_answer_says_how_many_of_its_prompt_tokens_were_cached(folder):
    shared = random_ids(70, 40)
    engine = make_engine(folder)
    (first,) = run(engine, [shared + random_ids(5, 41)])
    (second,) = run(engine, [shared[:64] + random_ids(9, 42)])
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 64)
    assert second.usage["prompt_tokens_details"] == {"cached_tokens": 64}
    assert second.usage["prompt_tokens"] == 73


def test_blocks_a_preempted_request_finds_again_are_not_counted_as_cached_prompt(folder):
    prompts = [random_ids(n, 50 + n) for n in (1, 5, 17, 40, 70, 9, 33, 130)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine = make_engine(folder, num_blocks=10)
    outs = run(engine, prompts, params)
    assert engine.totals.preemptions > 0 and engine.totals.cached_tokens > 0
    assert [o.num_cached_tokens for o in outs] == [0] * len(prompts)


@pytest.mark.parametrize("scheduler", ["splitfuse", "continuous"])
def test_a_step_fills_its_budget_with_the_tokens_after_cached_prefixes(folder, scheduler):
    """Seven prompts of 512 tokens whose first 448 are cached need 64 computed each: one step of
    a 512-token budget admits them all, where planning their whole prompts admitted one."""
    shared = random_ids(448, 60)
    engine = make_engine(folder, token_budget=512, scheduler=scheduler, max_model_len=1024)
    run(engine, [shared + random_ids(64, 61)])
    prompts = [shared + random_ids(64, 70 + i) for i in range(7)]
    for p in prompts:
        engine.add_request(p, GREEDY)
    tokens = engine.totals.tokens
    engine.step()
    assert len(engine.running) == 7 and not engine.waiting
    assert engine.totals.tokens - tokens == 7 * 64
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    assert list(outs.values()) == [o.token_ids for o in run(make_engine(folder, caching=False), prompts)]


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
@pytest.mark.parametrize("scheduler", ["splitfuse", "continuous", "prefill_first", "static"])
def test_requests_added_together_compute_a_shared_prompt_once(folder, scheduler, overlap):
    """Four completions of one 150-token prompt (an n = 4 request) and two requests sharing its
    first 100 tokens, added together: the first computes the shared blocks and the others wait
    for them, then compute only what is their own (before, all six computed everything)."""
    prompt = random_ids(150, 90)
    prompts = [prompt] * 4 + [prompt[:100] + random_ids(20, 91 + i) for i in range(2)]
    engine = make_engine(folder, scheduler=scheduler, overlap_steps=overlap)
    tokens, computed, cached = computed_and_cached(engine, prompts)
    # The copies find the prompt's 9 whole blocks before its last token, the others the 6 blocks
    # of the shared 100 tokens.
    assert cached == 3 * 144 + 2 * 96
    if not overlap:   # overlapped, a sequence computes one token more than it keeps
        assert computed == 150 + 3 * 6 + 2 * (120 - 96) + 6 * (GREEDY.max_tokens - 1)
    assert tokens == [o.token_ids for o in run(make_engine(folder, caching=False), prompts)]


def test_a_prompt_seen_before_still_computes_its_last_token(folder):
    prompt = random_ids(48, 3)                           # exactly 3 blocks
    engine = make_engine(folder)
    before, _, _ = computed_and_cached(engine, [prompt])
    again, computed, cached = computed_and_cached(engine, [prompt])
    assert again == before and cached == 32 and computed == 16 + GREEDY.max_tokens - 1


def test_a_next_turn_reuses_the_last_turns_answer_too(folder):
    prompt = random_ids(30, 4)
    engine = make_engine(folder)
    (answer,), _, _ = computed_and_cached(engine, [prompt], SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True))
    next_turn = prompt + answer + random_ids(6, 5)       # 76 tokens: the answer fills blocks 2-4
    tokens, _, cached = computed_and_cached(engine, [next_turn])
    assert cached == 64
    assert tokens == [o.token_ids for o in run(make_engine(folder, caching=False), [next_turn])]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_cached_prefixes_give_transformers_greedy_tokens(tiny_llama, folder, device):
    """On a GPU with the backend `kernels = auto` picks there (its attention reads shared blocks)."""
    model = tiny_llama[1]
    system = random_ids(40, 6)
    prompts = [system + random_ids(n, 7 + n) for n in (3, 20, 37)]
    engine = make_engine(folder, device=device)
    run(engine, [system + random_ids(2, 99)])            # warms the cache with the shared part
    outs = run(engine, prompts)
    assert engine.totals.cached_tokens == 3 * 32
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 min_new_tokens=8, max_new_tokens=8)
        assert out.token_ids == ref[0, len(prompt):].tolist()


def test_prompt_logprobs_requests_compute_their_whole_prompt(folder):
    prompt = random_ids(50, 8)
    engine = make_engine(folder)
    run(engine, [prompt])
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    (out,) = run(engine, [prompt], params)
    (plain,) = run(make_engine(folder, caching=False), [prompt], params)
    assert engine.totals.cached_tokens == 0
    assert [e.logprob for e in out.prompt_logprobs] == pytest.approx(
        [e.logprob for e in plain.prompt_logprobs], abs=1e-5)


def test_cached_blocks_give_way_to_new_work_and_every_answer_stays_right(folder):
    # 12 blocks: the cached prompts are evicted as new ones need room, the oldest first.
    prompts = [random_ids(60, 10 + i) for i in range(6)]
    engine, plain = make_engine(folder, num_blocks=12), make_engine(folder, caching=False, num_blocks=12)
    for p in prompts:
        run(engine, [p])
    assert engine.allocator.num_cached <= 12
    again = [prompts[0], prompts[-1]]
    tokens, _, cached = computed_and_cached(engine, again)
    assert cached == 48                                  # the last prompt's, still cached; not the first's
    assert tokens == [o.token_ids for o in run(plain, again)]


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
def test_preempted_requests_resume_from_their_own_cached_blocks(folder, overlap):
    prompts = [random_ids(n, 20 + n) for n in (1, 5, 17, 40, 70, 9, 33, 130)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine = make_engine(folder, num_blocks=10, overlap_steps=overlap)   # too few for them all
    tokens, _, cached = computed_and_cached(engine, prompts, params)
    assert engine.totals.preemptions > 0 and cached > 0
    assert tokens == [o.token_ids for o in run(make_engine(folder, caching=False), prompts, params)]


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
@pytest.mark.parametrize("num_blocks", [12, 16, 20, 24])
def test_preempting_sequences_that_share_a_cached_prefix_loses_nothing(folder, num_blocks, overlap):
    """Eight requests share a cached 4-block prefix and cross block boundaries together, in a pool
    too small for them all: preempting one frees only its own blocks, not the shared ones, and
    the engine plans with what is free (the scheduler counted the shared blocks as freed: with 24
    blocks the engine asked for a block with none free)."""
    shared = random_ids(64, 80)
    prompts = [shared + random_ids(15, 81 + i) for i in range(8)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = make_engine(folder, num_blocks=num_blocks, overlap_steps=overlap)
    run(engine, prompts[:1], params)
    outs = run(engine, prompts, params)
    assert engine.totals.preemptions > 0
    plain = run(make_engine(folder, caching=False), prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]


def test_a_block_is_reused_only_after_the_same_blocks_before_it(folder):
    x, y, z, w = (random_ids(BS, 30 + i) for i in range(4))
    engine = make_engine(folder)
    run(engine, [x + y + random_ids(3, 40), z + w + random_ids(3, 41)])
    mixed = x + w + random_ids(5, 42)   # w's block was computed after z, not after x
    tokens, _, cached = computed_and_cached(engine, [mixed])
    assert cached == BS
    assert tokens == [o.token_ids for o in run(make_engine(folder, caching=False), [mixed])]


def test_a_reset_cache_computes_a_repeated_prompt_again(folder):
    prompt = random_ids(50, 50)
    engine = make_engine(folder)
    run(engine, [prompt])
    engine.reset_prefix_cache()
    assert engine.allocator.num_cached == 0
    _, computed, cached = computed_and_cached(engine, [prompt])
    assert cached == 0 and computed == 50 + GREEDY.max_tokens - 1
