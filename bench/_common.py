"""Pieces shared by the benchmark workers and the store-backed collectives.

* :func:`emit`, :func:`run_on_loop` and :func:`report_error`: the JSON-lines output and the
  start and error reporting of a worker process (bench/_worker.py, bench/_sort_worker.py);
* :func:`close_comm`: closes a worker's ``comm`` and then its ``store``, each if it was opened;
* :class:`PollingComm`: what bench/redis_backend.py's RedisComm and bench/s3_backend.py's S3Comm
  have in common: fixed membership, one key prefix per collective call, polling with a deadline,
  background clean-ups, and allreduce and shuffle built on reduce, broadcast and
  ``shuffle_parts``.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from typing import Any, Awaitable, Callable, ClassVar

import numpy as np

from bench._partition import partition


def emit(**record: Any) -> None:
    """Print one JSON line on stdout, flushed."""
    print(json.dumps(record), flush=True)


def run_on_loop(main: Callable[[], Awaitable[None]], loop: str | None) -> None:
    """Run ``main()`` to completion on uvloop if ``loop`` is ``"uvloop"``, else on asyncio's."""
    if loop == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())


def report_error(cfg: dict, phase: str, exc: BaseException) -> None:
    """Emit ``{"type": "error", "rank", "phase", "error"}`` for the exception being handled and
    print its traceback on stderr (a bare timeout is named after the worker deadline)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not str(exc):
        exc = TimeoutError(f"timed out after the worker deadline of {cfg['timeout']:.0f}s")
    emit(type="error", rank=cfg["rank"], phase=phase, error=f"{type(exc).__name__}: {exc}")
    traceback.print_exc(file=sys.stderr)


async def close_comm(owner: Any) -> None:
    """Close ``owner.comm``, then ``owner.store`` even if that failed (each only if set)."""
    try:
        if hasattr(owner, "comm"):
            await owner.comm.aclose()
    finally:
        if hasattr(owner, "store"):
            await owner.store.aclose()


class PollingComm:
    """Collectives among ``size`` fixed ranks through a store that the receivers poll.

    A subclass sets :attr:`SEP` (between the parts of a key), :attr:`TIMEOUT` (the exception of
    a missed deadline) and :attr:`STORED` (what the store holds, for error messages), and
    implements ``_ping``, ``barrier``, ``broadcast``, ``reduce`` and ``shuffle_parts``.

    Polling: the first ``poll_spin`` seconds of a wait re-poll back to back; after that the
    poller sleeps between polls, ``poll_sleep`` at first and twice as long after every empty
    poll up to ``poll_max`` (by default ``poll_sleep``: a fixed pause).
    """

    SEP: ClassVar[str]
    TIMEOUT: ClassVar[type[Exception]]
    STORED: ClassVar[str]

    def __init__(self, rank: int, size: int, prefix: str, *, timeout: float, poll_spin: float,
                 poll_sleep: float, poll_max: float | None = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} not in [0, {size})")
        self.rank, self.size, self.prefix = rank, size, prefix
        self.timeout, self.poll_spin, self.poll_sleep = timeout, poll_spin, poll_sleep
        self.poll_max = poll_sleep if poll_max is None else max(poll_max, poll_sleep)
        self._seq = 0
        self._background: set[asyncio.Task] = set()
        self._errors: list[BaseException] = []

    async def _ping(self) -> None:
        """Check that the store is reachable."""
        raise NotImplementedError

    async def __aenter__(self) -> "PollingComm":
        await self._ping()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Finish the background clean-ups."""
        await self._finish_background()

    async def _finish_background(self) -> None:
        """Wait for the background clean-ups; raise RuntimeError if one of them failed."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._errors:
            raise RuntimeError(f"rank {self.rank}: {self.STORED} clean-up failed: "
                               f"{self._errors[0]!r}")

    # -- helpers ---------------------------------------------------------------------------
    def _next(self) -> str:
        """The key prefix of the next collective call."""
        self._seq += 1
        return f"{self.prefix}{self.SEP}{self._seq}"

    async def _poll(self, attempt: Callable[[], Awaitable[bool]], what: Callable[[], str],
                    timeout: float | None) -> None:
        """Repeat ``attempt`` (one or a few requests) until it reports success or the deadline."""
        start = time.perf_counter()
        limit = self.timeout if timeout is None else timeout
        pause = self.poll_sleep
        while not await attempt():
            now = time.perf_counter()
            if now - start > limit:
                raise self.TIMEOUT(f"rank {self.rank}/{self.size}: {what()} not complete "
                                   f"after {limit:.1f}s")
            if now - start > self.poll_spin:
                await asyncio.sleep(pause)
                pause = min(2 * pause, self.poll_max)

    def _in_background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._errors.append(t.exception())
        task.add_done_callback(done)

    # -- collectives -----------------------------------------------------------------------
    async def reduce(self, obj: Any, op: Callable = np.add, root: int = 0,
                     timeout: float | None = None) -> Any:
        raise NotImplementedError

    async def broadcast(self, obj: Any = None, root: int = 0, timeout: float | None = None) -> Any:
        raise NotImplementedError

    async def shuffle_parts(self, parts: list[np.ndarray],
                            timeout: float | None = None) -> list[np.ndarray]:
        """All-to-all: ``parts[d]`` goes to rank ``d``; return the parts sent to this rank, one
        per source rank (its own part is returned as given, not copied)."""
        raise NotImplementedError

    async def allreduce(self, obj: Any, op: Callable = np.add, timeout: float | None = None) -> Any:
        """Reduce to rank 0, then broadcast the result from rank 0."""
        result = await self.reduce(obj, op=op, root=0, timeout=timeout)
        return await self.broadcast(result, root=0, timeout=timeout)

    async def shuffle(self, arr: np.ndarray, n: int | None = None,
                      hash_function: Callable[[np.ndarray, int], np.ndarray] | None = None,
                      timeout: float | None = None) -> np.ndarray:
        """Send every item to rank ``hash_function(item, n)`` (default ``item % n``); return the
        items sent to this rank (in source order, sources 0..size-1)."""
        n = self.size if n is None else n
        if n != self.size:
            raise ValueError(f"shuffle over {n} receivers but {self.size} ranks (all are BOTH)")
        parts = partition(np.asarray(arr), n, hash_function)
        if self.size == 1:
            return parts[0].copy()
        return np.concatenate(await self.shuffle_parts(parts, timeout=timeout))

    def _check_parts(self, parts: list[np.ndarray]) -> None:
        if len(parts) != self.size:
            raise ValueError(f"{len(parts)} parts for {self.size} ranks")
