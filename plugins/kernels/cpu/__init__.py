"""kernels.cpu: paged attention, KV cache write, RMSNorm, rotary and SiLU-and-mul as C++ CPU kernels.

Registered everywhere, so `fastgen plugins` lists it with the reason it cannot run where it cannot;
the library is built (or loaded from its cache) only when the backend is made.
"""

import fastgen

from .backend import CpuBackend


@fastgen.hookimpl
def register_kernels(register):
    register(CpuBackend)
