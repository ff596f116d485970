"""Real multi-process clusters for tests: a controller process and scripted members.

Everything waits on events (a ready file, a reply line, a process exit) under
deadlines — never on the clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import tempfile
from typing import Any

DEADLINE = 30.0


class ControllerProcess:
    def __init__(self, *extra: str) -> None:
        self.extra = list(extra)
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""

    async def start(self, listen: str = "127.0.0.1:0") -> str:
        with tempfile.TemporaryDirectory() as tmp:
            ready = os.path.join(tmp, "ready")
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "zipcomm.controller", "--listen", listen, "--ready-file", ready,
                *self.extra, stdout=asyncio.subprocess.DEVNULL,
            )
            await wait_for_file(ready, self.proc, "controller")
            with open(ready) as f:
                self.address = f.read().strip()
        return self.address

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def restart(self) -> str:
        await self.kill()
        return await self.start(self.address)

    async def stop(self) -> None:
        await terminate(self.proc)


async def terminate(proc: asyncio.subprocess.Process | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc is not None and proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def wait_for_file(path: str, proc: asyncio.subprocess.Process, what: str) -> None:
    """Wait (under a deadline) until ``proc`` has written its ready file."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + DEADLINE
    while not os.path.exists(path):  # poll a predicate under a deadline
        if proc.returncode is not None or loop.time() > give_up:
            raise RuntimeError(f"{what} did not start (exit code {proc.returncode})")
        await asyncio.sleep(0.01)


class DaemonProcess:
    """A host daemon (``python -m zipcomm.daemon``) with its own socket and host id."""

    def __init__(self, index: int, workdir: str, *extra: str, shm_size: str = "256M") -> None:
        self.index = index
        self.host_id = f"h{index}"
        self.socket = os.path.join(workdir, f"daemon-{index}.sock")
        self.extra = ["--shm-size", shm_size, *extra]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, controller: str) -> None:
        ready = self.socket + ".ready"
        if os.path.exists(ready):
            os.unlink(ready)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "zipcomm.daemon", "--controller", controller, "--socket", self.socket,
            "--host-id", self.host_id, "--ready-file", ready, *self.extra, stdout=asyncio.subprocess.DEVNULL,
        )
        await wait_for_file(ready, self.proc, f"daemon {self.index}")

    def env(self) -> dict:
        return {"ZIPCOMM_DAEMON": self.socket, "ZIPCOMM_HOST_ID": self.host_id}

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def stop(self) -> None:
        await terminate(self.proc)
        # A daemon killed by a test leaves its segment behind (only its successor or a
        # sweep may remove it): sweep, as the next daemon on this socket would.
        from ..shm import sweep

        sweep(self.socket + ".segments")


class MemberProcess:
    """One scripted member (``python -m zipcomm.testing.member``)."""

    def __init__(self, index: int, env: dict | None = None) -> None:
        self.index = index
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.member_id = 0
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def start(self, controller: str) -> None:
        log_fd = self._stderr()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "zipcomm.testing.member", controller,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_fd,
                env=dict(os.environ, **self.env) if self.env else None,
            )
        finally:
            if log_fd is not None:
                os.close(log_fd)
        hello = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), DEADLINE))  # type: ignore[union-attr]
        self.member_id = hello["result"]["member"]
        self._reader = asyncio.create_task(self._read())

    def _stderr(self):
        logdir = os.environ.get("ZIPCOMM_TEST_LOGDIR")  # keep each member's log for post-mortems
        if not logdir:
            return None
        return os.open(os.path.join(logdir, f"member-{self.index}-{os.getpid()}.log"),
                       os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            fut = self._waiting.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"member {self.index} exited"))
                fut.exception()

    def start_call(self, cmd: str, **args: Any) -> asyncio.Future:
        """Send a command; the future resolves to the reply dict."""
        assert self.proc is not None and self.proc.stdin is not None
        cid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        self.proc.stdin.write((json.dumps({"id": cid, "cmd": cmd, "args": args}) + "\n").encode())
        return fut

    async def call(self, cmd: str, timeout: float = DEADLINE, **args: Any) -> Any:
        reply = await asyncio.wait_for(self.start_call(cmd, **args), timeout)
        if not reply["ok"]:
            raise RuntimeError(f"member {self.index}: {cmd} failed: {reply['error']}: {reply['message']}")
        return reply["result"]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                self.proc.stdin.write(b'{"cmd": "exit"}\n')  # type: ignore[union-attr]
                await asyncio.wait_for(self.proc.wait(), 10)
            except (TimeoutError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


class Cluster:
    """``async with Cluster(8) as c``: a controller and ``n`` member processes.

    ``daemons=k`` also starts k host daemons (each its own host id, all on loopback)
    and gives member i the daemon ``i % k``."""

    def __init__(self, n: int, *controller_args: str, daemons: int = 0) -> None:
        self.controller = ControllerProcess(*controller_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="zipcomm-cluster-")
        self.daemons = [DaemonProcess(i, self._tmp.name) for i in range(daemons)]
        self.members = [MemberProcess(i, self.daemons[i % daemons].env() if daemons else None) for i in range(n)]

    def daemon_of(self, member: MemberProcess) -> DaemonProcess:
        return self.daemons[member.index % len(self.daemons)]

    async def __aenter__(self) -> Cluster:
        address = await self.controller.start()
        try:
            for daemon in self.daemons:  # in order: the first is the first tree member, the root
                await daemon.start(address)
            await asyncio.gather(*(mm.start(address) for mm in self.members))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(mm.stop() for mm in self.members), return_exceptions=True)
        await asyncio.gather(*(dm.stop() for dm in self.daemons), return_exceptions=True)
        await self.controller.stop()
        self._tmp.cleanup()

    async def join_all(self, kind: str, name: str, role: str = "both") -> list[dict]:
        """Join one member after another (a deterministic tree), return their places."""
        places = []
        for mm in self.members:
            place = await mm.call("join", kind=kind, name=name, role=role)
            if self.daemons and kind != "shuffle" and place["daemon"] is None:
                raise RuntimeError(f"member {mm.index} joined {name!r} without its daemon")
            places.append(place)
        return places

    async def places(self, name: str, members=None) -> list[dict]:
        return list(await asyncio.gather(*(mm.call("where", name=name) for mm in (members or self.members))))
