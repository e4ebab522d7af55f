"""Device time of a call on a CUDA GPU, without the host's launch time and with a cold L2 cache.

Timing a call with an event before and after it, from an idle stream, counts the host's time to
launch its kernels too: the GPU waits for each launch. A Triton kernel takes 20-40 us of Python to
launch (NVIDIA H200, 2026-11-27): one sequence's decode over 128 keys, a few microseconds of
device work, timed at 102 us. And a case whose inputs fit in the L2 cache (50 MB on an H100, 60 MB
on an H200: one layer's keys and values of one 8192-token sequence of Llama-3-8B are 32 MB) times
the cache, not the memory, when run again on the same inputs.

So `DeviceTimer` times each call the way the call runs inside a captured CUDA graph or a busy
stream: it first queues a spin kernel (`torch.cuda._sleep`) and a read of twice the L2's size,
then the events and the call. The host queues the call's launches while the GPU spins, so the
events measure the kernels back to back, on a cache that holds none of their inputs. The host's
time to queue the call is kept apart, as the call's launch cost.

If the GPU reached the first event before the host had queued the whole call (the spin was too
short, or the call waits for the GPU itself, e.g. with `.item()`), the call is timed again with a
spin twice as long; a call that still does is timed as it is and marked `host_waits`: its time
includes the host's.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

# The first spin: longer than most calls take to queue. Doubled while too short, up to the last.
_FIRST_SPIN_S = 200e-6
_LONGEST_SPIN_S = 50e-3
# torch.cuda._sleep counts clock cycles; a rough rate is enough, the spin only has to outlast the host.
_CYCLES_PER_S = 2e9
# Without a reported L2 size: more than any current GPU's (H100 50 MB, H200 60 MB, B200 126 MB).
_DEFAULT_L2_BYTES = 128 << 20

_device_seconds = 0.0


def device_clock() -> float:
    """Seconds of device time measured by every DeviceTimer call so far: a pytest-benchmark timer
    whose difference around a DeviceTimer call is that call's device time."""
    return _device_seconds


class DeviceTimer:
    """Calls `fn` and times it on the device, one call per call (see the module's docstring).

    `device_times` and `host_times` hold every call's seconds; `host_waits` counts the calls the
    host did not queue ahead of the GPU, whose device time includes host time."""

    def __init__(self, fn: Callable[[], object], device: torch.device) -> None:
        self.fn = fn
        self.device = device
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _DEFAULT_L2_BYTES
        # Read, not written, between calls: a write would leave the L2 full of dirty lines, whose
        # write-back the timed call would pay for as it evicts them.
        self._scrub = torch.zeros(2 * l2, dtype=torch.uint8, device=device)
        self._spin_s = _FIRST_SPIN_S
        self.device_times: list[float] = []
        self.host_times: list[float] = []
        self.host_waits = 0

    def __call__(self):
        global _device_seconds
        with torch.cuda.device(self.device):
            while True:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(int(self._spin_s * _CYCLES_PER_S))
                self._scrub.sum()
                t0 = time.perf_counter()
                start.record()
                result = self.fn()
                end.record()
                host = time.perf_counter() - t0
                queued_ahead = not start.query()
                if queued_ahead or self._spin_s >= _LONGEST_SPIN_S:
                    break
                end.synchronize()
                self._spin_s *= 2
            end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        self.device_times.append(seconds)
        self.host_times.append(host)
        self.host_waits += not queued_ahead
        _device_seconds += seconds
        return result

    def summary(self) -> dict:
        """The median host time to queue a call, and how many calls the host could not queue ahead."""
        return {"host_seconds": statistics.median(self.host_times) if self.host_times else None,
                "host_waits": self.host_waits}

