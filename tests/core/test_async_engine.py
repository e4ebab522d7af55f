"""AsyncEngine: concurrent generate() from asyncio, consumers that leave, shutdown, bad requests.

Each test runs in its own event loop (asyncio.run) with its own AsyncEngine around one shared
Engine, and leaves that Engine with no sequences and every KV block free.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fastgen import RequestError, SamplingParams
from fastgen.async_engine import AsyncEngine, EngineDeadError
from fastgen.engine import Engine

from waiting import wait_until_async

LONG = SamplingParams(max_tokens=900, ignore_eos=True, temperature=0)   # runs for seconds




def run(engine: Engine, body, timeout: float = 30.0):
    """`await body(async_engine)` in a fresh event loop; check the engine is left clean."""
    async def main():
        async_engine = AsyncEngine(engine).start()
        try:
            return await asyncio.wait_for(body(async_engine), timeout)
        finally:
            await async_engine.shutdown(timeout=0)
    result = asyncio.run(main())
    assert not engine.sequences and not engine.has_unfinished()
    assert engine.allocator.num_free == engine.allocator.num_blocks
    return result


async def collect(async_engine: AsyncEngine, prompt, params: SamplingParams, request_id=None):
    """All outputs of one request, checking that the pieces add up to the final output."""
    outputs = [out async for out in async_engine.generate(prompt, params, request_id=request_id)]
    final = outputs[-1]
    assert final.finished and not any(out.finished for out in outputs[:-1])
    assert "".join(out.new_text for out in outputs) == final.text
    assert [t for out in outputs for t in out.new_token_ids] == final.token_ids
    for before, after in zip(outputs, outputs[1:]):
        assert after.token_ids[:len(before.token_ids)] == before.token_ids
    return final


def blocks_all_free(engine: Engine):
    return lambda: (engine.allocator.num_free == engine.allocator.num_blocks
                    and not engine.sequences)


PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of",
    "Ragged batches mix prompt chunks and decode tokens in one forward pass.",
    [5, 17, 42, 99, 3],
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "a",
    "The lazy dog " * 12,           # a prompt longer than the token budget: split across steps
    [200, 201, 202],
]


def test_concurrent_generate_matches_offline(engine, llm):
    prompts = PROMPTS * 2
    params = [SamplingParams(max_tokens=4 + (i * 5) % 21, temperature=0) for i in range(len(prompts))]
    params[3] = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    params[9] = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=11)
    expected = llm.generate(prompts, params)

    async def body(async_engine):
        return await asyncio.gather(*(collect(async_engine, p, sp) for p, sp in zip(prompts, params)))

    steps_before = engine.totals.steps
    got = run(engine, body)
    assert [out.token_ids for out in got] == [out.token_ids for out in expected]
    # Served together: far fewer steps than tokens generated (one at a time needs one per token).
    generated = sum(len(out.token_ids) for out in got)
    assert engine.totals.steps - steps_before < generated / 3
    assert [out.text for out in got] == [out.text for out in expected]
    assert [out.finish_reason for out in got] == [out.finish_reason for out in expected]
    assert [out.usage for out in got] == [out.usage for out in expected]


def test_delta_outputs_carry_what_is_new_and_the_last_carries_the_whole(engine, llm):
    params = [SamplingParams(max_tokens=10 + i, temperature=0, logprobs=1 if i % 2 else None)
              for i in range(len(PROMPTS))]
    expected = llm.generate(PROMPTS, params)

    async def outputs_of(async_engine, prompt, sp):
        return [out async for out in async_engine.generate(prompt, sp, delta_outputs=True)]

    async def body(async_engine):
        return await asyncio.gather(*(outputs_of(async_engine, p, sp) for p, sp in zip(PROMPTS, params)))

    for outputs, whole, sp in zip(run(engine, body), expected, params):
        *running, final = outputs
        assert running and all(o.token_ids == [] and o.text == "" and o.logprobs is None
                               for o in running)
        assert final.finished and final.token_ids == whole.token_ids and final.text == whole.text
        assert [t for o in outputs for t in o.new_token_ids] == whole.token_ids
        assert "".join(o.new_text for o in outputs) == whole.text
        if sp.logprobs is not None:
            assert [e for o in outputs for e in o.new_logprobs] == final.logprobs == whole.logprobs
        else:
            assert all(o.new_logprobs is None for o in outputs) and final.logprobs is None


@pytest.mark.parametrize("delta", [True, False])
def test_a_reader_that_falls_behind_gets_the_steps_it_missed_merged(engine, llm, delta):
    """Its event loop blocked while the engine steps on, the reader's next output carries every
    token, the text and the logprobs of the steps it missed, and the pieces still add up."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=1)
    whole = llm.generate(["The quick brown fox"], params)[0]

    async def body(async_engine):
        outputs = []
        async for out in async_engine.generate("The quick brown fox", params, delta_outputs=delta):
            outputs.append(out)
            if len(outputs) == 2:
                await wait_until_async(lambda: engine.totals.steps >= steps_at_start + 12)
                time.sleep(0.2)   # the loop blocked: what the engine delivers now waits for it
        return outputs

    steps_at_start = engine.totals.steps
    outputs = run(engine, body)
    final = outputs[-1]
    assert max(len(o.new_token_ids) for o in outputs) > 1   # merged
    assert len(outputs) < len(whole.token_ids)
    assert final.finished and final.token_ids == whole.token_ids and final.text == whole.text
    assert [t for o in outputs for t in o.new_token_ids] == whole.token_ids
    assert "".join(o.new_text for o in outputs) == whole.text
    assert [e for o in outputs for e in o.new_logprobs] == whole.logprobs
    assert not any(o.finished for o in outputs[:-1])


def test_an_error_after_pending_outputs_comes_after_them():
    from fastgen.async_engine import _PendingOutputs
    from fastgen.request import RequestOutput

    def output(tokens, text):
        return RequestOutput(request_id="r", prompt_token_ids=[1], token_ids=[], text="",
                             new_token_ids=tokens, new_text=text)

    async def main():
        pending = _PendingOutputs()
        pending.put(output([4], "a"))
        pending.put(output([5, 6], "bc"))
        pending.put(RuntimeError("engine failed"))
        pending.put(output([7], "d"))
        return [await pending.get() for _ in range(3)]

    merged, error, after = asyncio.run(main())
    assert merged.new_token_ids == [4, 5, 6] and merged.new_text == "abc"
    assert isinstance(error, RuntimeError) and after.new_token_ids == [7]


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_consumer_leaving_aborts_and_frees_blocks(engine, how):
    async def body(async_engine):
        seen = []
        other = asyncio.create_task(collect(async_engine, "Paris is the", SamplingParams(max_tokens=40)))

        async def consume():
            async for out in async_engine.generate("The quick brown fox", LONG):
                seen.append(out)
                if how == "break" and len(seen) == 3:
                    break

        task = asyncio.create_task(consume())
        await wait_until_async(lambda: len(seen) >= 3)
        if how == "cancel":
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await other   # a request beside the one that left is served to the end
        await wait_until_async(blocks_all_free(engine))
        assert async_engine.num_in_flight == 0
        return seen

    seen = run(engine, body)
    assert len(seen) < LONG.max_tokens and not seen[-1].finished


def test_shutdown_aborts_requests_in_flight(engine):
    async def body(async_engine):
        started = asyncio.Event()

        async def consume(prompt):
            async for out in async_engine.generate(prompt, LONG):
                started.set()
            return out

        tasks = [asyncio.create_task(consume(p)) for p in PROMPTS[:4]]
        await started.wait()
        start = time.monotonic()
        await async_engine.shutdown(timeout=0.1)
        assert time.monotonic() - start < 5
        finals = await asyncio.gather(*tasks)
        assert not async_engine.alive and not async_engine._thread.is_alive()
        return finals

    finals = run(engine, body)
    assert [out.finish_reason for out in finals] == ["abort"] * 4
    assert all(out.finished and len(out.token_ids) < LONG.max_tokens for out in finals)


def test_request_error_raises_in_caller_and_engine_keeps_serving(engine, llm):
    async def body(async_engine):
        busy = asyncio.create_task(collect(async_engine, "The quick brown fox", SamplingParams(
            max_tokens=24, temperature=0)))
        with pytest.raises(RequestError, match=r"2000 tokens.*at most 1023 prompt tokens"):
            async for _ in async_engine.generate([7] * 2000, SamplingParams()):
                pass
        with pytest.raises(RequestError, match="integers in"):
            async for _ in async_engine.generate([1, 10**6], SamplingParams()):
                pass
        with pytest.raises(RequestError, match="already in use"):
            first = async_engine.generate("Paris", LONG, request_id="same")
            await first.__anext__()
            try:
                async for _ in async_engine.generate("Paris", LONG, request_id="same"):
                    pass
            finally:
                await first.aclose()
        after = await collect(async_engine, "a", SamplingParams(max_tokens=8, temperature=0))
        return await busy, after

    busy, after = run(engine, body)
    expected = llm.generate(["The quick brown fox", "a"], [
        SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=8, temperature=0)])
    assert [busy.token_ids, after.token_ids] == [out.token_ids for out in expected]


def test_generate_after_shutdown_raises_engine_dead(engine):
    async def body(async_engine):
        await async_engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in async_engine.generate("Paris", SamplingParams()):
                pass
        never_started = AsyncEngine(engine)
        with pytest.raises(EngineDeadError):
            async for _ in never_started.generate("Paris", SamplingParams()):
                pass

    run(engine, body)


def test_consumer_loop_closed_does_not_kill_engine(engine):
    async_engine = AsyncEngine(engine).start()

    async def leave():
        async for _ in async_engine.generate("The quick brown fox", LONG):
            break

    try:
        asyncio.run(leave())   # that loop closes while its request is still running
        time.sleep(0.3)

        async def again():
            return await asyncio.wait_for(collect(async_engine, "a", SamplingParams(max_tokens=4)), 5)

        assert asyncio.run(again()).finished
    finally:
        if async_engine._thread.is_alive():
            asyncio.run(async_engine.shutdown(timeout=0))
        for request_id in list(engine.sequences):   # the thread died: clean up for later tests
            engine.abort_request(request_id)


def test_the_thread_that_runs_steps_makes_a_numbered_gpu_its_current_device(monkeypatch):
    """Triton launches, CUDA graphs and new streams go to the current device: an engine on
    cuda:1 sets it (in its own thread too); plain cuda and a CPU leave it alone."""
    import types

    import torch

    from fastgen.engine import Engine

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("cuda:1", "cuda", "cpu"):
        Engine.use_device_here(types.SimpleNamespace(device=torch.device(name)))
    assert chosen == [torch.device("cuda:1")]
