"""Shared plumbing of cirrus's child processes (training and preprocessing workers)."""

from __future__ import annotations

import asyncio
import sys


async def stdin_closed() -> None:
    """Return once our stdin reaches end of file: the process that started us closed it or died."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(1 << 12):
        pass
