"""kernels.cuda: every op but sampling as a CUDA extension built from csrc/.

Registered everywhere, so `fastgen plugins` lists it with the reason it cannot run where it cannot;
the extension is built (or loaded from its cache) only when the backend is made.
"""

import fastgen

from .backend import CudaBackend


@fastgen.hookimpl
def register_kernels(register):
    register(CudaBackend)
