"""DeviceTimer on a CUDA GPU: the host's time to launch a call stays out of its device time."""

from __future__ import annotations

import time

import pytest
import torch

from fastgen.bench.device_timing import DeviceTimer, device_clock

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda")


def test_host_time_between_launches_is_not_device_time():
    x = torch.zeros(1, device=DEVICE)

    def slow_to_launch():
        x.add_(1)
        time.sleep(2e-3)   # the host dawdles between two tiny kernels
        return x.add_(1)

    timer = DeviceTimer(slow_to_launch, DEVICE)
    for _ in range(3):
        assert timer() is x
    assert timer.host_waits == 0
    assert min(timer.host_times) >= 2e-3
    # Two one-element adds, back to back: microseconds, not the host's 2 ms.
    assert max(timer.device_times) < 5e-4, timer.device_times


def test_a_call_that_waits_for_the_gpu_is_timed_and_marked():
    x = torch.zeros(1, device=DEVICE)
    timer = DeviceTimer(lambda: x.add_(1).item(), DEVICE)
    for _ in range(2):
        timer()
    assert timer.host_waits == 2
    assert len(timer.device_times) == 2


def test_the_clock_advances_by_each_calls_device_time():
    x = torch.randn(1 << 20, device=DEVICE)
    timer = DeviceTimer(lambda: x.mul_(1.0), DEVICE)
    before = device_clock()
    timer()
    timer()
    assert device_clock() - before == pytest.approx(sum(timer.device_times))
    assert all(t > 0 for t in timer.device_times)
