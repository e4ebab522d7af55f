"""Kernel backend conformance: every registered backend that can run on the CPU here, against kernels.torch.

TRITON_INTERPRET must be set before any Triton kernel module is imported (triton decides at
decoration time whether to compile or interpret), so it is set here, at collection, when no GPU
is present; backends import their kernel modules lazily, when made.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_batches import REFERENCE, make_backend, ragged_batch, usable_backends  # noqa: E402,F401


@pytest.fixture(params=usable_backends(), ids=lambda n: f"kernels.{n}")
def backend(request):
    return make_backend(request.param)


@pytest.fixture
def reference():
    return make_backend(REFERENCE)
