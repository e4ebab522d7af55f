"""`fastgen bench serve` beyond in-process schedulers: a server URL, the transformers peers, the plot
and the progress bars, on the tiny Llama."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import matplotlib.image
import numpy as np
import pytest

from fastgen import cli
from fastgen.bench.peers import TransformersGenerateTarget
from fastgen.bench.remote import HttpTarget
from fastgen.bench.runner import ClosedLoop, run_session
from fastgen.bench.workload import BenchRequest, WorkloadShape, WorkloadSpec, make_workload
from test_bench_serve import check_requests, run_bench


@contextlib.contextmanager
def serving(start, stop):
    """Runs `start()` (a server's start coroutine) on a thread's own event loop, yields its result,
    and runs `stop()` there at the end: the benchmark's client loop stays free."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def server_url(engine):
    """fastgen's HTTP transport around the module's engine, on a free loopback port."""
    from fastgen.async_engine import AsyncEngine
    from fastgen.config import make_config
    from fastgen.plugins.transports.http import HttpTransport

    transport = HttpTransport(AsyncEngine(engine).start(), make_config(engine.config, port=0))
    with serving(transport.start, lambda: transport.stop(timeout=0)) as url:
        yield f"{url}/v1"


def fake_openai_server(bodies: list, headers: list):
    """A server that streams text chunks that do not map one to one onto tokens, as a server that
    holds back partial characters does: "a", "" (held), "bc" for 4 tokens, then usage; a prompt
    starting with token 1 gets a 400 instead. Records each request's body and headers."""
    from aiohttp import web

    async def models(request):
        return web.json_response({"data": [{"id": "fake", "max_model_len": 64}]})

    async def completions(request):
        body = await request.json()
        bodies.append(body)
        headers.append(dict(request.headers))
        if body["prompt"][0] == 1:
            return web.json_response({"error": {"message": "prompt refused"}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text, finish in (("a", None), ("", None), ("bc", "length")):
            chunk = {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b'data: {"choices": [], "usage": {"completion_tokens": 4}}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    return start, runner.cleanup


def test_url_mode_counts_tokens_from_usage_not_chunks(tiny_llama):
    bodies, headers = [], []
    with serving(*fake_openai_server(bodies, headers)) as url:
        target = HttpTarget(url, tiny_llama[0], api_key="secret")
        target.open()
        assert (target.served_model, target.max_model_len) == ("fake", 64)
        requests = [BenchRequest(0, [5, 6, 7], 4), BenchRequest(1, [1, 2], 4)]
        trace = asyncio.run(run_session(target, requests, ClosedLoop(1), warmup=0))
    ok, refused = trace.requests
    assert ok.completed and ok.num_generated == 4 and ok.finish_reason == "length"
    # Two chunks with text, then the usage count: the last two tokens arrive with the last output.
    assert ok.token_times[0] <= ok.token_times[1] <= ok.token_times[2] == ok.token_times[3] <= ok.finish
    assert not refused.completed and refused.error == "RuntimeError: HTTP 400: prompt refused"
    assert bodies[0] == {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0,
                         "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    assert headers[0]["Authorization"] == "Bearer secret"


def test_url_mode_sends_the_workload_through_the_server(tiny_llama, server_url, tmp_path, capsys):
    folder, _ = tiny_llama
    results = run_bench(folder, tmp_path, "--url", server_url, "--clients", "3")
    assert results["meta"]["targets"] == [{"name": server_url, "kind": "url"}]
    assert results["meta"]["model"] == folder.name   # the name the server lists
    [run] = results["runs"]
    assert (run["target"], run["kind"], run["scheduler"]) == (server_url, "url", None)
    check_requests(results, run)
    assert run["trace"]["steps"] == [] and run["summary"]["steps"]["count"] == 0
    assert f"| p24g5 | {server_url} | 3 clients |" in capsys.readouterr().out


def test_url_mode_reports_a_server_it_cannot_reach(tiny_llama, tmp_path, capsys):
    code = cli.main(["bench", "serve", "--model", str(tiny_llama[0]), "--url", "http://127.0.0.1:9/v1"])
    assert code == 2
    assert "Cannot reach http://127.0.0.1:9/v1/models" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--url", "http://127.0.0.1:9/v1", "--schedulers", "splitfuse"], "runs its own scheduler"),
    (["--url", "localhost:8000"], "OpenAI base URL"),
    (["--peers", "vllm"], "Unknown peer 'vllm'"),
])
def test_bad_target_flags_are_refused(tiny_llama, flags, message, capsys):
    assert cli.main(["bench", "serve", "--model", str(tiny_llama[0]), *flags]) == 2
    assert message in capsys.readouterr().err


def test_transformers_peers_serve_the_same_workload(tiny_llama, tmp_path, capsys):
    folder, _ = tiny_llama
    results = run_bench(folder, tmp_path, "--schedulers", "splitfuse", "--clients", "2",
                        "--peers", "transformers", "--plot", str(tmp_path / "bench.png"))
    assert [(r["target"], r["kind"]) for r in results["runs"]] == [
        ("splitfuse", "fastgen"), ("transformers generate", "peer"),
        ("transformers continuous", "peer")]
    for run in results["runs"]:
        check_requests(results, run)
    for run in results["runs"][1:]:
        assert run["trace"]["steps"] == [] and run["summary"]["steps"]["mean_tokens"] is None
    captured = capsys.readouterr()
    assert "| p24g5 | transformers continuous | 2 clients |" in captured.out
    assert "transformers generate, 2 clients:" in captured.err   # its progress bar

    image = matplotlib.image.imread(tmp_path / "bench.png")   # [H, W, channels]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 200 and image.shape[1] > 800
    # Drawn lines in the target colours, not a blank canvas.
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 50


def test_no_progress_keeps_stderr_quiet(tiny_llama, tmp_path, capsys):
    run_bench(tiny_llama[0], tmp_path, "--schedulers", "static", "--clients", "2", "--no-progress")
    err = capsys.readouterr().err
    assert "static, 2 clients" not in err and "[bench" not in err


def test_the_generate_peer_batches_statically(tiny_llama):
    """A batch runs until its longest request is done; requests sent meanwhile wait for the next."""
    folder, _ = tiny_llama
    target = TransformersGenerateTarget(folder, "float32", max_batch=2)
    target.open()
    try:
        requests = make_workload(WorkloadSpec(WorkloadShape(16, 6), 8, seed=3),
                                 target.allowed_token_ids(), target.max_model_len)
        assert len({r.max_tokens for r in requests}) > 1
        trace = asyncio.run(run_session(target, requests, ClosedLoop(2), warmup=0))
    finally:
        target.close()
    assert all(r.completed and r.num_generated == r.max_tokens for r in trace.requests)
    batches = [[trace.requests[i] for i in batch] for batch in target.batches]
    assert sorted(i for batch in target.batches for i in batch) == list(range(8))
    assert all(1 <= len(batch) <= 2 for batch in batches) and len(batches) >= 4
    for batch, after in zip(batches, batches[1:]):
        assert min(r.token_times[0] for r in after) > max(r.finish for r in batch)
    # Some request was sent while a batch ran (its client's request ended early) and waited for it.
    assert any(min(r.arrival for r in after) < max(r.finish for r in batch)
               for batch, after in zip(batches, batches[1:]))
