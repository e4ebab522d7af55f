"""benchmarks/attention_sweep.py runs end to end (here under Triton's interpreter, on a small prompt
and a decode shape): every setting computes what kernels.torch does, and the table ranks them beside
SDPA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "attention_sweep.py"


def test_quick_sweep_checks_and_ranks_every_setting(tmp_path):
    markdown, results = tmp_path / "sweep.md", tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--repeats", "1",
                           "--shapes", "prefill_40_cached0,decode_b2_ctx600", "--markdown", str(markdown),
                           "--json", str(results)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(results.read_text())
    settings = [(r["shape"], r["setting"]) for r in rows]
    sweep = ["auto", "block_n=32 warps=4", "tile=16 block_n=64 warps=4"]
    # Decode shapes also run a forced split count; kernels.cuda, which needs a GPU, is left out.
    assert settings == ([("prefill_40_cached0", s) for s in [*sweep, "torch SDPA (contiguous K/V)"]]
                        + [("decode_b2_ctx600", s) for s in [*sweep, "auto splits=3",
                                                             "torch SDPA (contiguous K/V)"]])
    assert all(r["correct"] and r["seconds"] > 0 for r in rows)
    assert next(r for r in rows if r["setting"] == "auto splits=3")["extra"]["num_splits"] == 3
    table = markdown.read_text()
    assert "### prefill_40_cached0" in table and table.count("| best |") == 2
