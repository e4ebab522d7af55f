"""transports.stdin: JSON lines in, JSON lines out, requests served concurrently through one engine.

Most tests drive StdinTransport in-process through a real pipe (the path `fastgen serve` takes
when a program pipes requests in); one runs `python -m fastgen.cli serve` end to end.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import threading
import time

import pytest

from fastgen import SamplingParams
from fastgen.async_engine import AsyncEngine
from fastgen.engine import Engine
from fastgen.plugins.transports import stdin as stdin_transport
from fastgen.plugins.transports.stdin import StdinRequest, StdinTransport
from odd_values import ODD_VALUES

GREEDY = dict(temperature=0)




def encode(lines: list[dict | str]) -> bytes:
    """Input lines: dicts as JSON, strings as they are (for malformed lines)."""
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n"
                    for line in lines)


def run_transport(engine: Engine, stdin, stdout, timeout: float = 30.0) -> AsyncEngine:
    """Serve until stdin ends, on a thread so that a hang fails the test instead of the suite."""
    async_engine = AsyncEngine(engine).start()
    transport = StdinTransport(async_engine, engine.config, stdin=stdin, stdout=stdout)
    errors = []

    def target():
        try:
            transport.run()
        except BaseException as e:   # noqa: BLE001 - handed to the test thread
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the transport did not return after the end of stdin"
    assert not errors, errors
    assert not async_engine.alive, "the transport returned without shutting the engine down"
    assert not engine.sequences and engine.allocator.num_free == engine.allocator.num_blocks
    return async_engine


def serve(engine: Engine, lines: list[dict | str]) -> list[dict]:
    """Write `lines` into a pipe read by the transport, then close it; return the answer lines."""
    read_fd, write_fd = os.pipe()
    data = encode(lines)

    def write_all():
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    out = io.BytesIO()
    with os.fdopen(read_fd, "rb") as stdin:
        run_transport(engine, stdin, out)
    writer.join(5)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def by_id(answers: list[dict]) -> dict:
    """Non-streamed answers and errors by id (each id answered once)."""
    result = {}
    for answer in answers:
        assert answer["id"] not in result, f"two answers for id {answer['id']!r}"
        result[answer["id"]] = answer
    return result


def assert_matches(answer: dict, expected) -> None:
    assert "error" not in answer, answer
    assert answer["text"] == expected.text
    assert answer["token_ids"] == expected.token_ids
    assert answer["finish_reason"] == expected.finish_reason
    assert answer["usage"] == expected.usage


REQUESTS = [
    {"id": 1, "prompt": "The quick brown fox", "max_tokens": 16},
    {"id": "two", "prompt": "Paris is the capital of", "max_tokens": 9},
    {"id": 3, "prompt": [5, 17, 42, 99, 3], "max_tokens": 20, "ignore_eos": True},
    {"id": 4, "prompt": "The lazy dog " * 12, "max_tokens": 5},   # longer than the token budget
    {"id": 5, "prompt": "a", "max_tokens": 12, "temperature": 0.9, "top_p": 0.8, "seed": 3},
    {"id": 6, "prompt": "Caf\u00e9 na\u00efve", "max_tokens": 12, "stop_token_ids": [258]},
]


def offline_params(request: dict) -> SamplingParams:
    fields = {k: v for k, v in request.items() if k in SamplingParams.__struct_fields__}
    return SamplingParams(**{**GREEDY, **fields})


def test_concurrent_requests_match_offline(engine, llm):
    requests = [{**GREEDY, **r} for r in REQUESTS]
    chat = [{"role": "user", "content": "Hello there"}]
    requests.append({"id": "chat", "messages": chat, "max_tokens": 10, **GREEDY})
    steps_before = engine.totals.steps
    answers = by_id(serve(engine, requests))

    assert set(answers) == {r["id"] for r in requests}
    expected = llm.generate([r["prompt"] for r in REQUESTS], [offline_params(r) for r in REQUESTS])
    for request, out in zip(REQUESTS, expected):
        assert_matches(answers[request["id"]], out)
    assert_matches(answers["chat"], llm.chat(chat, SamplingParams(max_tokens=10, **GREEDY))[0])
    # Served together, not one after another: far fewer steps than tokens generated.
    generated = sum(len(a["token_ids"]) for a in answers.values())
    assert engine.totals.steps - steps_before < generated / 2


def test_stream_pieces_add_up_to_the_answer(engine, llm):
    prompt = "Ragged batches mix prompt chunks"
    text = llm.generate(prompt, SamplingParams(max_tokens=30, **GREEDY))[0].text
    assert len(text) >= 12, "the tiny model's answer is too short to cut at a stop string"
    stop = text[8:11]
    cases = {"plain": {"prompt": prompt, "max_tokens": 30},
             "stop": {"prompt": prompt, "max_tokens": 30, "stop": stop},
             "ids": {"prompt": [5, 17, 42], "max_tokens": 25, "ignore_eos": True}}
    requests = []
    for name, case in cases.items():
        requests += [{"id": name, **case, **GREEDY}, {"id": f"{name}-s", **case, **GREEDY, "stream": True}]
    answers = serve(engine, requests)

    plain = by_id([a for a in answers if not str(a["id"]).endswith("-s")])
    assert plain["stop"]["text"] == text[:text.find(stop)]
    assert plain["stop"]["finish_reason"] == "stop"
    for name in cases:
        lines = [a for a in answers if a["id"] == f"{name}-s"]
        *pieces, last = lines
        assert all(p["finished"] is False and p["text"] and set(p) == {"id", "text", "token_ids", "finished"}
                   for p in pieces)
        assert last["finished"] is True
        assert "".join(p["text"] for p in lines) == plain[name]["text"]
        assert [t for p in lines for t in p["token_ids"]] == plain[name]["token_ids"]
        assert (last["finish_reason"], last["usage"]) == (plain[name]["finish_reason"], plain[name]["usage"])
    assert len([a for a in answers if a["id"] == "ids-s"]) > 2   # it did stream, in several pieces


def test_bad_lines_get_an_error_and_serving_goes_on(engine):
    bad = [
        ('{"id": "json", "prompt": "x"', None, "not valid JSON"),
        ({"id": "unknown", "promt": "The quick"}, "unknown", "unknown field `promt`"),
        ({"id": "missing", "max_tokens": 4}, "missing", 'exactly one of "prompt"'),
        ({"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "both",
         'exactly one of "prompt"'),
        ({"id": "long", "prompt": [7] * 2000}, "long", "2000 tokens.*at most 1023 prompt tokens"),
        ({"id": "type", "prompt": "x", "max_tokens": "many"}, "type", r"Expected `int`, got `str`.*max_tokens"),
        ({"id": "top_p", "prompt": "x", "top_p": 0}, "top_p", r"top_p must be in \(0, 1\]"),
        ({"id": "vocab", "prompt": [1, 10**6]}, "vocab", "integers in"),
        ({"id": "empty", "prompt": ""}, "empty", "prompt is empty"),
        ({"id": "msg", "messages": [{"role": "user", "text": "x"}]}, "msg", "unknown field `text`"),
        ({"id": True, "prompt": "x"}, None, "at `\\$.id`"),
        ("[1, 2]", None, "Expected `object`"),
    ]
    lines = []
    for i, (line, _, _) in enumerate(bad):
        lines += [line, {"id": f"ok-{i}", "prompt": "Paris", "max_tokens": 3}]
    lines.append("   ")   # blank lines are skipped
    answers = serve(engine, lines)

    errors = [a for a in answers if "error" in a]
    served = by_id([a for a in answers if "error" not in a])
    assert set(served) == {f"ok-{i}" for i in range(len(bad))}
    assert all(a["finish_reason"] and a["usage"]["completion_tokens"] for a in served.values())
    assert len(errors) == len(bad)
    for _, want_id, pattern in bad:
        matching = [e for e in errors if e["id"] == want_id and re.search(pattern, e["error"])]
        assert matching, f"no error for id {want_id!r} matching {pattern!r} in {errors}"
    assert all(set(e) == {"id", "error"} and e["error"].endswith(".") for e in errors)


# A value that only makes numpy warn (a float32 overflow) is one the engine mishandles too.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_no_value_of_a_field_stops_serving_or_fails_in_the_engine(engine):
    """Each odd value in each field of an otherwise good request, all in one stream of lines: each
    line gets one answer or one error that names the problem, and none is the engine's failure."""
    lines, ids = [], []
    for field in (f for f in StdinRequest.__struct_fields__ if f != "id"):
        for i, value in enumerate(ODD_VALUES):
            if field == "max_tokens" and value is None:
                continue   # left out, a request generates to the end of the context
            request = {"id": f"{field}-{i}", "prompt": "Paris", "max_tokens": 2, field: value}
            if field == "messages":
                del request["prompt"]
            lines.append(request)
            ids.append(request["id"])
    answers = serve(engine, lines)

    assert {a["id"] for a in answers} == set(ids)   # streamed ones in several lines
    errors = [a for a in answers if "error" in a]
    assert len({a["id"] for a in errors}) == len(errors)
    assert not {a["id"] for a in errors} & {a["id"] for a in answers if "error" not in a}
    for a in errors:
        assert a["error"].endswith(".") and "engine failed" not in a["error"], a


def test_duplicate_id_in_flight_is_an_error(engine):
    answers = serve(engine, [
        {"id": "dup", "prompt": "The quick", "max_tokens": 200, "ignore_eos": True},
        {"id": "dup", "prompt": "Paris", "max_tokens": 3},
        {"id": "other", "prompt": "Paris", "max_tokens": 3},
    ])
    dup = [a for a in answers if a["id"] == "dup"]
    assert len(dup) == 2 and "already in flight" in dup[0]["error"]
    assert len(dup[1]["token_ids"]) == 200
    assert [a["id"] for a in answers].count("other") == 1


def test_answers_come_while_stdin_is_still_open(engine):
    """A request read later finishes first: lines are read while earlier requests are served."""
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    errors = []

    def serve_then_close():
        with os.fdopen(in_read, "rb") as stdin, os.fdopen(out_write, "wb") as stdout:
            try:
                run_transport(engine, stdin, stdout)
            except BaseException as e:   # noqa: BLE001 - handed to the test thread
                errors.append(e)

    thread = threading.Thread(target=serve_then_close, daemon=True)
    thread.start()
    stdout = os.fdopen(out_read, "rb")

    def next_line(timeout=10.0) -> dict:
        ready, _, _ = select.select([stdout], [], [], timeout)
        assert ready, "no answer line came"
        return json.loads(stdout.readline())

    os.write(in_write, encode([{"id": "long", "prompt": "The quick", "max_tokens": 600,
                                "ignore_eos": True, "stream": True}]))
    assert next_line()["id"] == "long"   # the long request is being served ...
    os.write(in_write, encode([{"id": "short", "prompt": "Paris", "max_tokens": 2}]))
    while (line := next_line())["id"] == "long":   # ... and a request sent after it finishes first
        assert not line["finished"]
    assert line["id"] == "short" and line["finish_reason"] == "length"
    os.close(in_write)   # end of input: the long request still runs to its end
    lines = []
    while not lines or not lines[-1].get("finished"):
        lines.append(next_line())
    assert lines[-1]["usage"]["completion_tokens"] == 600
    thread.join(10)
    assert not thread.is_alive() and not errors, errors
    assert stdout.read() == b""   # nothing after the last answer, and stdout was let go
    stdout.close()


@pytest.mark.parametrize("source", ["memory", "file"])
def test_stdin_that_is_not_a_pipe(engine, tmp_path, source):
    data = encode([{"id": 1, "prompt": "Paris", "max_tokens": 4}, "oops"])
    if source == "memory":
        stdin = io.BytesIO(data)
    else:
        (tmp_path / "requests.jsonl").write_bytes(data)
        stdin = open(tmp_path / "requests.jsonl", "rb")
    out = io.BytesIO()
    with stdin:
        run_transport(engine, stdin, out)
    answers = by_id([json.loads(line) for line in out.getvalue().splitlines()])
    assert len(answers[1]["token_ids"]) == 4
    assert "not valid JSON" in answers[None]["error"]


def test_line_longer_than_the_limit_is_skipped(engine, monkeypatch):
    monkeypatch.setattr(stdin_transport, "LINE_LIMIT", 200)
    answers = serve(engine, [{"id": "big", "prompt": "x" * 300},
                             {"id": "ok", "prompt": "Paris", "max_tokens": 2}])
    assert answers[0]["id"] is None and "longer than 200 bytes" in answers[0]["error"]
    assert answers[1]["id"] == "ok" and len(answers[1]["token_ids"]) == 2


def test_closed_stdout_aborts_requests_and_returns(engine, caplog):
    out_read, out_write = os.pipe()
    os.close(out_read)   # nobody reads the answers: writing fails with a broken pipe
    read_fd, write_fd = os.pipe()
    os.write(write_fd, encode([{"id": "s", "prompt": "Paris", "max_tokens": 900,
                                "ignore_eos": True, "stream": True}]))
    os.close(write_fd)
    start = time.monotonic()
    with os.fdopen(read_fd, "rb") as stdin, os.fdopen(out_write, "wb", buffering=0) as stdout:
        run_transport(engine, stdin, stdout)   # and the engine is left clean: the request was aborted
    assert time.monotonic() - start < 5
    assert "stdout is closed" in caplog.text


def test_protocol_takes_every_sampling_param():
    assert set(SamplingParams.__struct_fields__) <= set(StdinRequest.__struct_fields__)


def test_registered_as_transports_stdin(plugin_manager):
    assert plugin_manager.registry.get("transports", "stdin").cls is StdinTransport


# The engine-process case starts a second interpreter that imports torch: the slow step's.
@pytest.mark.parametrize("engine_process", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["engine-thread", "engine-process"])
def test_fastgen_serve_end_to_end(tiny_llama, llm, engine_process):
    """The answers of `fastgen serve --plugin transports.stdin`, with the engine's steps in the
    serving process and in a process of their own (`--engine-process`)."""
    folder = str(tiny_llama[0])
    requests = [{**r, **GREEDY} for r in REQUESTS[:3]]
    requests += [{"id": "s", "prompt": "The quick brown fox", "max_tokens": 16, "stream": True, **GREEDY},
                 "{not json", {"id": "after", "prompt": "Paris", "max_tokens": 3, **GREEDY}]
    process = subprocess.run(
        [sys.executable, "-m", "fastgen.cli", "serve", "--model", folder, "--plugin", "transports.stdin",
         "--token-budget", "32", "--num-blocks", "64", *(["--engine-process"] if engine_process else [])],
        input=encode(requests), capture_output=True, timeout=120)
    assert process.returncode == 0, process.stderr.decode()
    assert b"Traceback" not in process.stderr, process.stderr.decode()
    answers = [json.loads(line) for line in process.stdout.splitlines()]

    stream = [a for a in answers if a["id"] == "s"]
    answers = by_id([a for a in answers if a["id"] != "s"])
    expected = llm.generate([r["prompt"] for r in REQUESTS[:3]], [offline_params(r) for r in REQUESTS[:3]])
    for request, out in zip(REQUESTS, expected):
        assert_matches(answers[request["id"]], out)
    assert answers[None]["error"].startswith("The line is not valid JSON")
    assert len(answers["after"]["token_ids"]) == 3
    fox = llm.generate("The quick brown fox", SamplingParams(max_tokens=16, **GREEDY))[0]
    assert "".join(p["text"] for p in stream) == fox.text and stream[-1]["finished"] is True


@pytest.mark.slow   # a serving interpreter and its engine's, each importing torch
def test_what_the_engine_process_prints_never_reaches_the_answers(tiny_llama, tmp_path):
    """With `--engine-process`, whatever runs beside the engine in its process (a plugin, a
    library's progress bar) and prints goes to stderr: stdout carries answers only. The script
    makes every engine step print; the child runs the patch too, as it imports the script again."""
    script = tmp_path / "noisy_engine.py"
    script.write_text(
        "import sys\n"
        "from fastgen import cli, engine\n"
        "step = engine.Engine.step\n"
        "def noisy_step(self, *args, **kwargs):\n"
        "    print('a plugin talks on stdout', flush=True)\n"
        "    return step(self, *args, **kwargs)\n"
        "engine.Engine.step = noisy_step\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(cli.main(sys.argv[1:]))\n")
    requests = [{"id": "a", "prompt": "Paris", "max_tokens": 4, **GREEDY},
                {"id": "s", "prompt": "The quick brown fox", "max_tokens": 4, "stream": True, **GREEDY}]
    process = subprocess.run(
        [sys.executable, str(script), "serve", "--model", str(tiny_llama[0]), "--plugin", "transports.stdin",
         "--num-blocks", "64", "--engine-process"], input=encode(requests), capture_output=True, timeout=120)
    assert process.returncode == 0, process.stderr.decode()
    assert b"a plugin talks on stdout" in process.stderr   # the patch ran: the engine printed
    answers = [json.loads(line) for line in process.stdout.splitlines()]
    assert {a["id"] for a in answers} == {"a", "s"} and all("error" not in a for a in answers)


def test_logprobs_and_penalties_on_stdin_match_offline(engine, llm):
    prompt = [5, 9, 9, 14, 5, 30, 7]
    fields = dict(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=1.5, logprobs=1)
    offline = llm.generate([prompt], SamplingParams(**fields))[0]
    answers = serve(engine, [{"id": "a", "prompt": prompt, "prompt_logprobs": 0, **fields},
                             {"id": "s", "prompt": prompt, "stream": True, **fields}])
    by_id = {}
    for line in answers:
        by_id.setdefault(line["id"], []).append(line)
    whole = by_id["a"][0]
    assert whole["token_ids"] == offline.token_ids
    assert [e["token_id"] for e in whole["logprobs"]] == offline.token_ids
    assert [e["logprob"] for e in whole["logprobs"]] == pytest.approx(
        [e.logprob for e in offline.logprobs], abs=1e-5)
    assert all(len(e["top"]) == 1 for e in whole["logprobs"])
    assert [e["token_id"] for e in whole["prompt_logprobs"]] == prompt[1:]
    streamed = [e for line in by_id["s"] for e in line["logprobs"]]
    assert streamed == whole["logprobs"]


def test_logit_bias_and_cumulative_logprob_on_stdin(engine, llm):
    prompt = [5, 9, 14, 30]
    fields = dict(max_tokens=5, temperature=0, ignore_eos=True)
    offline = llm.generate([prompt], SamplingParams(logit_bias={"7": 100}, logprobs=0, **fields))[0]
    answers = by_id(serve(engine, [
        {"id": "forced", "prompt": prompt, "logit_bias": {"7": 100}, "cumulative_logprob": True, **fields},
        {"id": "bad key", "prompt": prompt, "logit_bias": {"seven": 1}},
        {"id": "bad bias", "prompt": prompt, "logit_bias": {"7": -150}},
        {"id": "outside", "prompt": prompt, "logit_bias": {"100000": 1}}]))
    assert answers["forced"]["token_ids"] == offline.token_ids == [7] * 5
    assert answers["forced"]["cumulative_logprob"] == pytest.approx(
        sum(e.logprob for e in offline.logprobs), abs=1e-4)
    assert "logprobs" not in answers["forced"]
    assert answers["bad key"]["error"].startswith("logit_bias keys must be token ids")
    assert answers["bad bias"]["error"].startswith("logit_bias values must be numbers in [-100, 100]")
    assert answers["outside"]["error"].startswith("logit_bias has token ids outside this model's vocabulary")
