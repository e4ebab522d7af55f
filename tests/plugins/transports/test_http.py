"""transports.http: the OpenAI-compatible API, driven by the real `openai` client and by raw HTTP.

One server runs in-process for the module: an HttpTransport on a free loopback port, in a
background thread with its own event loop, around an AsyncEngine on the tiny Llama. One test runs
`python -m fastgen.cli serve --plugin transports.http` and stops it with signals.
"""

from __future__ import annotations

import asyncio
import codecs
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from fastgen import LLM, SamplingParams
from fastgen.async_engine import AsyncEngine
from fastgen.bench.processes import children, stat_fields
from fastgen.config import make_config
from fastgen.engine import Engine
from fastgen.plugins.transports.http import SERVER_KEY, HttpTransport, OpenAIServer

from odd_values import ODD_VALUES
from waiting import wait_until

GREEDY = dict(temperature=0)




class Server:
    """An HttpTransport serving on a free loopback port from a thread with its own event loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.async_engine = AsyncEngine(engine).start()
        self.transport = HttpTransport(self.async_engine, make_config(engine.config, port=0))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = self.call(self.transport.start())
        self.port = int(self.url.rsplit(":", 1)[1])

    def call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.transport.stop(timeout=0))   # a no-op when the test stopped it already
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine holds no sequence and every KV block is free (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        allocator = self.engine.allocator
        while self.engine.sequences or allocator.num_free != allocator.num_blocks:
            assert time.monotonic() < deadline, (
                f"{len(self.engine.sequences)} sequences left, {allocator.num_free} of "
                f"{allocator.num_blocks} blocks free")
            time.sleep(0.02)


def token_counts(usage: dict) -> dict:
    """A usage's token counts; its cached tokens depend on what the engine ran before (their own
    test: test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache)."""
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


@pytest.fixture(scope="module")
def server(engine):
    server = Server(engine)
    yield server
    server.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)


def request(server: Server | int, method: str, path: str, body: dict | bytes | str | None = None,
            timeout: float = 30, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP request to a Server or a port."""
    port = server if isinstance(server, int) else server.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def events(raw: bytes) -> list:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    assert raw.endswith(b"\n\n"), raw[-100:]
    parts = raw.decode().lstrip("\n").split("\n\n")[:-1]   # lstrip: after a readline()
    assert all(p.startswith("data: ") for p in parts), parts
    return [p[6:] if p == "data: [DONE]" else json.loads(p[6:]) for p in parts]


def greedy_text(llm: LLM, prompt, max_tokens: int, **kw) -> str:
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY, **kw))[0].text


# --- answers ----------------------------------------------------------------------------------

PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], list(range(20, 60))]   # the last longer than the budget


def test_greedy_completions_match_offline(server, client, llm):
    expected = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
    answer = client.completions.create(model=server.engine.model_name, prompt=PROMPTS, max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.model == server.engine.model_name
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.text for c in answer.choices] == [out.text for out in expected]
    assert all(c.finish_reason == "length" for c in answer.choices)
    assert answer.usage.prompt_tokens == sum(len(p) for p in PROMPTS)
    assert answer.usage.completion_tokens == 36
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 36

    one = client.completions.create(model=server.engine.model_name, prompt="The quick brown fox",
                                    max_tokens=16, temperature=0)
    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=16, **GREEDY))[0]
    assert (one.choices[0].text, one.choices[0].finish_reason) == (out.text, out.finish_reason)
    assert token_counts(one.usage.model_dump()) == token_counts(out.usage)
    several = client.completions.create(model=server.engine.model_name, max_tokens=6, temperature=0,
                                        prompt=["Paris is", "The lazy dog"])
    assert [c.text for c in several.choices] == [greedy_text(llm, p, 6) for p in ["Paris is", "The lazy dog"]]
    server.wait_idle()


def test_streamed_completion_adds_up(server, client, llm):
    text = greedy_text(llm, [5, 17, 42], 25, ignore_eos=True)
    stream = client.completions.create(model=server.engine.model_name, prompt=[5, 17, 42], max_tokens=25,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    *pieces, usage = chunks
    assert len(pieces) > 2 and all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in pieces) == text
    assert [c.choices[0].finish_reason for c in pieces] == [None] * (len(pieces) - 1) + ["length"]
    assert usage.choices == [] and usage.usage.completion_tokens == 25 and usage.usage.prompt_tokens == 3
    assert all(c.usage is None for c in pieces)

    # On the wire: text/event-stream, `data: {...}` events, then `data: [DONE]`; no usage unless asked.
    status, headers, raw = request(server, "POST", "/v1/completions", {
        "prompt": [5, 17, 42], "max_tokens": 25, "temperature": 0, "ignore_eos": True, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    data = events(raw)
    assert data[-1] == "[DONE]"
    assert "".join(d["choices"][0]["text"] for d in data[:-1]) == text
    assert all("usage" not in d for d in data[:-1])


def test_chat_matches_offline_streamed_and_not(server, client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = llm.chat(messages, SamplingParams(max_tokens=10, **GREEDY))[0]
    answer = client.chat.completions.create(model=server.engine.model_name, messages=messages,
                                            max_tokens=10, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", expected.text)
    assert choice.finish_reason == expected.finish_reason
    assert token_counts(answer.usage.model_dump()) == token_counts(expected.usage)

    chunks = list(client.chat.completions.create(
        model=server.engine.model_name, messages=messages, max_completion_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    *pieces, usage = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == expected.text
    assert pieces[-1].choices[0].finish_reason == expected.finish_reason
    assert token_counts(usage.usage.model_dump()) == token_counts(expected.usage)

    # Content as a list of text parts renders like the same text as a string.
    parts = client.chat.completions.create(
        model=server.engine.model_name, max_tokens=10, temperature=0,
        messages=[messages[0], {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    assert parts.choices[0].message.content == expected.text


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(server, client):
    prompt = "A long prompt, sent twice, whose whole blocks the second request finds cached: " * 3
    ids = server.engine.tokenize(prompt)
    server.wait_idle()
    server.engine.reset_prefix_cache()   # idle: the engine's loop touches nothing meanwhile
    first, second = (client.completions.create(model=server.engine.model_name, prompt=prompt,
                                               max_tokens=2, temperature=0) for _ in range(2))
    block = server.engine.config.block_size
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (len(ids) - 1) // block * block > 0
    assert second.usage.prompt_tokens == len(ids)


def test_n_choices_and_seeds(server, client):
    def sample(**kw):
        return client.completions.create(model=server.engine.model_name, prompt="The quick",
                                         max_tokens=20, temperature=1.0, extra_body={"ignore_eos": True},
                                         **kw)

    three = sample(n=3, seed=7)
    texts = [c.text for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len(set(texts)) == 3, "the n samples of one request should differ"
    assert [c.text for c in sample(n=3, seed=7).choices] == texts         # same seed, same samples
    assert sample(seed=7).choices[0].text == texts[0]                     # sample i has seed + i
    assert sample(seed=8).choices[0].text == texts[1]
    assert three.usage.prompt_tokens == len(server.engine.tokenize("The quick"))
    assert three.usage.completion_tokens == 60

    # Streamed, the chunks of each choice add up to that choice's text.
    stream = sample(n=3, seed=7, stream=True)
    pieces: dict[int, str] = {}
    finished = set()
    for chunk in stream:
        (choice,) = chunk.choices
        pieces[choice.index] = pieces.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finished.add(choice.index)
    assert [pieces[i] for i in range(3)] == texts and finished == {0, 1, 2}

    chat = client.chat.completions.create(model=server.engine.model_name, n=2, seed=3, max_tokens=8,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert [c.index for c in chat.choices] == [0, 1]
    server.wait_idle()


def test_stop_strings(server, client, llm):
    prompt = "Ragged batches mix prompt chunks"
    text = greedy_text(llm, prompt, 30)
    assert len(text) >= 12, "the tiny model's answer is too short to cut at a stop string"
    stop = text[8:11]
    answer = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=30,
                                       temperature=0, stop=[stop, "never appears"])
    assert answer.choices[0].text == text[:text.find(stop)]
    assert answer.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=30,
                                       temperature=0, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text[:text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_of_completions_and_chat_are_the_offline_apis(server, client, llm):
    prompt = "The quick brown fox"
    offline = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=2,
                                                    ignore_eos=True))[0]
    answer = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=6,
                                       temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = answer.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in offline.logprobs], abs=1e-5)
    assert answer.choices[0].text == offline.text and len(lp.tokens) == 6
    assert [len(t) for t in lp.top_logprobs] == [2] * 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    # Greedy: the chosen token is the most likely one.
    assert all(max(top.values()) == pytest.approx(p) for top, p in zip(lp.top_logprobs, lp.token_logprobs))

    streamed = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=6,
                                         temperature=0, logprobs=2, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [p for c in chunks for p in c.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)

    chat = client.chat.completions.create(model=server.engine.model_name, messages=HI, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    # Each token's exact bytes: together they are the answer, multi-byte characters and all (an
    # unfinished character at the end is not text yet).
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(b"".join(bytes(c.bytes) for c in content), final=False)
    assert text == chat.choices[0].message.content
    plain = client.chat.completions.create(model=server.engine.model_name, messages=HI, max_tokens=5,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_returns_the_prompt_and_its_logprobs(server, client, tiny_llama):
    import torch

    ids = [5, 30, 31, 44, 60]
    answer = client.completions.create(model=server.engine.model_name, prompt=ids, max_tokens=3,
                                       temperature=0, echo=True, logprobs=1,
                                       extra_body={"ignore_eos": True})
    choice = answer.choices[0]
    prompt_text = server.engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert choice.text.startswith(prompt_text) and len(choice.logprobs.tokens) == len(ids) + 3
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    with torch.no_grad():
        ref = tiny_llama[1](torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert choice.logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)

    streamed = list(client.completions.create(model=server.engine.model_name, prompt=ids,
                                              max_tokens=3, temperature=0, echo=True, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert streamed[0].choices[0].text == prompt_text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_penalties_and_min_p_reach_the_sampler(server, client, llm):
    prompt = [5, 9, 9, 14, 5, 30, 7]
    for fields in ({"repetition_penalty": 1.8}, {"presence_penalty": 1.5, "frequency_penalty": 0.5}):
        offline = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                        **fields))[0]
        answer = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=10,
                                           temperature=0, extra_body={"ignore_eos": True, **fields})
        assert answer.choices[0].text == offline.text
    # min_p 1 keeps only the most likely token: sampling at any temperature is greedy.
    greedy = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    hot = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=8,
                                    temperature=5.0, seed=1, extra_body={"ignore_eos": True, "min_p": 1.0})
    assert hot.choices[0].text == greedy.choices[0].text


def test_logit_bias_forces_and_bans_tokens_like_the_offline_api(server, client, llm):
    prompt = [5, 9, 14, 30]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    bias = {str(greedy.token_ids[0]): -100, "12": 2}     # OpenAI clients send string keys
    offline = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                    logit_bias=bias))[0]
    assert offline.token_ids[0] != greedy.token_ids[0]
    answer = client.completions.create(model=server.engine.model_name, prompt=prompt, max_tokens=6,
                                       temperature=0, logit_bias=bias, logprobs=0,
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].text == offline.text
    # logprobs stay the model's own: those of the biased tokens without the bias.
    assert answer.choices[0].logprobs.token_logprobs == pytest.approx(
        [e.logprob for e in llm.generate([prompt], SamplingParams(
            max_tokens=6, temperature=0, ignore_eos=True, logit_bias=bias, logprobs=0))[0].logprobs],
        abs=1e-5)
    forced_id = server.engine.tokenize("fox")[-1]
    chat = client.chat.completions.create(model=server.engine.model_name, messages=HI, max_tokens=4,
                                          temperature=0.8, seed=2, logit_bias={str(forced_id): 100},
                                          logprobs=True)
    assert chat.choices[0].message.content == server.engine.tokenizer.decode([forced_id] * 4)
    server.wait_idle()


def cumulative_logprobs(llm, prompt, seeds: list[int], **fields) -> list[tuple[str, float]]:
    """(text, cumulative logprob) of the offline samples with these seeds, summed from logprobs."""
    outs = llm.generate([prompt] * len(seeds), [SamplingParams(seed=s, logprobs=0, **fields)
                                                for s in seeds])
    return [(out.text, sum(e.logprob for e in out.logprobs)) for out in outs]


def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob(server, client, llm):
    prompt, fields = "The quick", dict(max_tokens=8, temperature=1.0, ignore_eos=True)
    # A seed whose best candidate is not the first sample, so picking sample 0 would fail.
    for seed in range(20):
        candidates = cumulative_logprobs(llm, prompt, [seed, seed + 1, seed + 2], **fields)
        best = max(range(3), key=lambda i: candidates[i][1])
        if best != 0:
            break
    else:
        pytest.fail("every seed's best candidate was its first sample")
    answer = client.completions.create(model=server.engine.model_name, prompt=prompt, best_of=3, n=1,
                                       seed=seed, max_tokens=8, temperature=1.0, logprobs=0,
                                       extra_body={"ignore_eos": True})
    (choice,) = answer.choices
    assert choice.index == 0 and choice.text == candidates[best][0]
    assert sum(choice.logprobs.token_logprobs) == pytest.approx(candidates[best][1], abs=1e-4)
    assert answer.usage.completion_tokens == 3 * 8    # every candidate's tokens count

    two = client.completions.create(model=server.engine.model_name, prompt=[prompt, "Paris"],
                                    best_of=3, n=2, seed=seed, max_tokens=8, temperature=1.0,
                                    extra_body={"ignore_eos": True})
    ranked = sorted(candidates, key=lambda c: -c[1])
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices[:2]] == [ranked[0][0], ranked[1][0]]
    paris = sorted(cumulative_logprobs(llm, "Paris", [seed, seed + 1, seed + 2], **fields),
                   key=lambda c: -c[1])
    assert [c.text for c in two.choices[2:]] == [paris[0][0], paris[1][0]]
    assert two.usage.completion_tokens == 2 * 3 * 8
    server.wait_idle()


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    status, _, raw = request(server, "POST", "/v1/completions", {
        "model": server.engine.model_name, "prompt": "Paris", "max_tokens": 2, "presence_penalty": 0,
        "frequency_penalty": 0.0, "logprobs": None, "echo": False, "best_of": 1, "logit_bias": {},
        "user": "someone", "stop": None, "seed": None, "temperature": None})
    assert status == 200, raw
    status, _, raw = request(server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": False,
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "n": 1})
    assert status == 200, raw


def test_health_and_models(server, client):
    assert request(server, "GET", "/health")[0] == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [server.engine.model_name]
    assert models.data[0].object == "model"
    assert client.models.retrieve(server.engine.model_name).id == server.engine.model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# --- errors -----------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]

ERRORS = [
    # (path, body, status, param, message pattern)
    (COMPLETIONS, '{"prompt": "x"', 400, None, "not valid JSON"),
    (COMPLETIONS, "", 400, None, "not valid JSON"),
    (COMPLETIONS, "[1, 2]", 400, None, "must be a JSON object"),
    (COMPLETIONS, {"promt": "x"}, 400, "promt", "Unrecognized request field `promt`"),
    (COMPLETIONS, {"max_tokens": 3}, 400, "prompt", "missing required field `prompt`"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs must be between 0 and 20"),
    (COMPLETIONS, {"prompt": "x", "logprobs": True}, 400, "logprobs", "Expected `int | null`, got `bool`"),
    (COMPLETIONS, {"prompt": "x", "echo": "yes"}, 400, "echo", "Expected `bool`"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", r"in \[-2, 2\]"),
    (COMPLETIONS, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty", r"in \[-2, 2\]"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", r"in \(0, 10\]"),
    (COMPLETIONS, {"prompt": "x", "min_p": 1.1}, 400, "min_p", r"min_p must be in \[0, 1\]"),
    (CHAT, {"messages": HI, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs set to true"),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs",
     "top_logprobs must be between 0 and 20"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 10}}, 400, "logit_bias",
     "logit_bias keys must be token ids"),
    (CHAT, {"messages": HI, "logit_bias": {"5": 101}}, 400, "logit_bias",
     r"logit_bias values must be numbers in \[-100, 100\], got 101"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": "up"}}, 400, "logit_bias",
     "logit_bias values must be numbers"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"100000": 1}}, 400, "logit_bias",
     "outside this model's vocabulary"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": [5]}, 400, "logit_bias", "Expected `object | null`"),
    (CHAT, {"messages": HI, "stop_token_ids": [3, 100000]}, 400, "stop_token_ids",
     r"stop_token_ids has token ids outside this model's vocabulary \[0, \d+\): \[100000\]"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids",
     r"stop_token_ids must be token ids \(integers of 0 or more\), got \[-1\]"),
    (COMPLETIONS, {"prompt": "x", "best_of": 2, "n": 3}, 400, "best_of",
     "best_of must be at least n, got best_of=2 and n=3"),
    (COMPLETIONS, {"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of", "cannot be streamed"),
    (COMPLETIONS, {"prompt": ["x", "y"], "best_of": 65}, 400, "best_of",
     r"130 completions \(best_of=65 for each of 2 prompts\)"),
    (CHAT, {"messages": HI, "best_of": 2}, 400, "best_of", "`best_of` is not supported"),
    (CHAT, {"messages": HI, "tools": [{"type": "function"}]}, 400, "tools", "`tools` is not supported"),
    (CHAT, {"messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format",
     "not supported"),
    (CHAT, {"messages": HI, "echo": False}, 400, "echo", "Unrecognized request field `echo`"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens",
     "Expected `int | null`, got `str`"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be at least 1"),
    (CHAT, {"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "max_completion_tokens must be at least 1"),
    (COMPLETIONS, {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature must be 0 or more"),
    (CHAT, {"messages": HI, "temperature": 1e300}, 400, "temperature",
     r"temperature must be at most 3.403e\+38 \(the sampler's float32\), got 1e\+300"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p", r"top_p must be in \(0, 1\]"),
    (COMPLETIONS, {"prompt": "x", "seed": -1}, 400, "seed", "seed must be in"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n", "n must be at least 1"),
    (COMPLETIONS, {"prompt": ["x", "y"], "n": 65}, 400, "n", "130 completions.*at most 128"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop", "stop strings must not be empty"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when stream is true"),
    (COMPLETIONS, {"prompt": "x", "stream": True, "stream_options": {"bad": 1}}, 400, "stream_options.bad",
     "unknown field `bad`"),
    (COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model", "`gpt-4` does not exist"),
    (CHAT, {"messages": HI, "model": "gpt-4"}, 404, "model", "`gpt-4` does not exist"),
    (COMPLETIONS, {"prompt": [7] * 1000, "max_tokens": 100}, 400, "prompt",
     "maximum context length is 1024 tokens, but 1100 were requested [(]1000 in the prompt, 100 for"),
    (COMPLETIONS, {"prompt": [7] * 1030}, 400, "prompt", "1046 were requested"),
    (CHAT, {"messages": [{"role": "user", "content": "x " * 1100}]}, 400, "messages",
     "maximum context length"),
    (COMPLETIONS, {"prompt": [1, 10**6]}, 400, "prompt", "integers in"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "empty list"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "prompt is empty"),
    (COMPLETIONS, {"prompt": ["x", 1]}, 400, "prompt", "mixes strings, token ids and lists"),
    (COMPLETIONS, {"prompt": [True]}, 400, "prompt[0]", "got `bool`"),
    (CHAT, {"messages": [{"role": "user", "text": "x"}]}, 400, "messages[0].text", "unknown field `text`"),
    (CHAT, {"messages": []}, 400, "messages", "messages is empty"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", "content of type image_url"),
    (CHAT, {"prompt": "x"}, 400, "prompt", "Unrecognized request field `prompt`"),
]


@pytest.mark.parametrize("path, body, status, param, pattern", ERRORS,
                         ids=[f"{i}-{e[3]}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors(server, path, body, status, param, pattern):
    got, headers, raw = request(server, "POST", path, body)
    assert got == status, raw
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert re.search(pattern, error["message"]), error["message"]
    assert error["message"].endswith("."), error["message"]


FIELDS = [(COMPLETIONS, field) for field in (
    "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stop_token_ids",
    "ignore_eos", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logit_bias", "stream", "stream_options", "logprobs", "echo", "best_of", "user", "model",
    "suffix")] + [(CHAT, field) for field in (
    "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "stop",
    "logprobs", "top_logprobs", "stream", "stream_options", "logit_bias", "tools", "tool_choice",
    "response_format", "model", "user")]


# A value that only makes numpy warn (a float32 overflow) is one the engine mishandles too.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("path, field", FIELDS, ids=[f"{'chat' if p == CHAT else 'completions'}-{f}" for p, f in FIELDS])
def test_no_value_of_a_field_gets_a_server_error(server, path, field):
    """Each odd value in the field of an otherwise good request: an answer, or a 4xx that says
    what is wrong; never a 5xx (a top_k of 2**63 reached an int64 tensor and failed once)."""
    for value in ODD_VALUES:
        if field.startswith("max_") and value is None:
            continue   # left out, chat generates to the end of the context
        body = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": HI}
        body["max_tokens"] = 2   # unless `field` is max_tokens
        body[field] = value
        status, headers, raw = request(server, "POST", path, body)
        assert status in (200, 400, 404), (value, raw[:500])
        if status != 200:
            error = json.loads(raw)["error"]
            assert error["type"] == "invalid_request_error" and error["message"], (value, error)
        elif headers["Content-Type"].startswith("text/event-stream"):
            assert events(raw)[-1] == "[DONE]" and all("error" not in e for e in events(raw)[:-1])
        else:
            assert json.loads(raw)["choices"], value


def test_openai_client_sees_the_error(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.engine.model_name, prompt="x", presence_penalty=3.0)
    assert info.value.status_code == 400
    assert "presence_penalty" in info.value.message and info.value.param == "presence_penalty"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=HI)
    assert info.value.code == "model_not_found"


def test_unknown_paths_and_methods(server):
    status, _, raw = request(server, "GET", "/v1/nothing")
    assert status == 404 and "There is no /v1/nothing" in json.loads(raw)["error"]["message"]
    status, _, raw = request(server, "GET", COMPLETIONS)
    assert status == 405 and "GET is not allowed" in json.loads(raw)["error"]["message"]


# --- API keys ---------------------------------------------------------------------------------


def test_api_key_is_required_when_set(server, monkeypatch):
    monkeypatch.setattr(server.transport.app[SERVER_KEY], "api_key", "sk-right")
    right = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-right", max_retries=0, timeout=30)
    answer = right.completions.create(model=server.engine.model_name, prompt="Paris", max_tokens=2)
    assert answer.usage.completion_tokens == 2
    assert [m.id for m in right.models.list().data] == [server.engine.model_name]

    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model=server.engine.model_name, prompt="Paris", max_tokens=2)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=server.engine.model_name, messages=HI, stream=True)

    for path, method, headers in [
            (COMPLETIONS, "POST", {}),                                    # no key
            (COMPLETIONS, "POST", {"Authorization": "sk-right"}),         # not Bearer
            (COMPLETIONS, "POST", {"Authorization": "Basic sk-right"}),
            (COMPLETIONS, "POST", {"Authorization": "Bearer sk-righ"}),
            (COMPLETIONS, "POST", {"Authorization": "Bearer \u00e9"}),    # not ASCII
            ("/v1/models", "GET", {}), ("/metrics", "GET", {}),
            ("/v1/nothing", "GET", {})]:                                  # no 404 before the key
        status, got_headers, raw = request(server, method, path, {"prompt": "Paris", "max_tokens": 1},
                                           headers=headers)
        assert status == 401, (path, headers, raw)
        error = json.loads(raw)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        assert "sk-right" not in error["message"] and got_headers["WWW-Authenticate"] == "Bearer"
    assert request(server, "GET", "/health")[0] == 200
    assert request(server, "GET", "/metrics", headers={"Authorization": "bearer sk-right"})[0] == 200
    server.wait_idle()


def test_without_an_api_key_any_key_or_none_is_accepted(server, client):
    assert server.transport.app[SERVER_KEY].api_key is None
    assert client.models.list().data   # the client sends "Bearer x"
    for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": "nonsense"}):
        assert request(server, "GET", "/v1/models", headers=headers)[0] == 200
        assert request(server, "GET", "/metrics", headers=headers)[0] == 200


def test_api_key_comes_from_config_else_environment(engine, monkeypatch):
    def api_key(**settings) -> str | None:
        return OpenAIServer(AsyncEngine(engine), make_config(engine.config, **settings)).api_key

    monkeypatch.delenv("FASTGEN_API_KEY", raising=False)
    assert api_key() is None and api_key(api_key="sk-config") == "sk-config"
    monkeypatch.setenv("FASTGEN_API_KEY", "sk-env")
    assert api_key() == "sk-env" and api_key(api_key="sk-config") == "sk-config"
    monkeypatch.setenv("FASTGEN_API_KEY", "")
    assert api_key() is None


def test_body_over_the_limit_is_413(server, monkeypatch):
    monkeypatch.setattr(server.transport.config, "max_body_bytes", 1000)
    status, _, raw = request(server, "POST", COMPLETIONS, {"prompt": "x" * 2000})
    assert status == 413 and "larger than 1000 bytes" in json.loads(raw)["error"]["message"]
    assert request(server, "POST", COMPLETIONS, {"prompt": "Paris", "max_tokens": 1})[0] == 200


def test_model_without_chat_template_is_400(server, monkeypatch):
    monkeypatch.setattr(server.engine.tokenizer, "chat_template", None)
    status, _, raw = request(server, "POST", CHAT, {"messages": HI})
    error = json.loads(raw)["error"]
    assert status == 400 and "no chat template" in error["message"] and error["param"] == "messages"


def test_unexpected_exception_is_500_and_logged(server, monkeypatch, caplog):
    def broken(prompt):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "tokenize", broken)
    status, _, raw = request(server, "POST", COMPLETIONS, {"prompt": "x"})
    error = json.loads(raw)["error"]
    assert status == 500 and error["type"] == "server_error" and "server log" in error["message"]
    assert "POST /v1/completions failed" in caplog.text and "boom" in caplog.text


@pytest.mark.parametrize("stream", [False, True])
def test_failed_engine_step_is_500(server, monkeypatch, stream):
    def broken_step():
        raise RuntimeError("kaput")

    monkeypatch.setattr(server.engine, "step", broken_step)
    status, _, raw = request(server, "POST", COMPLETIONS, {"prompt": "x", "stream": stream})
    error = json.loads(raw)["error"]
    assert status == 500 and error["type"] == "server_error"
    assert error["message"] == "The engine failed while serving this request (kaput); retry it, and report the error if it repeats."
    monkeypatch.undo()
    server.wait_idle()
    assert request(server, "POST", COMPLETIONS, {"prompt": "Paris", "max_tokens": 2})[0] == 200


def test_not_accepting_is_503(server, engine):
    server.async_engine.accepting = False
    try:
        assert request(server, "GET", "/health")[0] == 503
        for stream in (False, True):
            status, _, raw = request(server, "POST", COMPLETIONS, {"prompt": "x", "stream": stream})
            assert status == 503 and "not accepting requests" in json.loads(raw)["error"]["message"]
    finally:
        server.async_engine.accepting = True
    not_started = OpenAIServer(AsyncEngine(engine), engine.config)
    from aiohttp.test_utils import make_mocked_request
    assert asyncio.run(not_started.health(make_mocked_request("GET", "/health"))).status == 503


# --- clients that leave -----------------------------------------------------------------------


@pytest.fixture
def slow_steps(engine, monkeypatch) -> list:
    """Steps of 10 ms (a 900-token request then takes seconds, not a fraction of one); returns
    the list of the requests aborted, as (request id, tokens generated)."""
    step, abort_request, aborted = engine.step, engine.abort_request, []

    def slow_step():
        time.sleep(0.01)
        return step()

    def recording_abort(request_id):
        output = abort_request(request_id)
        if output is not None:
            aborted.append((request_id, len(output.token_ids)))
        return output

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(engine, "abort_request", recording_abort)
    return aborted


def open_stream(port: int, path: str = COMPLETIONS, headers: dict[str, str] | None = None,
                **fields) -> http.client.HTTPResponse:
    """A streamed request whose first event has been read: it is generating."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"prompt": [5, 17, 42], "ignore_eos": True, "temperature": 0, "stream": True, **fields}
    conn.request("POST", path, body=json.dumps(body), headers=headers or {})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return response


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_disconnects_aborts_and_frees_its_blocks(server, slow_steps, stream):
    allocator = server.engine.allocator
    if stream:
        conn = open_stream(server.port, max_tokens=900)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", COMPLETIONS, body=json.dumps({
            "prompt": [5, 17, 42], "max_tokens": 900, "ignore_eos": True}))
        wait_until(lambda: allocator.num_free < allocator.num_blocks)   # it is generating ...
    conn.close()   # ... and the client goes away
    server.wait_idle(timeout=5)
    ((request_id, generated),) = slow_steps
    assert generated < 900
    assert request(server, "POST", COMPLETIONS, {"prompt": "Paris", "max_tokens": 2})[0] == 200


def test_stop_lets_requests_finish_then_aborts_the_rest(engine, slow_steps):
    """HttpTransport.stop(timeout): what finishes within `timeout` is answered in full, what does
    not gets an error event; the engine is left with every block free. abort_all() (a second
    signal) ends every request at once."""
    own = Server(engine)   # its own AsyncEngine: stopping it leaves the module's server running
    try:
        aborted = open_stream(own.port, max_tokens=900)
        own.transport.abort_all()
        data = events(aborted.read())
        assert data[-1] == "[DONE]"
        assert "shut down before this request finished" in data[-2]["error"]["message"]
        short, long = open_stream(own.port, max_tokens=30), open_stream(own.port, max_tokens=900)
        started = time.monotonic()
        own.call(own.transport.stop(timeout=1.5))
        assert time.monotonic() - started < 5
        data = events(short.read())
        assert data[-1] == "[DONE]" and data[-2]["choices"][0]["finish_reason"] == "length"
        data = events(long.read())
        assert data[-1] == "[DONE]" and "shut down" in data[-2]["error"]["message"]
        assert not own.async_engine.alive
        own.wait_idle(timeout=1)
        assert [n < 900 for _, n in slow_steps] == [True, True]
        with pytest.raises(ConnectionRefusedError):
            request(own, "GET", "/health")
    finally:
        own.close()


# --- the transport as `fastgen serve` runs it --------------------------------------------------


def test_registered_as_transports_http(plugin_manager):
    assert plugin_manager.registry.get("transports", "http").cls is HttpTransport


def running(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"   # a zombie has exited


# The engine-process case starts a second interpreter that imports torch: the slow step's.
@pytest.mark.parametrize("engine_process", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["engine-thread", "engine-process"])
def test_fastgen_serve_shuts_down_gracefully_on_a_signal(tiny_llama, engine_process):
    """SIGTERM, or with the engine in a process of its own Ctrl-C's SIGINT to the whole process
    group (the engine's process too): stop listening, let the requests in flight finish, shut the
    engine down, exit 0, no process left. The server takes its API key from FASTGEN_API_KEY and
    says that it requires one."""
    key = "sk-from-the-environment"
    process = subprocess.Popen(
        [sys.executable, "-m", "fastgen.cli", "serve", "--model", str(tiny_llama[0]),
         "--plugin", "transports.http", "--port", "0", "--token-budget", "32", "--num-blocks", "64",
         *(["--engine-process"] if engine_process else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "FASTGEN_API_KEY": key})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    try:
        stderr = []
        while not (match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", "".join(stderr))):
            stderr.append(lines.get(timeout=60))
        port = int(match.group(1))
        assert "API key required" in "".join(stderr)
        assert ("in an engine process" in "".join(stderr)) == engine_process
        engine_children = children(process.pid) if engine_process else set()
        assert bool(engine_children) == engine_process   # the engine's (and multiprocessing's tracker)
        assert request(port, "GET", "/v1/models")[0] == 401
        stream = open_stream(port, max_tokens=1000, stream_options={"include_usage": True},
                             headers={"Authorization": f"Bearer {key}"})
        if engine_process:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        wait_until(lambda: "shutting down" in "".join(stderr + list(lines.queue)))
        with pytest.raises(ConnectionRefusedError):   # no new connections ...
            request(port, "GET", "/health")
        data = events(stream.read())                  # ... but the request in flight is answered
        assert data[-1] == "[DONE]" and data[-2]["usage"]["completion_tokens"] == 1000
        assert data[-3]["choices"][0]["finish_reason"] == "length"
        assert process.wait(30) == 0
        wait_until(lambda: not any(running(pid) for pid in engine_children))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(10)
    stderr = "".join(stderr) + "".join(lines.get() for _ in range(lines.qsize()))
    assert "shutting down" in stderr and "Traceback" not in stderr, stderr
    assert key not in stderr
