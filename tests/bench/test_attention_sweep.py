"""The attention benchmarks run end to end (here under Triton's interpreter, on small shapes):
attention_sweep.py checks every setting against kernels.torch and ranks them beside SDPA,
profile_attention.py checks and runs each call it would profile, and tile_order_model.py models
the two tile orders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "attention_sweep.py"


@pytest.mark.slow   # 30 s under the interpreter
def test_quick_sweep_checks_and_ranks_every_setting(tmp_path):
    markdown, results = tmp_path / "sweep.md", tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--repeats", "1",
                           "--shapes", "prefill_40_cached0,decode_b2_ctx600", "--markdown", str(markdown),
                           "--json", str(results)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(results.read_text())
    settings = [(r["shape"], r["setting"]) for r in rows]
    sweep = ["auto", "block_n=32 warps=4", "tile=16 block_n=64 warps=4",
             "tile=16 block_n=32 warps=4 cache_block=32 tma"]
    # Decode shapes also run a forced split count, prompt shapes the tiles in batch order;
    # kernels.cuda, which needs a GPU, is left out.
    assert settings == ([("prefill_40_cached0", s) for s in [*sweep, "auto tiles in batch order",
                                                               "torch SDPA (contiguous K/V)"]]
                        + [("decode_b2_ctx600", s) for s in [*sweep, "auto splits=3",
                                                             "torch SDPA (contiguous K/V)"]])
    assert all(r["correct"] and r["seconds"] > 0 for r in rows)
    assert next(r for r in rows if r["setting"] == "auto splits=3")["extra"]["num_splits"] == 3
    table = markdown.read_text()
    assert "### prefill_40_cached0" in table and table.count("| best |") == 2


PROFILE = SCRIPT.with_name("profile_attention.py")


def test_the_profile_script_checks_and_runs_each_call(tmp_path):
    """Without a GPU: the same calls under the interpreter, each checked against kernels.torch,
    and named on stderr in the order the profiler would see them."""
    done = subprocess.run([sys.executable, str(PROFILE), "--quick", "--shapes", "prefill_40_cached0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    named = [line for line in done.stderr.splitlines() if line.startswith("profiling ")]
    assert named == ["profiling kernels.triton on prefill_40_cached0 (smollm2-135m, float32)",
                     "profiling torch SDPA (contiguous K/V) on prefill_40_cached0 (smollm2-135m, float32)"]


def test_the_tile_order_model_puts_longest_first_nearer_the_ideal():
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("tile_order_model.py"))],
                          capture_output=True, text=True, timeout=60, check=True)
    ratios = {m[1]: float(m[2]) for m in re.finditer(r"^(.+?)\s+([\d.]+)x the ideal", done.stdout, re.M)}
    assert 1.0 <= ratios["longest first"] < ratios["batch order"]
