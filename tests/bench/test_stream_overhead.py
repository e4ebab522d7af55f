"""benchmarks/stream_overhead.py: streams through the HTTP server and through the AsyncEngine,
each with the engine's steps in the serving process and in a process of their own, and accounts
for what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "stream_overhead.py"


@pytest.mark.slow   # two engines, an engine process and two servers started: 35 s
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU times from /proc")
def test_streams_through_both_and_accounts_for_every_token(tmp_path):
    out, table = tmp_path / "runs.json", tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--streams", "3,5", "--gen-len", "6",
                           "--repeat", "1", "--through", "http,http-process,engine,engine-process", "--json", str(out), "--markdown", str(table)],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    throughs = ["http", "http-process", "engine", "engine-process"]
    assert [(r["through"], r["streams"]) for r in runs] == [(t, n) for t in throughs for n in (3, 5)]
    for row in runs:
        (run,) = row["runs"]
        assert run["tokens"] == row["streams"] * 6   # every stream ran to its length
        assert 0 < run["events"] <= run["tokens"]
        # The engine ran the prompts and then one decode step per token after the first at least
        # (5 further tokens), its parts measured, and the process spent CPU time beyond them.
        assert run["steps"] >= 6 and all(run["engine_s"][p] > 0 for p in ("schedule", "forward"))
        assert run["tokens_per_s"] > 0
    lines = [line for line in table.read_text().splitlines() if line.startswith(("| http", "| engine"))]
    assert len(lines) == 8
