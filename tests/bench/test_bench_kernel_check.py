"""`fastgen bench kernels --check`: every timed case's outputs against kernels.torch's on the same
inputs. A backend that is fast and wrong fails the cases where it is wrong, and says how."""

from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen.bench.kernels import format_table
from fastgen.bench.kernels_suite import run_suite
from fastgen.plugin_manager import load_plugins
from fastgen.plugins.kernels.cpu.backend import CpuBackend
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend


class _Careless(TorchBackend):
    """The reference, but wrong in three ops: silu_and_mul drops the gate, write_kv writes keys
    where the values go, and sampling takes each row's least likely token."""

    name = "careless"

    def silu_and_mul(self, x):
        return x[:, x.shape[1] // 2:]

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping):
        super().write_kv(key, key, k_cache, v_cache, slot_mapping)

    def sample(self, logits, meta, generator=None):
        return logits.argmin(dim=-1)


class _CarelessPlugin:
    @fastgen.hookimpl
    def register_kernels(self, register):
        register(_Careless)


def test_a_backend_is_failed_where_its_outputs_differ_and_passed_where_they_agree():
    manager = load_plugins()
    manager.register(_CarelessPlugin(), name="kernels.careless")
    try:
        results, notes, failed = run_suite(backends="careless", sets="decode", quick=True, device="cpu",
                                           check=True)
    finally:
        manager.unregister("kernels.careless")
    case = "careless-float32-smollm2-135m-decode_b4_ctx128-"
    assert failed == [case + "write_kv", case + "silu_and_mul", case + "sample"]
    reasons = dict(note.split(" FAILED: ") for note in notes)
    assert reasons[case + "write_kv"].startswith(
        "AssertionError: differs from kernels.torch: values: 768 of 768 differ, max |diff| ")
    assert reasons[case + "silu_and_mul"].startswith("AssertionError: differs from kernels.torch: out: ")
    assert "4 of 4 draws outside their rows' kept sets (row 0: token " in reasons[case + "sample"]
    checks = {b["extra_info"]["op"]: b["extra_info"] for b in results["benchmarks"]}
    assert {op: info["check_ok"] for op, info in checks.items()} == {
        "write_kv": False, "attention": True, "rms_norm": True, "rotary": True, "silu_and_mul": False,
        "linear": True, "sample": False}
    assert checks["rms_norm"]["check"] == "max |diff| 0 (atol 2e-05, rtol 1e-05)"
    # The table keeps the wrong cases' times, marked, under a line that counts the checks.
    table = format_table(results, notes).splitlines()
    assert table[1] == ("checked against torch on the same inputs: 4 of 7 case(s) agree, 3 differ "
                        "(marked beside their times; the notes say how)")
    silu = next(line for line in table if line.startswith("| silu_and_mul |"))
    assert silu.split(" | ")[4].endswith(" (differs)")
    norm = next(line for line in table if line.startswith("| rms_norm |"))
    assert "differs" not in norm


@pytest.mark.skipif(CpuBackend.unavailable_reason(torch.device("cpu")) is not None,
                    reason="kernels.cpu cannot be built here")
def test_kernels_cpu_agrees_with_the_reference_on_every_quick_case():
    results, notes, failed = run_suite(backends="cpu", quick=True, device="cpu", threads=2, check=True)
    assert failed == [] and notes == []
    infos = [b["extra_info"] for b in results["benchmarks"]]
    assert len(infos) == 28 and all(info["check_ok"] for info in infos)
    assert format_table(results).splitlines()[1] == "checked against torch on the same inputs: 28 of 28 case(s) agree"
