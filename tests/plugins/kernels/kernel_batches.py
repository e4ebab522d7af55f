"""Helpers for the kernel backend tests: backends on the devices where they run, and ragged batches.

A module of its own, not conftest.py: every test folder has a conftest, and a plain
`import conftest` gets whichever was imported last.
"""

from __future__ import annotations

import pytest
import torch

from fastgen.plugin_manager import load_plugins
from fastgen.ragged_batch import RaggedBatch
from fastgen.request import SamplingParams, Sequence
from kernel_targets import CPU, kernel_targets, target_id

REFERENCE = "torch"
BLOCK_SIZE_DEFAULT = 16


def devices_for(name: str) -> list[torch.device]:
    """The devices here where backend `name` runs (kernels.triton: the GPU, or the CPU under the
    interpreter), so a test of one backend runs where it can, with no flag."""
    return [device for backend, device in kernel_targets() if backend == name]


def device_fixture(name: str):
    """A `device` fixture over devices_for(name), for a module that tests backend `name` alone:
    `device = device_fixture("triton")`."""
    @pytest.fixture(params=devices_for(name), ids=lambda d: d.type)
    def device(request):
        return request.param
    return device


# kernels.cuda on the CPU: its kernels run by the emulator (cuda_emulator.py), where that builds.
EMULATED_CUDA = ("cuda", CPU)


def with_emulated_cuda(targets: list[tuple[str, torch.device]]) -> list[tuple[str, torch.device]]:
    """targets, and kernels.cuda emulated on the CPU where the emulator builds."""
    import cuda_emulator

    return [*targets, EMULATED_CUDA] if cuda_emulator.available() is None else list(targets)


def target_name(target: tuple[str, torch.device]) -> str:
    """A target in a test id: `triton-cuda`, `cuda-emulated`."""
    return "cuda-emulated" if target == EMULATED_CUDA else target_id(*target)


def make_backend(name: str, device: torch.device = CPU):
    if (name, device) == EMULATED_CUDA:
        from cuda_emulator import EmulatedCudaBackend

        return EmulatedCudaBackend(device)
    return load_plugins().registry.get("kernels", name).cls(device)


def ragged_batch(shapes: list[tuple[int, int]], block_size: int, num_blocks: int,
                 seed: int = 0, device: torch.device = CPU) -> RaggedBatch:
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
    return RaggedBatch.build(scheduled, block_size, device)


def poisoned_outside_keys(cache: torch.Tensor, batch: RaggedBatch, value: float) -> torch.Tensor:
    """A copy of `cache` [num_blocks, block_size, ...] holding `value` in every slot that is none
    of the batch's keys: the rest of each sequence's last block (left by the block's earlier owner,
    a request whose model overflowed in float16, say), other blocks, and block 0, which a short row
    of the block table is padded with."""
    num_blocks, block_size = cache.shape[:2]
    keys = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    offsets = torch.arange(block_size)
    for table, seq_len in zip(batch.block_tables.tolist(), batch.seq_lens.tolist()):
        keys[(torch.tensor(table)[:, None] * block_size + offsets).flatten()[:seq_len]] = True
    hidden = ~keys.view(num_blocks, block_size, *[1] * (cache.dim() - 2))
    return cache.masked_fill(hidden.to(cache.device), value)
