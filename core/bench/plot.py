"""`--plot FILE.png`: the serving benchmark's results drawn with matplotlib (Agg, no display).

One row of panels per workload: per-token latency (P50 solid, P95 dashed) against token
throughput, one line per target through its loads, as in DeepSpeed-FastGen's latency-throughput
curves; then, for each generation SLA rate, effective throughput against the load (clients, or
the Poisson arrival rate), one line per target.
"""

from __future__ import annotations

from ..errors import ConfigError


def _load_x(run: dict) -> float:
    load = run["load"]
    return load["clients"] if load["kind"] == "closed_loop" else load["rate"]


def plot_results(results: dict, path: str) -> None:
    """Write the figure of `results` (as run_serve_benchmark returns them) to `path` (PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with `pip install 'fastgen[bench]'`.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    if not runs:
        raise ConfigError("There are no runs to plot.")
    workloads = list(dict.fromkeys(run["workload"] for run in runs))
    targets = list(dict.fromkeys(run["target"] for run in runs))
    rates = [g["rate"] for g in runs[0]["summary"]["generation_sla"]]
    closed = runs[0]["load"]["kind"] == "closed_loop"
    colors = {t: f"C{i % 10}" for i, t in enumerate(targets)}
    columns = 1 + len(rates)
    fig, axes = plt.subplots(len(workloads), columns, figsize=(4.2 * columns, 3.6 * len(workloads)),
                             squeeze=False)
    for row, workload in zip(axes, workloads):
        for target in targets:
            mine = sorted((r for r in runs if r["workload"] == workload and r["target"] == target),
                          key=_load_x)
            if not mine:
                continue
            throughput = [r["summary"]["token_throughput"] for r in mine]
            latency = [r["summary"]["per_token_latency_s"] for r in mine]
            for q, style in (("p50", "-"), ("p95", "--")):
                points = [(x, d[q] * 1e3) for x, d in zip(throughput, latency) if d[q] is not None]
                if points:
                    row[0].plot(*zip(*points), style, marker="o", color=colors[target],
                                label=f"{target} {q.upper()}")
            for ax, index in zip(row[1:], range(len(rates))):
                ax.plot([_load_x(r) for r in mine],
                        [r["summary"]["generation_sla"][index]["effective_throughput"] for r in mine],
                        marker="o", color=colors[target], label=target)
        row[0].set(title=f"{workload}: per-token latency", xlabel="generated tokens/s",
                   ylabel="per-token latency (ms)", yscale="log")
        row[0].legend(fontsize=7)
        for ax, rate in zip(row[1:], rates):
            ax.set(title=f"{workload}: effective throughput @{rate:g} tok/s",
                   xlabel="clients" if closed else "arrival rate (req/s)",
                   ylabel="requests/s meeting both SLAs")
            if closed:
                clients = sorted({_load_x(r) for r in runs})
                ax.set_xscale("log", base=2)
                ax.set_xticks(clients, [str(c) for c in clients])
            ax.legend(fontsize=7)
        for ax in row:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
