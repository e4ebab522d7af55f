"""kernels.torch: the PyTorch reference backend, ground truth for the others and the CPU serving path."""

import fastgen

from .backend import TorchBackend


@fastgen.hookimpl
def register_kernels(register):
    register(TorchBackend)
