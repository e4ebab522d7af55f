"""Every csrc/ source of kernels.cuda compiles to an object with nvcc (no GPU needed, no link), with
the flags torch's extension tools would use, so a syntax or type error fails CI on any machine
with the CUDA toolkit. Slow: nvcc spends most of a minute per source in torch's headers."""

from __future__ import annotations

import shutil

import pytest

from fastgen.plugins.kernels.cuda import build

NVCC = build.nvcc_path()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit, CUDA_HOME unset)")]


def test_every_source_compiles_to_an_object(tmp_path):
    results = build.compile_objects(tmp_path, NVCC)
    assert {r.source.name for r in results} == {p.name for p in build.sources()}
    for r in results:
        assert r.returncode == 0, f"{r.source.name} does not compile:\n{' '.join(r.command)}\n{r.output}"
        assert (tmp_path / f"{r.source.name}.o").stat().st_size > 0


def test_a_broken_source_fails_the_check(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    shutil.copy(build.CSRC / "common.h", csrc)
    broken = (build.CSRC / "ops.cpp").read_text().replace("m.def(", "m.def((", 1)
    (csrc / "ops.cpp").write_text(broken)
    [result] = build.compile_objects(tmp_path / "objects", NVCC, csrc)
    assert result.returncode != 0 and "ops.cpp" in result.output
