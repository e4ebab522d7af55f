"""benchmarks/triton_host_cost.py runs kernels.triton's ops through Triton's launch path with a
stand-in driver: each op launches as it would on an sm_90 GPU (its GPU launch settings, not the
interpreter's), and the stand-ins are gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "triton_host_cost.py"


def test_every_op_launches_once_with_gpu_settings(tmp_path):
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--calls", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    ops = ["rms_norm", "rotary", "write_kv", "attention", "silu_and_mul"]
    assert sorted((r["shape"], r["op"]) for r in rows) == sorted(
        (shape, op) for shape in ("decode_b1_ctx128", "mixed_512_d16x1024_chunk496_cached0") for op in ops)
    assert all(r["launches"] == 1 and r["host_us"] > 0 and r["wrapper_us"] > 0 for r in rows)
    attention = {r["shape"]: r["settings"][0] for r in rows if r["op"] == "attention"}
    # Llama-3-8B's head size 128 on a GPU: 32 keys a step (the interpreter takes 64); the mixed
    # step's prompt tiles are 16 tokens of 4 query heads (the interpreter's, 64 tokens).
    assert attention["decode_b1_ctx128"]["BLOCK_N"] == 32
    assert attention["mixed_512_d16x1024_chunk496_cached0"]["BLOCK_M"] == 64
    assert "| mixed_512_d16x1024_chunk496_cached0 | attention | 1 |" in done.stdout


def test_unknown_shape_names_the_known_ones():
    done = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "decode_b3", "--calls", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "unknown shapes decode_b3; choose from" in done.stderr
    assert "decode_b1_ctx128" in done.stderr
