"""Waiting, in a test, for what another thread or process does: a condition polled until a
deadline, which fails the test with what it waited for."""

from __future__ import annotations

import asyncio
import time


def wait_until(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def wait_until_async(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    """As wait_until, letting the event loop run between polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
