"""Every installed kernel backend x dtype x model shape x op, timed by pytest-benchmark.

    pytest benchmarks/kernels --quick                        # seconds on a CPU
    pytest benchmarks/kernels --backends torch,triton --ops attention --benchmark-json=out.json
    pytest-benchmark compare a.json b.json                  # across runs and machines

`fastgen bench kernels` runs the same suite and prints one comparison table.
"""

from fastgen.bench.kernels_suite import test_kernel  # noqa: F401
