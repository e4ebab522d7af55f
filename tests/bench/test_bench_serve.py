"""`fastgen bench serve` end to end on the tiny Llama: two schedulers, short requests."""

from __future__ import annotations

import json

from fastgen import cli

SUMMARY_KEYS = {"requests", "completed", "duration_s", "request_throughput", "token_throughput",
                "total_token_throughput", "ttft_s", "per_token_latency_s", "e2e_latency_s",
                "prompt_sla", "generation_sla", "ema_span", "steps"}


def run_bench(folder, tmp_path, *flags):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "serve", "--model", str(folder), "--kv-cache-gb", "0.01",
                     "--prompt-mean", "24", "--gen-mean", "5", "--requests", "6",
                     "--json", str(out), *flags])
    assert code == 0
    return json.loads(out.read_text())


def check_requests(results, run):
    """Every request of `run` completed with all its tokens, in workload order."""
    workload = results["workloads"][0]
    summary, trace = run["summary"], run["trace"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["completed"] == summary["requests"] == 6
    assert [r["index"] for r in trace["requests"]] == list(range(6))
    for request, prompt_len, max_tokens in zip(trace["requests"], workload["prompt_lens"],
                                               workload["max_tokens"]):
        assert request["error"] is None and request["finish_reason"] == "length"
        assert request["prompt_len"] == prompt_len
        assert len(request["token_times"]) == request["max_tokens"] == max_tokens
        assert request["arrival"] <= request["token_times"][0] <= request["finish"]


def check_runs(results):
    workload = results["workloads"][0]
    for run in results["runs"]:
        trace = run["trace"]
        check_requests(results, run)
        # Every prompt token and every generated token but the last is computed once (no preemption).
        assert sum(s["num_tokens"] for s in trace["steps"]) == \
            sum(workload["prompt_lens"]) + sum(workload["max_tokens"]) - 6
        assert [g["rate"] for g in run["summary"]["generation_sla"]] == results["sla"]["gen_rates"]


def test_closed_loop_two_schedulers(tiny_llama, tmp_path, capsys):
    folder, _ = tiny_llama
    results = run_bench(folder, tmp_path, "--schedulers", "splitfuse,prefill_first", "--clients", "1,2")
    assert all(r["target"] == r["scheduler"] and r["kind"] == "fastgen" for r in results["runs"])
    assert [(r["scheduler"], r["load"]) for r in results["runs"]] == [
        ("splitfuse", {"kind": "closed_loop", "clients": 1}),
        ("prefill_first", {"kind": "closed_loop", "clients": 1}),
        ("splitfuse", {"kind": "closed_loop", "clients": 2}),
        ("prefill_first", {"kind": "closed_loop", "clients": 2})]
    assert results["meta"]["model"] == folder.name and results["meta"]["token_budget"] == 512
    assert [w["name"] for w in results["workloads"]] == ["p24g5"]
    check_runs(results)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| workload | target | load | req/s")
    assert len(table) == 2 + 4 and "| p24g5 | prefill_first | 2 clients |" in table[-1]


def test_poisson_arrivals(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    results = run_bench(folder, tmp_path, "--schedulers", "continuous", "--rate", "200",
                        "--gen-sla-rates", "5", "--prompt-sla-rate", "1000")
    assert [r["load"]["kind"] for r in results["runs"]] == ["poisson"]
    assert results["sla"] == {"prompt_rate": 1000.0, "gen_rates": [5.0], "ema_span": 16}
    check_runs(results)


def test_an_unknown_scheduler_is_refused_before_any_run(tiny_llama, tmp_path, capsys):
    folder, _ = tiny_llama
    code = cli.main(["bench", "serve", "--model", str(folder), "--schedulers", "splitfuse,nope"])
    assert code == 2
    assert "schedulers.nope" in capsys.readouterr().err
