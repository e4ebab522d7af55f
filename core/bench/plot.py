"""`--plot FILE.png`: the benchmarks' results drawn with matplotlib (Agg, no display).

`fastgen bench serve`: one row of panels per workload: per-token latency (P50 solid, P95 dashed)
against token throughput, one line per target through its loads, as in DeepSpeed-FastGen's
latency-throughput curves; then, for each generation SLA rate, effective throughput against the
load (clients, or the Poisson arrival rate), one line per target.

`fastgen bench kernels`: one row per op: each case's fraction of the device's nearer ceiling
(copy bandwidth or matmul rate), and its time, one bar per backend.
"""

from __future__ import annotations

from ..errors import ConfigError


def _load_x(run: dict) -> float:
    load = run["load"]
    return load["clients"] if load["kind"] == "closed_loop" else load["rate"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with `pip install 'fastgen[bench]'`.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: dict, path: str) -> None:
    """Write the figure of `results` (as run_serve_benchmark returns them) to `path` (PNG)."""
    plt = _pyplot()
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


def plot_kernel_results(results: dict, path: str) -> None:
    """Write the figure of the kernel suite's pytest-benchmark JSON `results` to `path` (PNG)."""
    from .kernels import ResultGrid

    grid = ResultGrid.from_json(results)
    if not grid.cases:
        raise ConfigError("There are no timed kernel cases to plot.")
    plt = _pyplot()
    ops = list(dict.fromkeys(key[0] for key in grid.cases))
    widest = max(sum(key[0] == op for key in grid.cases) for op in ops)
    width = min(40.0, 3.0 + 0.3 * widest * max(1, len(grid.backends)))
    fig, axes = plt.subplots(len(ops), 2, figsize=(2 * width, 4.5 * len(ops)), squeeze=False)
    bar = 0.8 / len(grid.backends)
    # A case reads by what tells it apart: the model and the dtype only where the run has several.
    varying = [i for i in (1, 2, 3) if i == 2 or len({key[i] for key in grid.cases}) > 1]
    for (roof_ax, time_ax), op in zip(axes, ops):
        keys = [key for key in grid.cases if key[0] == op]
        labels = [" ".join(key[i] for i in varying) for key in keys]
        for i, backend in enumerate(grid.backends):
            xs = [x + (i - (len(grid.backends) - 1) / 2) * bar for x in range(len(keys))]
            infos = [grid.cases[key].get(backend) for key in keys]
            drawn = [(x, info) for x, info in zip(xs, infos) if info is not None]
            if not drawn:
                continue
            x, info = zip(*drawn)
            roof_ax.bar(x, [r["pct_ceiling"] for r in info], bar, color=f"C{i % 10}", label=backend)
            time_ax.bar(x, [r["seconds"] * 1e6 for r in info], bar, color=f"C{i % 10}", label=backend)
        roof_ax.axhline(100, color="black", linewidth=0.8)
        roof_ax.set(title=f"{op}: % of the nearer ceiling", ylabel="% of copy or matmul ceiling",
                    yscale="log")
        time_ax.set(title=f"{op}: median time", ylabel="microseconds", yscale="log")
        for ax in (roof_ax, time_ax):
            ax.set_xticks(range(len(keys)), labels, rotation=40, ha="right", fontsize=7)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, axis="y")
    ceilings = "; ".join(f"{dtype} on {device}: copy {gbps:.1f} GB/s, matmul {tflops:.3g} TFLOP/s"
                         for dtype, (device, gbps, tflops) in sorted(grid.ceilings.items()))
    fig.suptitle(f"fastgen bench kernels ({ceilings})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)
