"""benchmarks/step_profile.py: kernel and op names land in their op's group, and the script
profiles a prompt window and a decode window end to end (on the CPU, a tiny random model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "step_profile.py"
sys.path.insert(0, str(SCRIPT.parent))

from step_profile import OTHER, group_of  # noqa: E402


@pytest.mark.parametrize("name, group", [
    # kernels.triton's kernels, kernels.cuda's, kernels.cpu's ops, cuBLAS's, torch's
    ("_attention_kernel", "attention"), ("_reduce_splits_kernel", "attention"),
    ("prompt_attention_kernel(AttentionParams)", "attention"),
    ("fastgen_cpu::paged_attention", "attention"),
    ("_write_kv_kernel", "write_kv"), ("write_kv_kernel(WriteKVParams)", "write_kv"),
    ("_rms_norm_kernel", "rms_norm"), ("fastgen_cpu::add_rms_norm", "rms_norm"),
    ("_rotary_kernel", "rotary"), ("_silu_and_mul_kernel", "silu_and_mul"),
    ("_gumbel_argmax_kernel", "sampling"), ("_threshold_kernel", "sampling"),
    ("sample_kernel(SampleParams)", "sampling"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "matmul"), ("fastgen_cpu::linear", "matmul"),
    ("aten::mm", "matmul"), ("aten::embedding", "embedding"),
    ("Memcpy HtoD (Pinned -> Device)", "copy"), ("aten::copy_", "copy"),
    ("aten::empty", OTHER),
])
def test_kernel_and_op_names_land_in_their_ops_group(name, group):
    assert group_of(name) == group


def _rows(table: str, window: str) -> dict[str, list[str]]:
    section = table.split(f"### {window}")[1].split("###")[0]
    return {cells[0]: cells[1:] for line in section.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


@pytest.mark.slow   # a benchmark script end to end under torch.profiler: 11 s
def test_profiles_a_prompt_window_and_a_decode_window(tmp_path):
    out = tmp_path / "steps.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--random-model", "llama-tiny", "--device", "cpu",
                           "--requests", "4", "--prompt-len", "32", "--steps", "3",
                           "--markdown", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "serving random llama-tiny with transports." in table
    assert "steps of 512 tokens and 64 sequences at most" in table
    # 4 x 32 prompt tokens fit one step of 512; the decode window is the 3 steps asked for.
    assert re.search(r"### prompt steps \(4 x 32 tokens\): 1 steps, [\d.]+ ms a step", table)
    assert re.search(r"### decode steps \(4 sequences\): 3 steps, [\d.]+ ms a step", table)
    for window in ("prompt steps", "decode steps"):
        rows = _rows(table, window)
        groups = {k: v for k, v in rows.items() if k not in ("group", "---") and not k.startswith(("all", "wall"))}
        assert {"matmul", "attention", "rms_norm", "write_kv"} <= set(groups), rows
        shares = sum(float(v[1].rstrip("%")) for v in groups.values())
        assert abs(shares - 100) < 0.5, rows
        # The tiny model's 2 layers x 4 matmuls (qkv, o, gate_up, down), the LM head besides.
        assert float(groups["matmul"][2]) >= 2 * 4
