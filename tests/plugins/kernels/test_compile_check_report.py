"""The report of `python -m fastgen.plugins.kernels.{cpu,cuda}.build --check`: a line per source,
the compiler's output where one failed, and the exit code."""

from __future__ import annotations

from pathlib import Path

from fastgen.plugins.kernels.compiled import CompileResult, report_check


def test_every_source_gets_a_line_and_a_failure_its_output_and_exit_1(capsys):
    results = [CompileResult(Path("csrc/attention.cpp"), ["c++"], 0, "fine", "AVX2"),
               CompileResult(Path("csrc/ops.cpp"), ["c++"], 1, "ops.cpp:3: error: nope", "AVX512")]
    assert report_check(results, verbose=False, detail=lambda r: " (checked)") == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["ok     attention.cpp for AVX2 (checked)", "FAILED ops.cpp for AVX512 (checked)"]
    assert err.strip() == "ops.cpp:3: error: nope"


def test_all_compiled_is_exit_0_and_verbose_shows_every_output(capsys):
    results = [CompileResult(Path("kv_cache.cu"), ["nvcc"], 0, "ptxas info", "")]
    assert report_check(results, verbose=True) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ok     kv_cache.cu" and err.strip() == "ptxas info"
