"""Running the parameter server as processes: ``python -m cirrus.ps`` (a supervisor and its shard
processes, in their own process group, each dying with its parent) plus a client of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile

import zipcomm

from ..errors import CirrusError
from .client import PSClient


class PSStartError(CirrusError):
    """The parameter server did not start."""


class PSProcess:
    """``await PSProcess(k).start(tables)``: the shards listen, ``client`` is connected and every
    table of ``tables`` (``(name, rows, cols, spec)``) exists; ``stop()`` ends them all."""

    def __init__(self, n_shards: int = 1, *, checkpoint: str | None = None, checkpoint_every: float = 0.0,
                 max_staleness: int | None = None, workdir: str | None = None, start_timeout: float = 60.0) -> None:
        self.n_shards = n_shards
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.max_staleness = max_staleness
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="cirrus-ps-run-")
        self.workdir = workdir or self._tmp.name  # type: ignore[union-attr]
        self.start_timeout = start_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.client: PSClient | None = None  # type: ignore[assignment]
        self.addresses: list[str] = []
        self.generation = 0

    async def start(self, tables: list[tuple[str, int, int, dict]] = ()) -> PSProcess:  # type: ignore[assignment]
        self.generation += 1
        ready = os.path.join(self.workdir, f"ps-{self.generation}.json")
        cmd = [sys.executable, "-m", "cirrus.ps", "--shards", str(self.n_shards), "--ready-file", ready]
        if self.checkpoint:
            cmd += ["--checkpoint", self.checkpoint, "--checkpoint-every", str(self.checkpoint_every), "--resume"]
        if self.max_staleness is not None:
            cmd += ["--max-staleness", str(self.max_staleness)]
        self.proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                         start_new_session=True,
                                                         env=dict(os.environ, CIRRUS_PS_DIE_WITH_PARENT="1"))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.start_timeout
        while not os.path.exists(ready):  # the ready file appears once every shard listens
            if self.proc.returncode is not None or loop.time() > give_up:
                code = self.proc.returncode
                await self.stop()
                raise PSStartError(f"the parameter server did not start (exit code {code})")
            await asyncio.sleep(0.02)
        with open(ready) as f:
            self.addresses = json.load(f)["shards"]
        self.client = await PSClient(self.addresses).connect()
        for name, rows, cols, spec in tables:  # idempotent when resumed from a checkpoint
            await self.client.create(name, rows, cols, **spec)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and \
            self.client is not None and not any(c.closed for c in self.client.clients)

    async def retire(self, worker: str, inc: int) -> None:
        with contextlib.suppress(zipcomm.ZipError):  # a dead server refuses everyone anyway
            await self.client.retire(worker, inc)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        proc = self.proc
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    pass
            with contextlib.suppress(ProcessLookupError):  # any shard left in its group
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def aclose(self) -> None:
        await self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def __aenter__(self) -> PSProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
