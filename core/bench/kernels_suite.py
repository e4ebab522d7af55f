"""The kernel-backend benchmark as a pytest-benchmark suite: every installed backend x dtype x
model shape x op, each result carrying bytes/s, FLOP/s and the fraction of the device's ceilings.

Two ways in, one suite:
- `pytest benchmarks/kernels [--backends torch,triton] [--ops attention] [--quick] ...`: that
  folder's conftest takes the hooks below and its test module takes `test_kernel`, so every
  pytest-benchmark flag (--benchmark-json, --benchmark-compare, ...) works as usual.
- `fastgen bench kernels ...` (`run_suite`): the same hooks and test through `pytest.main` on a
  two-line test module written to a temporary folder. This works from a fresh clone and from an
  installed fastgen alike, since nothing outside the `fastgen` package is needed, and a user's own
  pytest configuration and conftest files stay out of it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import pytest

from ..errors import FastgenError
from .kernel_check import check_case
from .device_timing import DeviceTimer, device_clock
from ..kv_memory import free_memory
from .kernels import REFERENCE_BACKEND, Selection, achieved, device_name, measure_ceilings

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests",
           "pytest_benchmark_update_machine_info", "kernel_ceilings", "kernel_reference", "test_kernel"]

_SELECTION = pytest.StashKey[Selection]()
# Fraction of the free memory a case may plan to use: the rest is headroom for the allocator.
_MEMORY_HEADROOM = 0.8
# Timed calls per case on a GPU (each one queued behind a spin and an L2 scrub: DeviceTimer).
GPU_ROUNDS, QUICK_GPU_ROUNDS = 30, 3


def pytest_addoption(parser) -> None:
    group = parser.getgroup("fastgen kernels", "fastgen kernel-backend benchmark")
    group.addoption("--backends", help="comma-separated kernel backends (default: every installed one)")
    group.addoption("--ops", help="comma-separated ops (default: all)")
    group.addoption("--models", help="comma-separated model shapes (default: all; quick: the small one)")
    group.addoption("--sets", help="comma-separated shape sets: decode, prefill, mixed (default: all)")
    group.addoption("--quick", action="store_true", help="small shapes only: seconds on a CPU")
    group.addoption("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    group.addoption("--dtype", help="comma-separated dtypes (default: bfloat16 on CUDA, float32 on CPU)")
    group.addoption("--threads", type=int, help="torch CPU threads (default: torch's)")
    group.addoption("--block-size", type=int,
                    help="tokens per KV cache block for write_kv and attention (default: 16)")
    group.addoption("--check", action="store_true",
                    help="also check each case's outputs against kernels.torch's on the same inputs")


def pytest_configure(config) -> None:
    import torch

    if config.getoption("threads"):
        torch.set_num_threads(config.getoption("threads"))
    try:
        sel = config.stash[_SELECTION] = Selection.from_options(
            backends=config.getoption("backends"), ops=config.getoption("ops"),
            models=config.getoption("models"), sets=config.getoption("sets"),
            quick=config.getoption("quick"), device=config.getoption("device"),
            dtypes=config.getoption("dtype"), block_size=config.getoption("block_size"))
    except FastgenError as e:
        raise pytest.UsageError(str(e)) from None
    if sel.device.type == "cuda" and sel.device.index is not None:
        # CUDA events record on the current device's stream: make it the benchmarked one
        # ("cuda" alone already names the current device).
        torch.cuda.set_device(sel.device)


def pytest_generate_tests(metafunc) -> None:
    if "kernel_case" not in metafunc.fixturenames:
        return
    sel = metafunc.config.stash[_SELECTION]
    free = free_memory(sel.device)
    # The benchmark fixture's clock: device time on a GPU (test_kernel's DeviceTimer), wall time on
    # a CPU. Quick runs are a smoke test of the suite: a few rounds each, whatever pytest-benchmark's
    # defaults.
    settings = {"timer": device_clock} if sel.device.type == "cuda" else {}
    settings.update({"max_time": 0.01, "min_rounds": 3} if sel.quick else {})
    marks = [pytest.mark.benchmark(**settings)] if settings else []
    params = []
    for case in sel.cases():
        need = case.footprint_bytes()
        case_marks = list(marks)
        if need > _MEMORY_HEADROOM * free:
            case_marks.append(pytest.mark.skip(reason=f"{case.id} needs about {need / 2**30:.1f} GiB "
                                                      f"and {sel.device} has {free / 2**30:.1f} GiB free"))
        params.append(pytest.param(case, id=case.id, marks=case_marks))
    for name, reason in sel.unavailable.items():
        params.append(pytest.param(None, id=f"{name}-unavailable",
                                   marks=pytest.mark.skip(reason=f"kernels.{name} is unavailable: {reason}")))
    metafunc.parametrize("kernel_case", params)


@pytest.fixture(scope="session")
def kernel_ceilings(request):
    sel = request.config.stash[_SELECTION]
    return measure_ceilings(sel.device, tuple(sel.dtypes), sel.quick)


@pytest.fixture(scope="session")
def kernel_reference(request):
    """The reference backend's class under --check, else None."""
    if not request.config.getoption("check"):
        return None
    from ..plugin_manager import load_plugins

    return load_plugins().registry.get("kernels", REFERENCE_BACKEND).cls


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info) -> None:
    sel = config.stash.get(_SELECTION, None)
    if sel is not None:
        machine_info["fastgen_device"] = device_name(sel.device)
        machine_info["fastgen_kernel_ceilings"] = measure_ceilings(
            sel.device, tuple(sel.dtypes), sel.quick).as_dict()


def test_kernel(benchmark, kernel_case, kernel_ceilings, kernel_reference, request) -> None:
    run = kernel_case.build()
    run()   # warm-up outside the timing: a JIT backend compiles here
    if kernel_case.device.type == "cuda":
        import torch

        torch.cuda.synchronize(kernel_case.device)
    benchmark.group = kernel_case.group
    benchmark.extra_info.update(kernel_case.info())
    if kernel_case.device.type == "cuda":
        # A fixed number of rounds: pytest-benchmark would size them by the device time, far
        # below each round's wall time (its spin, scrub and sync).
        timer = DeviceTimer(run, kernel_case.device)
        rounds = QUICK_GPU_ROUNDS if request.config.getoption("quick") else GPU_ROUNDS
        benchmark.pedantic(timer, rounds=rounds)
        benchmark.extra_info.update(timer.summary())
        del timer   # it holds `run`, whose inputs the check below must not keep alive
    else:
        benchmark(run)
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info.update(achieved(kernel_case.cost, benchmark.stats.stats.median,
                                             kernel_ceilings, kernel_case.dtype))
    if kernel_reference is not None and kernel_case.backend.name != REFERENCE_BACKEND:
        # After the timing, on fresh inputs: the timed calls may have written to theirs (write_kv).
        del run
        result = check_case(kernel_case, kernel_reference)
        benchmark.extra_info.update(check_ok=result.ok, check=result.summary)
        assert result.ok, f"differs from kernels.{REFERENCE_BACKEND}: {result.summary}"


class _Notes:
    """Collects why cases were skipped and which failed, for the table's notes."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.failed: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            if reason not in self.reasons:
                self.reasons.append(reason)
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            error = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
            case = report.nodeid.partition("[")[2].rstrip("]") or report.nodeid
            self.failed.append(case)
            self.reasons.append(f"{case} FAILED: {error}")


_TEST_MODULE = "from fastgen.bench.kernels_suite import test_kernel  # noqa: F401\n"


def run_suite(*, backends=None, ops=None, models=None, sets=None, quick=False, device="auto",
              dtypes=None, threads=None, json_path=None, keyword=None, check=False,
              block_size=None) -> tuple[dict, list[str], list[str]]:
    """Run the suite in this process; its output goes to stderr. Returns pytest-benchmark's JSON,
    notes (why cases were skipped or failed) and the ids of failed cases: one backend failing an
    op does not hide the others' results. Bad options raise before anything runs."""
    Selection.from_options(backends=backends, ops=ops, models=models, sets=sets, quick=quick,
                           device=device, dtypes=dtypes, block_size=block_size)
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise FastgenError("fastgen bench kernels needs pytest-benchmark; "
                           "install it with `pip install pytest-benchmark`.") from None
    options = {"--backends": backends, "--ops": ops, "--models": models, "--sets": sets,
               "--device": device, "--dtype": dtypes, "--threads": threads,
               "--block-size": block_size, "-k": keyword}
    with tempfile.TemporaryDirectory(prefix="fastgen-kernels-") as tmp:
        folder = Path(tmp)
        (folder / "test_kernels.py").write_text(_TEST_MODULE)
        (folder / "pytest.ini").write_text("[pytest]\n")
        out = Path(json_path) if json_path else folder / "results.json"
        args = [str(folder / "test_kernels.py"), "-c", str(folder / "pytest.ini"), "--rootdir", tmp,
                "--noconftest", "-p", "no:cacheprovider", "--import-mode=importlib", "-q", "-rs",
                f"--benchmark-json={out}", "--benchmark-disable-gc", "--benchmark-sort=name",
                "--benchmark-columns=min,median,iqr,rounds"]
        # Enough rounds for a stable median without pytest-benchmark's second per case.
        args += ["--quick"] if quick else ["--benchmark-min-rounds=5", "--benchmark-max-time=0.2"]
        args += ["--check"] if check else []
        for flag, value in options.items():
            if value:
                args += [flag, ",".join(value) if isinstance(value, list) else str(value)]
        notes = _Notes()
        # stdout carries only the table: pytest's own report goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            code = pytest.main(args, plugins=[sys.modules[__name__], notes])
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            raise FastgenError(f"The kernel benchmark did not run (pytest exit code {int(code)}); "
                               f"its report above says why (no case selected: widen the options or -k).")
        results = json.loads(out.read_text()) if out.exists() else {"benchmarks": []}
    return results, notes.reasons, notes.failed
