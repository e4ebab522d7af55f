"""`fastgen bench kernels --baseline OLD.json`: one run of the kernel suite beside an earlier one.

A kernel author times a backend, changes a kernel and times it again; or runs the same suite on
two machines. Each (op, model, shape, dtype, backend) case timed in both runs becomes a row with
both median times, the speedup (the baseline's time over this run's: above 1x is faster now) and
both runs' fraction of their own device's ceilings, which says whether a difference is the kernel's
or the machine's. A line per backend sums it up: the geometric mean of its speedups and their
range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import FastgenError
from .kernels import ResultGrid, format_number, format_seconds


@dataclass(frozen=True)
class Run:
    """A saved or fresh run of the suite, and what to call it in the table."""

    label: str
    results: dict

    def describe(self) -> str:
        machine = self.results.get("machine_info") or {}
        device = machine.get("fastgen_device") or (machine.get("cpu") or {}).get("brand_raw")
        copy = (machine.get("fastgen_kernel_ceilings") or {}).get("copy_gbps")
        when = (self.results.get("datetime") or "")[:16].replace("T", " ")
        parts = [p for p in (device, copy and f"copy {copy:.1f} GB/s", when and f"{when} UTC") if p]
        return f"{self.label}: {', '.join(parts) or 'no machine info'}"


def _speedup(x: float) -> str:
    return f"{format_number(x)}x"


def format_comparison(current: Run, baseline: Run) -> str:
    """The markdown comparison of `current` with `baseline`; an error when they share no case."""
    now, before = ResultGrid.from_json(current.results), ResultGrid.from_json(baseline.results)
    shared, only_now = [], 0
    for key, backends in now.cases.items():
        for backend, info in backends.items():
            old = before.cases.get(key, {}).get(backend)
            if old is None:
                only_now += 1
            else:
                shared.append((key, backend, old, info))
    only_before = sum(len(b) for b in before.cases.values()) - len(shared)
    if not shared:
        raise FastgenError(
            f"{current.label} and {baseline.label} have no case in common (the same op, model, "
            f"shape, dtype and backend); run the suite with the same options as the baseline.")
    a, b = baseline.label, current.label
    lines = [f"compared with {a}; a speedup above 1x is faster in {b}",
             f"- {baseline.describe()}", f"- {current.describe()}"]
    if only_now or only_before:
        lines.append(f"- not compared: {only_now} case(s) only in {b}, {only_before} only in {a}")
    header = ["op", "model", "shape", "dtype", "backend", f"{a} time", f"{b} time", "speedup",
              f"{a} % roof", f"{b} % roof"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * (len(header) - 5)]
    by_backend: dict[str, list[tuple[float, str]]] = {}
    # Backends in the current run's order (the reference first), each case in the suite's order.
    for backend in now.backends:
        for key, _, old, new in (row for row in shared if row[1] == backend):
            speedup = old["seconds"] / new["seconds"]
            by_backend.setdefault(backend, []).append((speedup, f"{key[0]} {key[2]}"))
            cells = [*key, backend, format_seconds(old["seconds"]), format_seconds(new["seconds"]),
                     _speedup(speedup), f"{format_number(old['pct_ceiling'])}%",
                     f"{format_number(new['pct_ceiling'])}%"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for backend, speedups in by_backend.items():
        mean = math.exp(sum(math.log(s) for s, _ in speedups) / len(speedups))
        low, high = min(speedups), max(speedups)
        lines.append(f"kernels.{backend}: {_speedup(mean)} geometric mean over {len(speedups)} case(s), "
                     f"from {_speedup(low[0])} ({low[1]}) to {_speedup(high[0])} ({high[1]})")
    return "\n".join(lines)
