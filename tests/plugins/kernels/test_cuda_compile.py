"""Every csrc/ source of kernels.cuda compiles to an object with nvcc (no GPU needed, no link), with
the flags torch's extension tools would use, so a syntax or type error fails CI on any machine
with the CUDA toolkit; the kernels are built for sm_90 too, and none may spill registers."""

from __future__ import annotations

import shutil

import pytest

from fastgen.plugins.kernels.cuda import build

NVCC = build.nvcc_path()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit, CUDA_HOME unset)")


# Every source through nvcc and ptxas takes 40 s on two cores: CI's slow step runs it, so a
# csrc/ change that does not compile still fails CI.
@pytest.mark.slow
def test_every_source_compiles_to_an_object(tmp_path):
    results = build.compile_objects(tmp_path, NVCC)
    assert {r.source.name for r in results} == {p.name for p in build.sources()}
    for r in results:
        assert r.returncode == 0, f"{r.source.name} does not compile:\n{' '.join(r.command)}\n{r.output}"
        assert (tmp_path / f"{r.source.name}.o").stat().st_size > 0
        if r.source.suffix == ".cu":
            # Built for sm_90 by ptxas too: every kernel within the register file, none spilling.
            assert r.registers and max(r.registers) <= 255, r.output
            assert r.spill_bytes == 0, f"{r.source.name} spills to local memory:\n{r.output}"


def test_a_broken_source_fails_the_check(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for header in build.CSRC.glob("*.*h"):
        shutil.copy(header, csrc)
    source = (build.CSRC / "kv_cache.cu").read_text()
    (csrc / "kv_cache.cu").write_text(source.replace("const int row =", "const int row +=", 1))
    [result] = build.compile_objects(tmp_path / "objects", NVCC, csrc)
    assert result.returncode != 0 and "kv_cache.cu" in result.output
