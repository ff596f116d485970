"""Waiting in tests without sleeping for time: poll a predicate under a deadline, and ask
``/proc`` whether a process is gone."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


async def until(pred: Callable[[], Any], what: str = "a condition", limit: float = 30.0,
                step: float = 0.02) -> Any:
    """Poll ``pred`` (a function, sync or async) until it returns something truthy, which is
    returned; AssertionError naming ``what`` after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if loop.time() > give_up:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(step)


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (no longer in /proc, or a zombie / dead entry awaiting reaping)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
