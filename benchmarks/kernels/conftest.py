"""The kernel-backend suite's options, parametrisation and ceilings fixture live in the package
(`fastgen.bench.kernels_suite`), so that `fastgen bench kernels` runs the same suite from an
installed fastgen; this conftest only hands them to pytest for `pytest benchmarks/kernels`."""

from fastgen.bench.kernels_suite import (  # noqa: F401
    kernel_ceilings,
    kernel_reference,
    pytest_addoption,
    pytest_benchmark_update_machine_info,
    pytest_configure,
    pytest_generate_tests,
)
