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


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued now, behind the work
    that computes them, and `tolist()` waits for it alone, so the host can queue more work first."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
