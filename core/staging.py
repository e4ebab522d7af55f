"""Host buffers that a step's metadata is written into and copied to the device from.

A step builds its metadata on the host (lists and numpy) and packs it into a few buffers, one
transfer each, rather than one small tensor, and one copy, per field.
"""

from __future__ import annotations

import torch


def staging_buffer(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised host tensor bound for `device`: pinned for a CUDA device, so that its copy
    runs asynchronously (torch's pinned allocator hands the memory out again only after that copy
    has ended)."""
    return torch.empty(size, dtype=dtype, pin_memory=device.type == "cuda")


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` itself on the CPU, else its copy on `device`, queued without waiting."""
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def staged(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[len(values)] on `device`, through a staging buffer."""
    host = staging_buffer(len(values), dtype, device)
    host.numpy()[:] = values
    return to_device(host, device)
