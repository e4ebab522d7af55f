"""`overlap_steps`: each step is launched before the previous step's tokens are read. Whatever the
requests ask for, every request must get the outputs, one by one, that steps taken in turn give
it, and every block must come back."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from fastgen.config import make_config
from fastgen.engine import Engine, overlap_steps_on
from fastgen.request import SamplingParams

PROMPT_LENS = (1, 5, 17, 40, 70, 9, 33, 130)


@pytest.fixture(scope="module")
def folder(tiny_llama):
    return str(tiny_llama[0])


@pytest.fixture(scope="module")
def prompts(tiny_llama):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, tiny_llama[1].config.vocab_size, (n,), generator=g).tolist()
            for n in PROMPT_LENS]


def make_engine(folder: str, overlap: bool, **settings) -> Engine:
    # max_num_seqs named: a GPU's default (256) would capture four times the decode graphs.
    settings = {"token_budget": 64, "max_num_seqs": 64, "device": "cpu", "dtype": "float32",
                "kv_cache_gb": 1.0, **settings}
    return Engine(make_config(model=folder, overlap_steps=overlap, **settings))


def stream(engine: Engine, requests: list[tuple[list[int], SamplingParams]],
           abort_after: dict[int, int] | None = None) -> dict[str, list[tuple]]:
    """Every output of every request, in order, as comparable tuples; `abort_after` {request
    index: step} aborts a request when that many steps have run."""
    ids = [engine.add_request(p, params) for p, params in requests]
    outputs: dict[str, list[tuple]] = {i: [] for i in ids}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(
                (out.token_ids, out.text, out.new_text, out.finished, out.finish_reason,
                 [(e.token_id, round(e.logprob, 4)) for e in out.logprobs or []]))
        steps += 1
        for index, at in (abort_after or {}).items():
            if steps == at:
                aborted = engine.abort_request(ids[index])
                if aborted is not None:
                    outputs[ids[index]].append(("aborted", aborted.token_ids))
    assert engine.allocator.num_free == engine.allocator.num_blocks
    return outputs


@pytest.fixture(scope="module")
def greedy(folder, prompts) -> list[list[int]]:
    """Each prompt's 12 greedy tokens, steps in turn."""
    engine = make_engine(folder, overlap=False)
    outs = stream(engine, [(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
                           for p in prompts])
    return [o[-1][0] for o in outs.values()]


def request_sets(prompts: list[list[int]], greedy: list[list[int]]):
    """name -> requests covering what an overlapped step must get right."""
    n = len(prompts)
    return {
        # Different lengths: some finish while others still compute their prompts in chunks.
        "greedy lengths": [(p, SamplingParams(max_tokens=3 + 2 * i, temperature=0, ignore_eos=True))
                           for i, p in enumerate(prompts)],
        # Stopped by a token only the device knows: the step after it was already launched.
        "stop tokens": [(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                           stop_token_ids=[g[6 + i % 5]]))
                        for i, (p, g) in enumerate(zip(prompts, greedy))],
        "seeded sampling with logprobs": [
            (p, SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=i,
                               logprobs=2, ignore_eos=True)) for i, p in enumerate(prompts)],
        # Penalties read the tokens on the host: such a step waits for the one before.
        "penalties beside plain requests": [
            (p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                               repetition_penalty=1.3 if i % 2 else 1.0))
            for i, p in enumerate(prompts)],
        "eos": [(p, SamplingParams(max_tokens=8 + i % 3, temperature=0)) for i, p in enumerate(prompts[:n])],
    }


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_blocks", [None, 9], ids=["roomy-pool", "tiny-pool"])
@pytest.mark.parametrize("case", ["greedy lengths", "stop tokens", "seeded sampling with logprobs",
                                  "penalties beside plain requests", "eos"])
def test_overlapped_steps_give_every_request_the_outputs_of_steps_in_turn(folder, prompts, greedy,
                                                                         case, num_blocks, device):
    """On a GPU with the backend `kernels = auto` picks there, CUDA graphs on."""
    requests = request_sets(prompts, greedy)[case]
    if num_blocks and device == "cuda":
        num_blocks += 1     # CUDA graphs keep one block as their padding rows' scratch
    in_turn = stream(make_engine(folder, overlap=False, num_blocks=num_blocks, device=device),
                     requests)
    overlapped_engine = make_engine(folder, overlap=True, num_blocks=num_blocks, device=device)
    overlapped = stream(overlapped_engine, requests)
    assert list(overlapped.values()) == list(in_turn.values())
    if num_blocks:   # 9 blocks of 16 tokens: the 130-token prompt makes the others give way
        assert overlapped_engine.totals.preemptions > 0


def test_stop_strings_cut_the_same_text(folder, prompts):
    engine = make_engine(folder, overlap=False)
    texts = [o[-1][1] for o in stream(engine, [(p, SamplingParams(max_tokens=12, temperature=0,
                                                                  ignore_eos=True)) for p in prompts])
             .values()]
    stops = [[t[len(t) // 2:len(t) // 2 + 3]] if len(t) > 6 else [] for t in texts]
    requests = [(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=s))
                for p, s in zip(prompts, stops)]
    in_turn = stream(make_engine(folder, overlap=False), requests)
    overlapped = stream(make_engine(folder, overlap=True), requests)
    assert list(overlapped.values()) == list(in_turn.values())
    assert sum(o[-1][4] == "stop" for o in overlapped.values()) >= 3


def test_a_request_aborted_while_its_token_is_in_flight_returns_its_blocks(folder, prompts):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    requests = [(p, params) for p in prompts]
    # Request 1 (5 prompt tokens) is decoding by step 4; its token of that step is unread.
    in_turn = stream(make_engine(folder, overlap=False), requests, abort_after={1: 4})
    engine = make_engine(folder, overlap=True)
    overlapped = stream(engine, requests, abort_after={1: 4})
    aborted = list(overlapped.values())[1]
    assert aborted[-1][0] == "aborted" and 0 < len(aborted[-1][1]) < 12
    others = [o for i, o in enumerate(overlapped.values()) if i != 1]
    assert [o[-1][0] for o in others] == [o[-1][0] for i, o in enumerate(in_turn.values()) if i != 1]


def test_a_step_is_launched_before_the_last_steps_tokens_are_read(folder, prompts, monkeypatch):
    from fastgen import staging

    events = []
    engine = make_engine(folder, overlap=True)
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: (events.append("forward"),
                                                                  forward(*a, **k))[1])
    tolist = staging.HostCopy.tolist
    monkeypatch.setattr(staging.HostCopy, "tolist", lambda self: (events.append("read"),
                                                                  tolist(self))[1])
    engine.add_request(prompts[1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert engine.step() == []          # the prompt's step is launched; its token is not read yet
    outputs = [engine.step() for _ in range(3)]
    assert [len(step[0].token_ids) for step in outputs] == [1, 2, 3]
    assert engine.has_unfinished()
    last = engine.step()                # nothing left to launch: the last token is read
    assert len(last[0].token_ids) == 4 and last[0].finished and not engine.has_unfinished()
    # Each step's tokens are read after the next step's forward pass was queued.
    assert events == ["forward", "forward", "read", "forward", "read", "forward", "read", "read"]


def test_the_async_engine_streams_overlapped_steps_and_drops_a_request_left_mid_flight(folder,
                                                                                      prompts, greedy):
    from test_async_engine import collect, run

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = greedy

    async def leave_after_three_tokens(async_engine):
        long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        async for out in async_engine.generate(prompts[2], long):
            if len(out.token_ids) >= 3:
                return out.token_ids

    async def body(async_engine):
        return await asyncio.gather(leave_after_three_tokens(async_engine),
                                    *(collect(async_engine, p, params) for p in prompts))

    left, *finals = run(make_engine(folder, overlap=True), body)   # run() checks every block is back
    assert left == expected[2][:3]
    assert [f.token_ids for f in finals] == expected


def test_unset_steps_overlap_on_a_gpu_only_and_a_setting_wins(folder, prompts, caplog):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert make_config().overlap_steps is None
    assert overlap_steps_on(make_config(), cuda) and not overlap_steps_on(make_config(), cpu)
    assert not overlap_steps_on(make_config(overlap_steps=False), cuda)
    assert overlap_steps_on(make_config(overlap_steps=True), cpu)
    # On the CPU by default a step's outputs come from that step, and nothing is warned.
    with caplog.at_level(logging.WARNING, logger="fastgen.engine"):
        engine = Engine(make_config(model=folder, token_budget=64, device="cpu"))
    assert not engine.overlap_steps and "overlap_steps" not in caplog.text
    engine.add_request(prompts[1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert len(engine.step()[0].token_ids) == 1
    with caplog.at_level(logging.WARNING, logger="fastgen.engine"):
        assert Engine(make_config(model=folder, token_budget=64, device="cpu",
                                  overlap_steps=True)).overlap_steps
    assert "overlap_steps on cpu" in caplog.text
