"""Worker launchers: where training workers run.

:class:`LocalLauncher` (the default) runs each worker as a local process, like a lambda: an address-
space cap of ``worker_size`` MB, a ``lifetime`` after which it is retired (the parameter server
refuses its incarnation from then on) and replaced by a new incarnation, and a dead worker is
replaced too. Worker-seconds are counted for the cost model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

Retire = Callable[[str, int], Awaitable[None]]


@dataclass
class _Slot:
    index: int
    inc: int = -1
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    retiring: list[tuple[asyncio.subprocess.Process, float]] = field(default_factory=list)


class LocalLauncher:
    def __init__(self, spec: dict[str, Any], n_workers: int, *, worker_size_mb: int | None = None,
                 lifetime: float | None = None, retire: Retire | None = None) -> None:
        self.spec = spec
        self.slots = [_Slot(i) for i in range(n_workers)]
        self.worker_size_mb = worker_size_mb
        self.lifetime = lifetime
        self.retire = retire
        self.worker_seconds = 0.0
        self.started_total = 0
        self.deaths = 0
        self.retirements = 0
        self._stopped = False

    def _limit(self) -> None:  # runs in the child before exec
        if self.worker_size_mb:
            cap = int(self.worker_size_mb) << 20
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    async def _start(self, slot: _Slot) -> None:
        slot.inc += 1
        spec = dict(self.spec, worker=f"w{slot.index}", inc=slot.inc)
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        slot.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cirrus.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
            preexec_fn=self._limit if self.worker_size_mb else None)
        assert slot.proc.stdin is not None
        slot.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        slot.started = time.monotonic()
        self.started_total += 1

    async def start(self) -> None:
        for slot in self.slots:
            await self._start(slot)

    def pids(self) -> list[int]:
        """Processes of the current incarnations (alive or not yet reaped)."""
        return [s.proc.pid for s in self.slots if s.proc is not None and s.proc.returncode is None]

    def _account(self, began: float) -> None:
        self.worker_seconds += time.monotonic() - began

    async def maintain(self) -> None:
        """Replace dead workers and retire those past their lifetime; reap retired ones."""
        if self._stopped:
            return
        now = time.monotonic()
        for slot in self.slots:
            for proc, began in list(slot.retiring):
                if proc.returncode is not None:
                    slot.retiring.remove((proc, began))
                elif now - began > 5.0:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            proc = slot.proc
            if proc is None:
                continue
            if proc.returncode is not None:  # died (or finished): a new incarnation takes over
                self._account(slot.started)
                self.deaths += 1
                if self.retire is not None:
                    await self.retire(f"w{slot.index}", slot.inc)
                await self._start(slot)
            elif self.lifetime is not None and now - slot.started >= self.lifetime:
                self.retirements += 1
                if self.retire is not None:
                    await self.retire(f"w{slot.index}", slot.inc)
                self._account(slot.started)
                self._close_stdin(proc)
                slot.retiring.append((proc, now))
                await self._start(slot)

    @staticmethod
    def _close_stdin(proc: asyncio.subprocess.Process) -> None:
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()

    async def stop(self, grace: float = 5.0) -> None:
        """Ask every worker to stop (stdin closed), kill those still running after ``grace`` s."""
        self._stopped = True
        procs = []
        for slot in self.slots:
            if slot.proc is not None:
                if slot.proc.returncode is None:
                    self._account(slot.started)
                self._close_stdin(slot.proc)
                procs.append(slot.proc)
            procs += [p for p, _ in slot.retiring]
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            pass
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        await asyncio.gather(*(p.wait() for p in procs))

    def kill_now(self) -> None:
        """SIGKILL every worker at once (a user's kill); :meth:`stop` reaps them."""
        self._stopped = True
        for slot in self.slots:
            for p in [slot.proc, *(q for q, _ in slot.retiring)]:
                if p is not None and p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()

    def running_worker_seconds(self) -> float:
        now = time.monotonic()
        return self.worker_seconds + sum(now - s.started for s in self.slots
                                         if s.proc is not None and s.proc.returncode is None)
