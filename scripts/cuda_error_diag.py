"""Which C++ errors end the process instead of raising, on a GPU machine (issue 5's open crash).

On one H200 machine (torch 2.11.0+cu130, 2026-11-27) every argument error of kernels.cuda's ops
(`TORCH_CHECK` in plugins/kernels/cuda/csrc/ops.cpp) ended Python with a segmentation fault,
while torch's own errors raised. This runs each case in a process of its own and prints one line
per case; where `cuda-gdb` is installed, it reruns a crashing case under it and prints the native
backtrace (the frames faulthandler cannot show). Run it on the GPU machine with fastgen importable:

    python3 scripts/cuda_error_diag.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys

CASE = r"""
import sys
import torch

which = sys.argv[1]
x = torch.randn(4, 64, device="cuda")
try:
    if which == "torch":
        x.view(3)
    else:
        from fastgen.plugins.kernels.cuda import build

        build.load()
        torch.ops.fastgen_cuda.rms_norm(x, torch.ones(32, device="cuda"), 1e-6)
    print("no error raised")
except RuntimeError as e:
    print("RuntimeError:", str(e).splitlines()[0][:100])
"""


def main() -> int:
    crashed = []
    for which in ("torch", "fastgen_cuda"):
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CASE, which],
                              capture_output=True, text=True)
        said = (done.stdout.strip().splitlines() or ["(nothing)"])[-1]
        print(f"{which:13} exit {done.returncode:4}  {said}")
        if done.returncode:
            crashed.append(which)
    gdb = shutil.which("cuda-gdb")
    for which in crashed:
        if gdb is None:
            print("cuda-gdb not found: no native backtrace")
            break
        done = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable,
                               "-c", CASE, which], capture_output=True, text=True, timeout=300)
        frames = [line for line in done.stdout.splitlines() if line.startswith("#")]
        print(f"--- {which} under cuda-gdb:", *frames, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
