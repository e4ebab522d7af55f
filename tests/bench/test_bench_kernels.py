"""The kernel-backend benchmark: its byte and FLOP formulas, the batches it builds, the backend
selection from the registry, and the quick suite end to end through `fastgen bench kernels`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fastgen
from fastgen.bench.kernels import (BLOCK_SIZE, MODELS, OPS, QUICK_SHAPES, BatchShape, Ceilings, Cost,
                                   ModelShape, Selection, achieved, build_batch, decode, format_table,
                                   mixed, op_cost, prefill)
from fastgen.cli import main
from fastgen.errors import FastgenError, PluginError

SMALL = MODELS["smollm2-135m"]   # H 9, Hkv 3, D 64, E 576, I 1536, V 49152
WINDOWED = ModelShape("windowed", 256, 4, 2, 64, 512, 1000, sliding_window=4)


def test_shapes_come_from_the_model_configs():
    llama, mistral = MODELS["llama3-8b"], MODELS["mistral-7b"]
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.intermediate_size) == (32, 8, 128, 14336)
    assert mistral.sliding_window == 4096 and llama.sliding_window is None
    assert (SMALL.num_heads, SMALL.num_kv_heads, SMALL.head_dim) == (9, 3, 64)


def test_attention_cost_of_decodes():
    # Two decodes after 127 cached tokens: each query sees its 128 keys.
    cost = op_cost("attention", SMALL, decode(2, 127), torch.float32)
    assert cost.bytes == 2 * 2 * 9 * 64 * 4 + 2 * (2 * 128) * 3 * 64 * 4
    assert cost.flops == 4 * (2 * 128) * 9 * 64


def test_attention_flops_count_only_causal_pairs():
    # A 4-token chunk alone: 1 + 2 + 3 + 4 pairs, not 4 * 4; after 2 cached tokens: 3 + 4 + 5.
    assert op_cost("attention", SMALL, prefill(4), torch.bfloat16).flops == 4 * 10 * 9 * 64
    chunk = op_cost("attention", SMALL, prefill(3, cached=2), torch.bfloat16)
    assert chunk.flops == 4 * 12 * 9 * 64
    assert chunk.bytes == 2 * 3 * 9 * 64 * 2 + 2 * 5 * 3 * 64 * 2


@pytest.mark.parametrize("cached,new", [(0, 9), (2, 6), (10, 2), (3, 1), (0, 3), (5, 7)])
def test_attention_cost_within_a_sliding_window_matches_counting_the_mask(cached, new):
    q_pos = torch.arange(cached, cached + new)[:, None]
    k_pos = torch.arange(cached + new)[None, :]
    mask = (k_pos <= q_pos) & (k_pos > q_pos - WINDOWED.sliding_window)   # [new, cached + new]
    pairs, keys = int(mask.sum()), int(mask.any(0).sum())
    cost = op_cost("attention", WINDOWED, BatchShape("w", "prefill", ((cached, new),)), torch.float32)
    assert cost.flops == 4 * pairs * 4 * 64
    assert cost.bytes == 2 * new * 4 * 64 * 4 + 2 * keys * 2 * 64 * 4


def test_elementwise_linear_and_sampling_costs():
    shape = prefill(3)    # T = 3, one sampling sequence
    assert op_cost("rms_norm", SMALL, shape, torch.float32) == Cost((4 * 3 * 576 + 576) * 4, 0)
    assert op_cost("silu_and_mul", SMALL, shape, torch.bfloat16) == Cost(3 * 3 * 1536 * 2, 0)
    assert op_cost("rotary", SMALL, shape, torch.float16) == Cost(2 * 3 * 12 * 64 * 2 + 2 * 3 * 32 * 4, 0)
    assert op_cost("write_kv", SMALL, shape, torch.float32) == Cost(4 * 3 * 3 * 64 * 4 + 8 * 3, 0)
    assert op_cost("sample", SMALL, decode(5, 10), torch.bfloat16) == Cost(5 * 49152 * 4 + 5 * 8, 0)
    # The MLP's gate and up projection, [3, 576] x [3072, 576]^T.
    assert op_cost("linear", SMALL, shape, torch.bfloat16) == Cost(
        (3 * 576 + 3072 * 576 + 3 * 3072) * 2, 2 * 3 * 576 * 3072)
    with pytest.raises(FastgenError, match="Unknown kernel op 'gemm'"):
        op_cost("gemm", SMALL, shape, torch.float32)


def test_achieved_rates_and_the_nearer_ceiling():
    ceilings = Ceilings(copy_gbps=4.0, matmul_tflops={"float32": 1.0})
    memory = achieved(Cost(bytes=10**9, flops=0), 0.5, ceilings, "float32")
    assert memory["gbps"] == pytest.approx(2.0) and memory["pct_ceiling"] == pytest.approx(50.0)
    assert memory["bound"] == "memory"
    compute = achieved(Cost(bytes=10**8, flops=10**12), 2.0, ceilings, "float32")
    assert compute["tflops"] == pytest.approx(0.5) and compute["pct_matmul"] == pytest.approx(50.0)
    assert compute["bound"] == "compute" and compute["pct_ceiling"] == pytest.approx(50.0)


def test_mixed_batch_fills_the_budget_and_builds_a_ragged_batch():
    shape = mixed(64, 4, 128, chunk_cached=16)
    assert shape.num_tokens == 64
    batch = build_batch(shape, torch.device("cpu"))
    assert batch.num_decodes == 4 and batch.num_tokens == 64
    assert batch.seq_lens.tolist() == [129] * 4 + [16 + 60]
    assert len(batch.sampling_seqs) == 5
    # Every sequence owns its own blocks, and together they are exactly the shape's blocks.
    blocks = [b for s in batch.sequences for b in s.block_ids]
    assert sorted(blocks) == list(range(shape.blocks(BLOCK_SIZE)))


class _Unavailable:
    name = "needs_flux"

    def __init__(self, device):
        self.device = device

    @classmethod
    def unavailable_reason(cls, device):
        return "it needs a flux capacitor."


class _FluxPlugin:
    @fastgen.hookimpl
    def register_kernels(self, register):
        register(_Unavailable)


def test_backends_come_from_the_registry_and_unavailable_ones_say_why(plugin_manager):
    plugin_manager.register(_FluxPlugin(), name="kernels.needs_flux")
    sel = Selection.from_options(quick=True, device="cpu", registry=plugin_manager.registry)
    assert "torch" in [b.name for b in sel.backends] and "needs_flux" not in [b.name for b in sel.backends]
    assert sel.unavailable["needs_flux"] == "it needs a flux capacitor."
    assert "needs_flux" not in {c.backend.name for c in sel.cases()}
    assert {c.op for c in sel.cases()} == set(OPS)
    with pytest.raises(FastgenError, match="kernels.needs_flux cannot run on cpu: it needs a flux"):
        Selection.from_options(backends="needs_flux", device="cpu", registry=plugin_manager.registry)


def test_unknown_names_are_refused_listing_the_choices(capsys):
    with pytest.raises(PluginError, match=r"No plugin named kernels.nope; installed kernels: .*kernels.torch"):
        Selection.from_options(backends="nope", device="cpu")
    with pytest.raises(FastgenError, match="Unknown op gemm; choose from write_kv, attention"):
        Selection.from_options(ops="attention,gemm", device="cpu")
    assert main(["bench", "kernels", "--backends", "torch,nope", "--quick"]) == 2
    assert "No plugin named kernels.nope; installed kernels:" in capsys.readouterr().err


def test_quick_suite_runs_every_op_end_to_end(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "fastgen.cli", "bench", "kernels", "--quick",
                           "--backends", "torch", "--device", "cpu", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine_info"]["fastgen_kernel_ceilings"]["copy_gbps"] > 0
    assert results["machine_info"]["fastgen_device"].endswith(", 1 thread")
    benches = results["benchmarks"]
    cases = {(b["extra_info"]["op"], b["extra_info"]["shape"]) for b in benches}
    shapes = [s.name for kind in QUICK_SHAPES.values() for s in kind]
    assert cases == {(op, s) for op in OPS for s in shapes}
    for bench in benches:
        info = bench["extra_info"]
        assert info["backend"] == "torch" and info["dtype"] == "float32" and info["threads"] == 1
        assert info["seconds"] == bench["stats"]["median"] > 0
        assert info["gbps"] == pytest.approx(info["bytes"] / info["seconds"] / 1e9)
        assert (info["tflops"] > 0) == (info["op"] in ("attention", "linear"))
        assert info["pct_ceiling"] > 0
    # stdout is the table alone: the ceilings, then one row per op x shape.
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("ceilings on cpu, float32: copy ")
    header = next(line for line in lines if line.startswith("| op |"))
    assert header.split(" | ")[4:] == ["torch time", "torch GB/s", "torch TFLOP/s", "torch % roof |"]
    rows = [line for line in lines if line.startswith("| ") and line != header]
    assert len(rows) == len(OPS) * len(shapes)
    assert {r.split(" | ")[0][2:] for r in rows} == set(OPS)
    assert "passed" in proc.stderr


def _result(backend, op, seconds, flops=0):
    info = {"backend": backend, "op": op, "model": "m", "shape": "decode_b1_ctx128", "dtype": "float32",
            "device": "cpu", "bytes": 10**6, "flops": flops}
    info.update(achieved(Cost(10**6, flops), seconds, Ceilings(10.0, {"float32": 1.0}), "float32"))
    return {"extra_info": info}


def test_table_puts_backends_side_by_side_with_the_speedup_over_torch():
    results = {"benchmarks": [_result("triton", "rms_norm", 1e-4), _result("torch", "rms_norm", 4e-4),
                              _result("torch", "attention", 1e-3, flops=10**9)]}
    lines = format_table(results, ["kernels.cuda is unavailable: no GPU"]).splitlines()
    assert lines[:2] == ["ceilings on cpu, float32: copy 10.0 GB/s, matmul 1.000 TFLOP/s",
                         "note: kernels.cuda is unavailable: no GPU"]
    header = [c.strip() for c in lines[3].strip("|").split("|")]
    assert header[4:] == ["torch time", "torch GB/s", "torch TFLOP/s", "torch % roof", "triton time",
                          "triton GB/s", "triton TFLOP/s", "triton % roof", "triton vs torch"]
    attention, norm = ([c.strip() for c in line.strip("|").split("|")] for line in lines[5:7])
    assert attention == ["attention", "m", "decode_b1_ctx128", "float32", "1.00 ms", "1", "1", "100% com"] + ["-"] * 5
    assert norm[4:] == ["400.0 us", "2.5", "-", "25% mem", "100.0 us", "10", "-", "100% mem", "4x"]


def test_gpu_results_show_each_backends_launch_cost_and_mark_timings_the_host_held_up():
    triton, torch_ = _result("triton", "rms_norm", 1e-5), _result("torch", "rms_norm", 2e-5)
    triton["extra_info"].update(host_seconds=3e-5, host_waits=0)
    torch_["extra_info"].update(host_seconds=1e-5, host_waits=2)
    lines = format_table({"benchmarks": [triton, torch_]}).splitlines()
    assert lines[1].startswith("time: device time, kernels back to back on a cold L2")
    header = [c.strip() for c in lines[3].strip("|").split("|")]
    assert header[4:] == ["torch time", "torch GB/s", "torch TFLOP/s", "torch % roof", "torch launch",
                          "triton time", "triton GB/s", "triton TFLOP/s", "triton % roof",
                          "triton launch", "triton vs torch"]
    row = [c.strip() for c in lines[5].strip("|").split("|")]
    assert row[4:] == ["20.0 us (host waits)", "50", "-", "500% mem", "10.0 us",
                       "10.0 us", "100", "-", "1e+03% mem", "30.0 us", "2x"]


class _Broken:
    """A backend whose rms_norm raises, to show one failing case does not hide the others."""

    name = "broken_norm"

    def __init__(self, device):
        self.device = device

    @classmethod
    def unavailable_reason(cls, device):
        return None

    def rms_norm(self, x, weight, eps, residual=None):
        raise RuntimeError("no kernel for this shape")

    def silu_and_mul(self, x):
        return x[:, : x.shape[1] // 2]


class _BrokenPlugin:
    @fastgen.hookimpl
    def register_kernels(self, register):
        register(_Broken)


def test_a_failing_case_is_noted_and_the_others_still_run(capsys):
    from fastgen.bench.kernels_suite import run_suite
    from fastgen.plugin_manager import load_plugins

    manager = load_plugins()
    manager.register(_BrokenPlugin(), name="kernels.broken_norm")
    try:
        results, notes, failed = run_suite(backends="broken_norm", ops="rms_norm,silu_and_mul",
                                           sets="decode", quick=True, device="cpu")
    finally:
        manager.unregister("kernels.broken_norm")
    assert failed == ["broken_norm-float32-smollm2-135m-decode_b4_ctx128-rms_norm"]
    assert notes == [f"{failed[0]} FAILED: RuntimeError: no kernel for this shape"]
    assert [b["extra_info"]["op"] for b in results["benchmarks"]] == ["silu_and_mul"]
    assert "failed" in capsys.readouterr().err


def test_cases_run_and_check_on_cache_blocks_of_the_size_given():
    """--block-size: every attention and write_kv case's cache in blocks of that size, checked
    against kernels.torch on the same layout (kernels.cpu, the fast backend here); the ids say the
    size where it is not the default. A block of no tokens is refused."""
    from fastgen.bench.kernels_suite import run_suite
    from fastgen.plugin_manager import load_plugins

    reason = load_plugins().registry.get("kernels", "cpu").cls.unavailable_reason(torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    results, notes, failed = run_suite(backends="cpu", ops="attention,write_kv", quick=True,
                                       device="cpu", check=True, block_size=64)
    assert failed == [] and notes == []
    benches = results["benchmarks"]
    assert benches and all(b["extra_info"]["block_size"] == 64 for b in benches)
    assert all(b["name"].endswith("-block64]") for b in benches), [b["name"] for b in benches]
    # What the backend is handed: a batch of 64-token blocks and caches laid out in them.
    sel = Selection.from_options(quick=True, device="cpu", ops="attention", backends="torch",
                                 block_size=64)
    backend, seen = fastgen.kernels.make_backend(sel.backends[0].cls, sel.device), []
    attend = backend.attention
    backend.attention = lambda q, k, v, batch, *rest: (seen.append((batch.block_size, k.shape[1]))
                                                       or attend(q, k, v, batch, *rest))
    for case in sel.cases():
        case.build(backend)()
    assert len(seen) == len(sel.cases()) and set(seen) == {(64, 64)}
    with pytest.raises(FastgenError, match="block size 0: a KV cache block holds at least 1 token"):
        Selection.from_options(quick=True, device="cpu", block_size=0)


def test_a_saved_run_is_tabled_and_plotted_without_running(tmp_path, capsys):
    import matplotlib.image
    import numpy as np

    results = {"benchmarks": [_result("triton", "rms_norm", 1e-4), _result("torch", "rms_norm", 4e-4),
                              _result("torch", "attention", 1e-3, flops=10**9),
                              _result("triton", "attention", 5e-4, flops=10**9)]}
    saved = tmp_path / "gpu.json"
    saved.write_text(json.dumps(results))
    png = tmp_path / "kernels.png"
    assert main(["bench", "kernels", "--load", str(saved), "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == format_table(results)
    assert f"plot written to {png}" in captured.err
    image = matplotlib.image.imread(png)[..., :3]   # [H, W, RGB] in [0, 1]
    # A bar per backend, in matplotlib's first two colours (torch C0, triton C1).
    for colour in ("#1f77b4", "#ff7f0e"):
        rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(image - rgb).max(axis=-1) < 0.02).sum() > 500, colour


@pytest.mark.parametrize("content,message", [
    (None, "Cannot read"), ("{", "is not JSON"),
    ('{"runs": []}', 'is not a kernel benchmark\'s JSON (no "benchmarks" list)')])
def test_loading_what_is_not_a_saved_run_says_so(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    assert main(["bench", "kernels", "--load", str(path)]) == 2
    assert message in capsys.readouterr().err


def _saved_run(path, device, when, *results):
    path.write_text(json.dumps({"machine_info": {"fastgen_device": device,
                                                 "fastgen_kernel_ceilings": {"copy_gbps": 10.0}},
                                "datetime": when, "benchmarks": list(results)}))
    return path


def test_a_run_is_compared_with_a_saved_baseline(tmp_path, capsys):
    before = _saved_run(tmp_path / "h100.json", "NVIDIA H100", "2026-11-20T10:00:00.000001",
                        _result("torch", "rms_norm", 4e-4), _result("triton", "rms_norm", 2e-4),
                        _result("triton", "attention", 1e-3, flops=10**9),
                        _result("triton", "rotary", 1e-4))
    after = _saved_run(tmp_path / "h200.json", "NVIDIA H200", "2026-11-27T09:30:00",
                       _result("torch", "rms_norm", 4e-4), _result("triton", "rms_norm", 1e-4),
                       _result("triton", "attention", 4e-3, flops=10**9),
                       _result("triton", "silu_and_mul", 1e-4))
    assert main(["bench", "kernels", "--load", str(after), "--baseline", str(before)]) == 0
    out = capsys.readouterr().out
    table, _, comparison = out.partition("\n\ncompared with ")
    assert table == format_table(json.loads(after.read_text()))
    lines = comparison.splitlines()
    assert lines[:4] == ["h100; a speedup above 1x is faster in h200",
                         "- h100: NVIDIA H100, copy 10.0 GB/s, 2026-11-20 10:00 UTC",
                         "- h200: NVIDIA H200, copy 10.0 GB/s, 2026-11-27 09:30 UTC",
                         "- not compared: 1 case(s) only in h200, 1 only in h100"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    assert rows[0] == ["op", "model", "shape", "dtype", "backend", "h100 time", "h200 time", "speedup",
                       "h100 % roof", "h200 % roof"]
    # The reference first, then each backend's cases in the suite's op order.
    assert rows[1:] == [
        ["rms_norm", "m", "decode_b1_ctx128", "float32", "torch", "400.0 us", "400.0 us", "1x", "25%", "25%"],
        ["attention", "m", "decode_b1_ctx128", "float32", "triton", "1.00 ms", "4.00 ms", "0.25x", "100%", "25%"],
        ["rms_norm", "m", "decode_b1_ctx128", "float32", "triton", "200.0 us", "100.0 us", "2x", "50%", "100%"]]
    assert lines[-2:] == [
        "kernels.torch: 1x geometric mean over 1 case(s), from 1x (rms_norm decode_b1_ctx128) to 1x "
        "(rms_norm decode_b1_ctx128)",
        "kernels.triton: 0.707x geometric mean over 2 case(s), from 0.25x (attention decode_b1_ctx128) "
        "to 2x (rms_norm decode_b1_ctx128)"]


def test_a_baseline_is_read_before_the_suite_runs_and_must_share_a_case(tmp_path, capsys):
    assert main(["bench", "kernels", "--quick", "--baseline", str(tmp_path / "missing.json")]) == 2
    captured = capsys.readouterr()
    assert "Cannot read" in captured.err and "passed" not in captured.err and captured.out == ""

    cpu = _saved_run(tmp_path / "cpu.json", "AMD EPYC", "", _result("torch", "rms_norm", 4e-4))
    gpu = {"benchmarks": [_result("torch", "rms_norm", 1e-5)]}
    gpu["benchmarks"][0]["extra_info"]["dtype"] = "bfloat16"
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    assert main(["bench", "kernels", "--load", str(tmp_path / "gpu.json"), "--baseline", str(cpu)]) == 2
    assert "gpu and cpu have no case in common (the same op, model, shape, dtype and backend)" in \
        capsys.readouterr().err
