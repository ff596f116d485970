"""Shared plumbing of the command-line entry points."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed, else asyncio's default (no global policy)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Callable[[asyncio.Event], Awaitable[int]], *, verbose: bool = False) -> int:
    """Run ``main(stop_event)``; SIGINT / SIGTERM set the event instead of killing."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(wrapper())


def write_ready_file(path: str, text: str) -> None:
    """Write ``text`` and a newline to ``path`` atomically (scripts and tests wait for it)."""
    import os

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
