"""The (kernel backend, device) pairs that tests run: every registered backend on every device of
this machine where it says it can run, so a GPU machine tests the GPU backends with no flag.

A module of its own at the top of tests/, since both the kernel and the model tests use it.
The Triton interpreter must be decided (TRITON_INTERPRET) before this is called: it decides
whether kernels.triton can run on the CPU.
"""

from __future__ import annotations

import torch

from fastgen.plugin_manager import load_plugins

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def devices() -> list[torch.device]:
    """The CPU, and the GPU when torch sees one."""
    return [CPU, CUDA] if torch.cuda.is_available() else [CPU]


def kernel_targets() -> list[tuple[str, torch.device]]:
    """(backend name, device) for every registered kernel backend and device where it can run."""
    items = load_plugins().registry.items["kernels"]
    return [(name, device) for name, info in sorted(items.items()) for device in devices()
            if not info.cls.unavailable_reason(device)]


def target_id(name: str, device: torch.device) -> str:
    """How a target reads in a test id: `triton-cuda`."""
    return f"{name}-{device.type}"
