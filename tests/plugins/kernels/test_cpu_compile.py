"""Every csrc/ source of kernels.cpu compiles to an object for every CPU capability torch
dispatches to (AVX512, AVX2, and the plain C++ fallback), not only for this machine's, so a source
that a CPU with other vector instructions cannot build fails CI here. The objects are not run."""

from __future__ import annotations

import shutil

import pytest

from fastgen.plugins.kernels.cpu import build

pytestmark = [pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler (set CXX or install g++)"),
              pytest.mark.slow]   # about a minute of compiling on 2 cores


def test_every_source_compiles_for_every_capability(tmp_path):
    results = build.compile_objects(tmp_path)
    assert {(r.source.name, r.target) for r in results} == {
        (p.name, c) for p in build.sources() for c in ("AVX512", "AVX2", "DEFAULT")}
    for r in results:
        assert r.returncode == 0, f"{r.source.name} does not compile for {r.target}:\n{' '.join(r.command)}\n{r.output}"
        assert (tmp_path / f"{r.source.stem}.{r.target}.o").stat().st_size > 0


def test_a_source_only_one_capability_rejects_fails_the_check(tmp_path):
    # ATen's vec.h brings its reductions and bf16 loads (functional.h) along with AVX2's vector
    # types, not with AVX512's: a source that leans on that builds for AVX2 alone, as kernels.cpu's
    # attention once did.
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "reduce.cpp").write_text(
        "#include <ATen/cpu/vec/vec.h>\n"
        "float lane_sum(const at::vec::Vectorized<float>& v) {\n"
        "  using Vec = at::vec::Vectorized<float>;\n"
        "  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);\n"
        "}\n")
    results = {r.target: r for r in build.compile_objects(tmp_path / "objects", ["AVX2", "AVX512"], csrc)}
    assert results["AVX2"].returncode == 0, results["AVX2"].output
    assert results["AVX512"].returncode != 0 and "vec_reduce_all" in results["AVX512"].output
