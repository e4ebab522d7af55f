"""GET /metrics of transports.http: Prometheus text, parsed back with prometheus-client's parser.

A server of its own (the helpers come from test_http.py) serves known requests; the counters and
histograms must add up to what the answers' `usage` says, and the gauges must show the KV
blocks and sequences as the engine holds them, also after a client disconnects mid-stream.
"""

from __future__ import annotations

import dataclasses

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastgen import LLM, SamplingParams
from fastgen.engine import StepStats
from fastgen.plugins.transports.http import SERVER_KEY
from fastgen.plugins.transports.metrics import ServerMetrics

from test_http import HI, Server, open_stream, request
from test_http import slow_steps  # noqa: F401 (a fixture)

HISTOGRAMS = ("fastgen_time_to_first_token_seconds", "fastgen_e2e_request_latency_seconds",
              "fastgen_request_queue_time_seconds")



@pytest.fixture(scope="module")
def server(engine):
    server = Server(engine)
    yield server
    server.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)


def parse(text: str) -> dict[str, float]:
    """Each sample's value by name, labels (other than a histogram's `le`) in braces:
    `fastgen_requests_finished_total{finish_reason=length}`."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def scrape(server: Server) -> dict[str, float]:
    status, headers, raw = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version="), raw
    return parse(raw.decode())


def test_metrics_add_up_to_the_requests_served(server, client):
    model = server.engine.model_name
    before, totals_before = scrape(server), dict(server.engine.totals.time)
    usages = [
        client.completions.create(model=model, prompt=[5, 17, 42], max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True}).usage,
        list(client.completions.create(model=model, prompt="The quick brown fox", max_tokens=5,
                                       stream=True, stream_options={"include_usage": True}))[-1].usage,
        client.chat.completions.create(model=model, messages=HI, max_tokens=4).usage,
        # Two prompts: two engine requests (n=1, so the usage counts each prompt once, as they do).
        client.completions.create(model=model, prompt=["Paris is", "The lazy dog"], max_tokens=3).usage,
    ]
    num_requests = 5
    after = scrape(server)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("fastgen_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert grew("fastgen_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    for name in HISTOGRAMS:
        assert grew(f"{name}_count") == num_requests, name
        assert after[f'{name}_bucket{{le=+Inf}}'] == after[f"{name}_count"]
    # One gap between each two consecutive tokens of a request.
    assert grew("fastgen_inter_token_latency_seconds_count") == (
        sum(u.completion_tokens for u in usages) - num_requests)
    assert 0 < grew("fastgen_request_queue_time_seconds_sum") <= grew(
        "fastgen_time_to_first_token_seconds_sum") <= grew("fastgen_e2e_request_latency_seconds_sum")
    assert sum(grew(f"fastgen_requests_finished_total{{finish_reason={r}}}")
               for r in ("stop", "length")) == num_requests
    assert grew("fastgen_requests_finished_total{finish_reason=abort}") == 0
    steps = grew("fastgen_step_token_budget_utilization_count")
    assert steps > 0 and 0 < grew("fastgen_step_token_budget_utilization_sum") <= steps
    # Every step ran eagerly: CUDA graphs need a GPU.
    assert grew("fastgen_steps_total{cuda_graph=eager}") == steps
    assert after["fastgen_steps_total{cuda_graph=replayed}"] == 0
    # The steps' time by part, as the engine's own totals count it.
    totals = server.engine.totals.time
    for part in ("schedule", "forward", "sample", "postprocess"):
        spent = totals[f"{part}_s"] - totals_before[f"{part}_s"]
        assert spent > 0 and grew(f"fastgen_step_seconds_total{{part={part}}}") == pytest.approx(spent)

    assert after["fastgen_kv_blocks_used"] + after["fastgen_kv_blocks_free"] == server.engine.allocator.num_blocks
    assert after["fastgen_kv_blocks_used"] == 0
    assert after["fastgen_num_requests_running"] == after["fastgen_num_requests_waiting"] == 0


@pytest.mark.usefixtures("slow_steps")
def test_client_that_disconnects_gives_every_block_back_in_the_metrics(server):
    before = scrape(server)
    stream = open_stream(server.port, max_tokens=900)
    during = scrape(server)   # its first token was sent: a step has run and been observed
    assert during["fastgen_kv_blocks_used"] > 0 and during["fastgen_num_requests_running"] == 1
    stream.close()            # the client goes away mid-stream
    server.wait_idle(timeout=5)
    after = scrape(server)    # no step runs after the abort: the request-finished hook tells
    assert after["fastgen_kv_blocks_used"] == 0
    assert after["fastgen_kv_blocks_free"] == server.engine.allocator.num_blocks
    assert after["fastgen_num_requests_running"] == after["fastgen_num_requests_waiting"] == 0
    finished = "fastgen_requests_finished_total{finish_reason=abort}"
    assert after[finished] - before[finished] == 1
    assert 0 < after["fastgen_generation_tokens_total"] - before["fastgen_generation_tokens_total"] < 900


def test_metrics_observe_the_engine_only_while_serving(engine):
    own = Server(engine)   # its own AsyncEngine; the module's server is idle meanwhile
    metrics = own.transport.app[SERVER_KEY].metrics
    try:
        assert engine.plugins.pm.is_registered(metrics)
    finally:
        own.close()
    assert not engine.plugins.pm.is_registered(metrics)


def test_each_server_has_its_own_registry_and_engine(engine):
    first, second = ServerMetrics(engine), ServerMetrics(engine)   # the global registry would refuse this
    stats = StepStats(num_tokens=16, num_preempted=2, num_running=3, num_waiting=4, blocks_used=5,
                      blocks_free=59, num_cached_tokens=48, graph_replayed=True)
    first.on_step_finished(engine=object(), stats=stats)   # another engine's step: not counted
    first.on_step_finished(engine=engine, stats=stats)
    preempting = dataclasses.replace(stats, num_tokens=0, num_preempted=1, num_cached_tokens=0,
                                     graph_replayed=False)
    first.on_step_finished(engine=engine, stats=preempting)   # a record of preemptions alone
    values = parse(first.render().decode())
    assert values["fastgen_steps_total{cuda_graph=replayed}"] == 1
    assert values["fastgen_steps_total{cuda_graph=eager}"] == 0
    assert values["fastgen_num_preemptions_total"] == 3
    assert values["fastgen_prefix_cache_hit_tokens_total"] == 48
    assert (values["fastgen_num_requests_running"], values["fastgen_num_requests_waiting"]) == (3, 4)
    assert (values["fastgen_kv_blocks_used"], values["fastgen_kv_blocks_free"]) == (5, 59)
    assert values["fastgen_step_token_budget_utilization_count"] == 2
    assert values["fastgen_step_token_budget_utilization_sum"] == 16 / engine.config.token_budget
    assert parse(second.render().decode())["fastgen_num_preemptions_total"] == 0


def test_preemptions_and_request_times_come_from_the_engine(tiny_llama):
    """With 4 blocks (64 tokens) two requests of 10 + 30 tokens do not fit together: one is preempted."""
    llm = LLM(model=str(tiny_llama[0]), token_budget=32, num_blocks=4)
    metrics = ServerMetrics(llm.engine)
    metrics.register()
    try:
        outputs = llm.generate([list(range(10, 20)), list(range(30, 40))],
                               SamplingParams(max_tokens=30, ignore_eos=True, temperature=0))
    finally:
        metrics.unregister()
    values = parse(metrics.render().decode())
    preempted = sum(out.metrics.num_preemptions for out in outputs)
    assert preempted > 0 and values["fastgen_num_preemptions_total"] == preempted
    # The preempted request resumes from its own blocks where the prefix cache kept them.
    assert values["fastgen_prefix_cache_hit_tokens_total"] == llm.engine.totals.cached_tokens
    for out in outputs:
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert values["fastgen_time_to_first_token_seconds_count"] == 2
    assert values["fastgen_generation_tokens_total"] == 60


def test_tokens_that_arrive_together_count_as_gaps_of_zero():
    """An output carrying several tokens (steps merged for a reader that fell behind) observes one
    gap for its first token and 0 for the others: a request still counts one gap per token after
    its first."""
    import asyncio
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Histogram

    from fastgen.plugins.transports.metrics import ServerMetrics
    from fastgen.request import RequestOutput

    histogram = Histogram("itl", "", buckets=(0.0, 0.01, 1.0), registry=CollectorRegistry())

    async def outputs():
        for tokens in ([1, 2], [], [3], [4, 5, 6]):
            await asyncio.sleep(0.02)
            yield RequestOutput(request_id="r", prompt_token_ids=[0], token_ids=[], text="",
                                new_token_ids=tokens)

    async def read():
        return [o async for o in ServerMetrics.timed(SimpleNamespace(inter_token_latency=histogram), outputs())]

    assert len(asyncio.run(read())) == 4
    samples = {s.name + str(s.labels.get("le", "")): s.value for m in histogram.collect() for s in m.samples}
    assert samples["itl_count"] == 5                 # tokens 2 to 6
    assert samples["itl_bucket0.0"] == 3             # token 2 came with 1; 5 and 6 with 4
    assert samples["itl_bucket0.01"] == 3 and samples["itl_sum"] >= 0.06   # 3 and 4 waited
