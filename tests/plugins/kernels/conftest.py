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

from fastgen.plugin_manager import load_plugins  # noqa: E402
from fastgen.ragged_batch import RaggedBatch  # noqa: E402
from fastgen.request import SamplingParams, Sequence  # noqa: E402

CPU = torch.device("cpu")
REFERENCE = "torch"
BLOCK_SIZE_DEFAULT = 16


def usable_backends() -> list[str]:
    """Registered kernel backends that can run on the CPU here, the reference excluded."""
    items = load_plugins().registry.items["kernels"]
    return sorted(name for name, info in items.items()
                  if name != REFERENCE and not info.cls.unavailable_reason(CPU))


def make_backend(name: str):
    return load_plugins().registry.get("kernels", name).cls(CPU)


@pytest.fixture(params=usable_backends(), ids=lambda n: f"kernels.{n}")
def backend(request):
    return make_backend(request.param)


@pytest.fixture
def reference():
    return make_backend(REFERENCE)


def ragged_batch(shapes: list[tuple[int, int]], block_size: int, num_blocks: int,
                 seed: int = 0) -> RaggedBatch:
    """A batch of sequences given as (cached tokens, new tokens), on shuffled cache blocks.

    The blocks are drawn at random from the pool, so a kernel that reads the cache in block-id
    order instead of through the block table gets the wrong keys.
    """
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    scheduled = []
    for i, (cached, new) in enumerate(shapes):
        total = cached + new
        seq = Sequence(f"s{i}", [1] * total, SamplingParams())
        seq.num_computed = cached
        seq.block_ids = [free.pop() for _ in range(-(-total // block_size))]
        scheduled.append((seq, new))
    return RaggedBatch.build(scheduled, block_size, CPU)
