"""A scriptable member process for multi-process tests and chaos runs.

``python -m zipcomm.testing.member HOST:PORT`` reads JSON commands on stdin, one
per line, runs each as its own task, and answers each on stdout with the same
``id``: ``{"id": 3, "ok": true, "result": ...}`` or ``{"id": 3, "ok": false,
"error": "CollectiveTimeout", "message": "..."}``. Values are small integers
that stand for deterministic numpy payloads, so tests check contents exactly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import numpy as np

import zipcomm


def payload(value: int, size: int) -> np.ndarray:
    """A deterministic array whose first element names it."""
    arr = np.full(max(size, 1), value, dtype=np.int64)
    return arr


class Member:
    def __init__(self, controller: str) -> None:
        self.controller = controller
        self.rt: zipcomm.Runtime | None = None
        self.handles: dict[str, Any] = {}
        self.out_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        self.rt = await zipcomm.connect(self.controller)
        await self.reply({"id": 0, "ok": True, "result": {"member": self.rt.member_id}})
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while line := await reader.readline():
                cmd = json.loads(line)
                if cmd["cmd"] == "exit":
                    break
                task = asyncio.create_task(self.execute(cmd))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.rt.aclose()

    async def reply(self, obj: dict) -> None:
        async with self.out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    async def execute(self, cmd: dict) -> None:
        try:
            result = await getattr(self, "do_" + cmd["cmd"])(**cmd.get("args", {}))
            await self.reply({"id": cmd["id"], "ok": True, "result": result})
        except Exception as exc:  # reported to the test, which decides
            await self.reply({"id": cmd["id"], "ok": False, "error": type(exc).__name__, "message": str(exc)})

    # -- commands ------------------------------------------------------------

    async def do_join(self, kind: str, name: str, role: str = "both") -> dict:
        assert self.rt is not None
        if kind == "broadcast":
            self.handles[name] = await self.rt.broadcast_channel(name, queue_size=1024)
        elif kind == "reduce":
            self.handles[name] = await self.rt.reduce_channel(name, zipcomm.SUM)
        else:
            self.handles[name] = await self.rt.shuffle_channel(name, role)
        return await self.do_where(name)

    async def do_where(self, name: str) -> dict:
        core = self.handles[name]
        assert self.rt is not None
        if not hasattr(core, "children"):  # through the host daemon, which is the tree member
            return {"member": self.rt.member_id, "root": False, "children": 0, "depth": -1, "epoch": -1,
                    "daemon": core.client.daemon, "fallen_back": core.direct is not None}
        return {"member": core.me, "root": core.is_root, "children": len(core.children),
                "depth": core.depth, "epoch": core.epoch, "daemon": None, "fallen_back": False}

    async def do_leave(self, name: str) -> None:
        await self.handles.pop(name).aclose()

    async def do_send(self, name: str, values: list[int], size: int = 1, timeout: float = 30) -> int:
        for v in values:
            await self.handles[name].send(payload(v, size), timeout=timeout)
        return len(values)

    async def do_receive(self, name: str, count: int, timeout: float = 30) -> list[int]:
        got = []
        for _ in range(count):
            arr = await self.handles[name].receive(timeout=timeout)
            if not (arr == arr[0]).all():
                raise AssertionError("corrupted broadcast payload")
            got.append(int(arr[0]))
        return got

    async def do_receive_check(self, name: str, timeout: float = 30) -> dict:
        """Receive one array and describe it: contents, whether it is read-only, and
        whether its bytes lie inside the host daemon's shared-memory segment."""
        assert self.rt is not None
        arr = await self.handles[name].receive(timeout=timeout)
        addr = arr.__array_interface__["data"][0]
        att = self.rt.daemon.attachment if self.rt.daemon is not None else None
        in_arena = att is not None and att.address <= addr and addr + arr.nbytes <= att.address + att.size
        return {"first": int(arr[0]), "all_same": bool((arr == arr[0]).all()), "nbytes": int(arr.nbytes),
                "readonly": not arr.flags.writeable, "in_arena": bool(in_arena),
                "arena": att.name if att is not None else None}

    async def do_allreduce(self, name: str, index: int, width: int, rounds: int = 1,
                           timeout: float = 30, pad: int = 0) -> list[dict]:
        """Each round contributes a one-hot vector at ``index`` (followed by ``pad``
        zeros, to make it large): the result shows who was counted and how often."""
        out = []
        for _ in range(rounds):
            vec = np.zeros(width + pad, dtype=np.int64)
            vec[index] = 1
            value, contributors = await self.handles[name].allreduce(vec, timeout=timeout,
                                                                     with_contributors=True)
            out.append({"vector": value[:width].tolist(), "contributors": contributors,
                        "pad_zero": not value[width:].any()})
        return out

    async def do_shuffle(self, name: str, start: int, count: int, rounds: int = 1,
                         timeout: float = 30) -> list[list[int]]:
        out = []
        for r in range(rounds):
            data = np.arange(start + r * 1_000_000, start + r * 1_000_000 + count, dtype=np.int64)
            got = await self.handles[name].shuffle_send_receive(data, lambda a, n: a % n, timeout=timeout)
            out.append(np.asarray(got).tolist())
        return out


def main() -> None:
    if os.environ.get("ZIPCOMM_TEST_LOGDIR"):
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)d %(name)s %(message)s")
    asyncio.run(Member(sys.argv[1]).run())


if __name__ == "__main__":
    main()
