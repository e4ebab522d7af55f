"""The serving benchmark's table: one row per workload x target x load, as Markdown."""

from __future__ import annotations


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f}"


def _s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.2f}"


def _pct(share: float | None) -> str:
    return "—" if share is None else f"{share * 100:.0f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """A Markdown table of every run's summary (latencies in ms unless marked s)."""
    rates = [g["rate"] for g in results["runs"][0]["summary"]["generation_sla"]] if results["runs"] else []
    prompt_rate = results["sla"]["prompt_rate"]
    header = (["workload", "target", "load", "req/s", "tok/s", "TTFT P50 s", "TTFT P95 s",
               "tok lat P50 ms", "tok lat P95 ms", "tok lat P99 ms", "e2e P50 s"]
              + [f"eff req/s @{r:g}" for r in rates]
              + [f"miss prompt@{prompt_rate:g} %"] + [f"miss gen@{r:g} %" for r in rates]
              + ["tok/step", "budget util %"])
    rows = []
    for run in results["runs"]:
        s = run["summary"]
        ttft, tok, e2e = s["ttft_s"], s["per_token_latency_s"], s["e2e_latency_s"]
        gen = s["generation_sla"]
        rows.append([run["workload"], run["target"], run["load_label"],
                     _num(s["request_throughput"], 3), _num(s["token_throughput"], 1),
                     _s(ttft["p50"]), _s(ttft["p95"]),
                     _ms(tok["p50"]), _ms(tok["p95"]), _ms(tok["p99"]), _s(e2e["p50"])]
                    + [_num(g["effective_throughput"], 3) for g in gen]
                    + [_pct(s["prompt_sla"]["missed_share"])] + [_pct(g["missed_share"]) for g in gen]
                    + [_num(s["steps"]["mean_tokens"], 0), _pct(s["steps"]["budget_utilisation"])])
    right = {i for i in range(3, len(header))}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
