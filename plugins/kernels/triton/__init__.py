"""kernels.triton: Triton kernels for every op of the set; a CUDA GPU, or TRITON_INTERPRET=1 on CPU.

This module and backend.py import without triton: the kernel modules are imported only when a
TritonBackend is made, so a machine without triton still lists the plugin and says why it can't run.
"""

import fastgen

from .backend import TritonBackend


@fastgen.hookimpl
def register_kernels(register):
    register(TritonBackend)
