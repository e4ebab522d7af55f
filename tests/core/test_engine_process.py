"""EngineProcess: the engine's steps in a child process, read and fed as an AsyncEngine.

One EngineProcess on the tiny Llama serves the module (a child takes seconds to start: it
imports torch and builds its engine); the tests that kill or fail a child make their own.
The reference for every answer is the offline LLM on the same checkpoint and settings.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import threading

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import fastgen
from fastgen import LLM, FastgenError, RequestError, SamplingParams
from fastgen.async_engine import EngineDeadError
from fastgen.config import make_config
from fastgen.engine_process import EngineProcess
from fastgen.plugins.transports.http import HttpTransport

from tiny_models import SERVE_SETTINGS
from waiting import wait_until_async

LONG = SamplingParams(max_tokens=900, ignore_eos=True, temperature=0)   # runs for seconds


def start(model, **settings) -> EngineProcess:
    return EngineProcess(make_config(model=str(model), **{**SERVE_SETTINGS, **settings})).start()


@pytest.fixture(scope="module")
def engine_process(tiny_llama):
    process = start(tiny_llama[0])
    yield process
    asyncio.run(process.shutdown(timeout=0))
    assert process._process.exitcode == 0


def run(body, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(body, timeout))


async def final(engine_process: EngineProcess, prompt, params: SamplingParams, delta: bool = True):
    """The last output of one request, checking that its outputs add up to it."""
    outputs = [out async for out in engine_process.generate(prompt, params, delta_outputs=delta)]
    last = outputs[-1]
    assert last.finished and not any(out.finished for out in outputs[:-1])
    assert [t for out in outputs for t in out.new_token_ids] == last.token_ids
    assert "".join(out.new_text for out in outputs) == last.text
    assert all(out.prompt_token_ids == last.prompt_token_ids for out in outputs)
    if not delta:
        assert all(last.token_ids[:len(out.token_ids)] == out.token_ids for out in outputs)
    return last


def all_free(engine_process: EngineProcess):
    running, waiting, used, _ = engine_process.engine.occupancy()
    return running == waiting == used == 0 and engine_process.num_in_flight == 0


# --- answers --------------------------------------------------------------------------------

REQUESTS = [
    ([5, 17, 42, 99, 3], SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)),
    (list(range(20, 60)), SamplingParams(max_tokens=9, ignore_eos=True, temperature=0)),  # > budget
    ("The quick brown fox", SamplingParams(max_tokens=16, temperature=0)),
    ([7, 8, 9], SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)),
    ([1, 2, 3, 4], SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)),
]


def test_concurrent_requests_match_the_offline_engine(engine_process, llm):
    async def body():   # delta outputs (what the transports ask for) and whole ones
        return await asyncio.gather(*(final(engine_process, p, sp, delta=i % 2 == 0)
                                      for i, (p, sp) in enumerate(REQUESTS)))

    served = run(body())
    expected = [llm.generate(p, sp)[0] for p, sp in REQUESTS]
    assert [o.token_ids for o in served] == [o.token_ids for o in expected]
    assert [o.text for o in served] == [o.text for o in expected]
    assert [o.finish_reason for o in served] == [o.finish_reason for o in expected]
    # Batched with others, its logits differ from the offline run's in the last bits.
    got, want = served[-1].logprobs, expected[-1].logprobs
    assert [(lp.token_id, [t for t, _ in lp.top]) for lp in got] == [(lp.token_id, [t for t, _ in lp.top]) for lp in want]
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in want], abs=1e-4)
    assert all(o.metrics.first_token_time >= o.metrics.arrival_time for o in served)
    run(wait_until_async(lambda: all_free(engine_process)))


def test_a_bad_request_is_refused_before_it_reaches_the_engine(engine_process, llm):
    async def body():
        with pytest.raises(RequestError, match=r"integers in \[0, 412\)"):
            await final(engine_process, [1, 100000], SamplingParams(max_tokens=2))
        with pytest.raises(RequestError, match="max_model_len 1024"):
            await final(engine_process, [3] * 1024, SamplingParams(max_tokens=2))
        with pytest.raises(RequestError, match="empty"):
            await final(engine_process, [], SamplingParams(max_tokens=2))
        return await final(engine_process, [5, 6], SamplingParams(max_tokens=4, temperature=0))

    assert run(body()).token_ids == llm.generate([5, 6], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    assert engine_process.alive


def test_a_request_left_early_is_aborted_and_its_blocks_freed(engine_process):
    async def body():
        stream = engine_process.generate([9, 9, 9], LONG)
        outputs = [await anext(stream), await anext(stream)]
        await stream.aclose()
        await wait_until_async(lambda: all_free(engine_process))
        return outputs

    outputs = run(body())
    assert all(not o.finished for o in outputs)


def test_observers_in_the_serving_process_see_the_childs_steps(engine_process):
    class Observer:
        def __init__(self):
            self.steps, self.finished = [], []

        @fastgen.hookimpl
        def on_step_finished(self, engine, stats):
            self.steps.append((engine, stats))

        @fastgen.hookimpl
        def on_request_finished(self, engine, output):
            self.finished.append((engine, output))

    observer = Observer()
    front = engine_process.engine
    front.plugins.register(observer, name="observer")
    try:
        prompt = [201, 202, 203, 204, 205]   # no other test's prompt: nothing found cached
        last = run(final(engine_process, prompt, SamplingParams(max_tokens=6, ignore_eos=True)))
    finally:
        front.plugins.unregister("observer")
    assert {id(engine) for engine, _ in observer.steps + observer.finished} == {id(front)}
    assert [output.token_ids for _, output in observer.finished] == [last.token_ids]
    # Every token the request computed, in the steps the child reported: the prompt, then one
    # a step for the generated tokens but the last.
    assert sum(stats.num_tokens for _, stats in observer.steps) == len(prompt) + 6 - 1
    assert all(stats.forward_s > 0 for _, stats in observer.steps)


def test_http_serves_through_the_engine_process(engine_process, llm):
    """transports.http around an EngineProcess: answers, streams and /metrics."""
    config = make_config(engine_process.engine.config, port=0)
    transport = HttpTransport(engine_process, config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    def post(path, body):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    port = int(call(transport.start()).rsplit(":", 1)[1])
    try:
        body = {"prompt": [5, 17, 42], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        expected = llm.generate([5, 17, 42], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
        status, raw = post("/v1/completions", body)
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == expected.text
        status, raw = post("/v1/completions", {**body, "stream": True})
        pieces = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
        assert status == 200 and "".join(p["choices"][0]["text"] for p in pieces) == expected.text
        status, raw = post("/v1/completions", {**body, "prompt": [1, 9999]})
        assert status == 400 and "integers in [0, 412)" in json.loads(raw)["error"]["message"]

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        metrics = {s.name: s.value for family in text_string_to_metric_families(conn.getresponse().read().decode())
                   for s in family.samples if not s.labels or s.labels.get("finish_reason") == "length"}
        conn.close()
        assert metrics["fastgen_requests_finished_total"] == 2
        assert metrics["fastgen_generation_tokens_total"] == 20
        assert (metrics["fastgen_kv_blocks_used"], metrics["fastgen_kv_blocks_free"]) == (0, 64)
    finally:
        call(transport.stop(timeout=0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- failures -------------------------------------------------------------------------------

def test_a_child_that_dies_fails_its_requests_and_refuses_new_ones(tiny_llama):
    process = start(tiny_llama[0])

    async def body():
        stream = process.generate([4, 5, 6], LONG)
        await anext(stream)
        process._process.kill()
        with pytest.raises(EngineDeadError, match="engine process stopped"):
            async for _ in stream:
                pass
        await wait_until_async(lambda: not process.alive)
        with pytest.raises(EngineDeadError, match="not accepting"):
            await final(process, [1, 2], SamplingParams(max_tokens=2))

    try:
        run(body())
    finally:
        asyncio.run(process.shutdown(timeout=0))


def test_an_engine_that_cannot_start_raises_its_error(tmp_path):
    with pytest.raises(FastgenError, match="Unknown device 'tpu'"):
        EngineProcess(make_config(model=str(tmp_path), device="tpu"))


@pytest.mark.slow   # a script's interpreter and its child's, each importing torch: 12 s
def test_a_script_without_a_main_guard_is_told_why_its_engine_did_not_start(tiny_llama, tmp_path):
    """The child is spawned: it imports the script's module again, which would start a child of
    its own. multiprocessing refuses; the script's error says what to change."""
    script = tmp_path / "unguarded.py"
    script.write_text("from fastgen.config import make_config\n"
                      "from fastgen.engine_process import EngineProcess\n"
                      f"EngineProcess(make_config(model={str(tiny_llama[0])!r}, num_blocks=64))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "FastgenError: The engine process exited while starting" in done.stderr
    assert "if __name__ == '__main__':" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_an_engine_process_answers_as_the_offline_engine(tiny_llama):
    """The child initialises CUDA itself (spawned, never forked), with the GPU defaults: CUDA
    graphs and overlapped steps where the backend allows them."""
    settings = dict(num_blocks=64, device="cuda", dtype="float32")
    greedy = [(p, sp) for p, sp in REQUESTS if sp.temperature == 0]   # batched or alone alike
    offline = LLM(model=str(tiny_llama[0]), **settings)
    expected = [offline.generate(p, sp)[0] for p, sp in greedy]
    del offline
    process = EngineProcess(make_config(model=str(tiny_llama[0]), **settings)).start()
    try:
        async def body():
            return await asyncio.gather(*(final(process, p, sp) for p, sp in greedy))
        served = run(body())
    finally:
        asyncio.run(process.shutdown(timeout=0))
    assert [o.token_ids for o in served] == [o.token_ids for o in expected]
    assert [o.text for o in served] == [o.text for o in expected]
