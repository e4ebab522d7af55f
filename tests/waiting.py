"""Waiting, in a test, for what another thread or process does: a condition polled until a
deadline, past which the test fails."""

from __future__ import annotations

import asyncio
import time


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        time.sleep(0.01)


async def wait_until_async(condition, timeout: float = 10.0) -> None:
    """As wait_until, letting the event loop run between polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        await asyncio.sleep(0.01)
