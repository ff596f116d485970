"""The worker's and driver's side of the sharded parameter server.

:class:`PSClient` holds one :mod:`zipcomm.rpc` connection per shard, routes global rows to shards
(row ``r`` lives on shard ``r % k`` at local row ``r // k``), pulls from all shards concurrently and
pushes without waiting (casts) — with the pulled versions, so each shard can measure staleness.
``compress=True`` sends pulled values and pushed gradients as float16 (half the bytes).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

import zipcomm
from zipcomm.protocol.handshake import load_secret


class Retired(Exception):
    """This worker incarnation was retired: a newer one replaced it; stop."""


class PSClient:
    def __init__(self, addresses: list[str], *, worker: str | None = None, inc: int = 0,
                 compress: bool = False, timeout: float = 30.0, secret: bytes | None = None) -> None:
        if not addresses:
            raise ValueError("a parameter server needs at least one shard address")
        self.addresses = list(addresses)
        self.k = len(addresses)
        self.worker, self.inc = worker, inc
        self.compress = compress
        self.timeout = timeout
        self.secret = secret if secret is not None else load_secret()  # default: $ZIPCOMM_SECRET
        self.clients: list[zipcomm.RpcClient] = []
        self.step = 0
        self._versions: dict[str, list[int]] = {}

    async def connect(self) -> PSClient:
        try:
            for a in self.addresses:
                self.clients.append(await zipcomm.rpc_connect(a, timeout=self.timeout, secret=self.secret))
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        clients, self.clients = self.clients, []
        for c in clients:
            await c.aclose()

    async def __aenter__(self) -> PSClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- routing ------------------------------------------------------------------------------------
    def _split(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """[(shard, positions in rows, local rows)] for the shards that own some of ``rows``."""
        if self.k == 1:
            return [(0, slice(None), rows)]  # type: ignore[list-item]
        owner = rows % self.k
        out = []
        for s in range(self.k):
            pos = np.flatnonzero(owner == s)
            if pos.size:
                out.append((s, pos, rows[pos] // self.k))
        return out

    # -- calls ----------------------------------------------------------------------------------------
    async def create(self, table: str, rows: int, cols: int = 1, **spec: Any) -> None:
        """Create ``table`` (``rows`` x ``cols``) on every shard; ``spec``: dtype, init ("zeros" |
        "normal"), scale, seed, optimizer (a :mod:`cirrus.optim` name, or "add"), hyper (dict)."""
        await asyncio.gather(*(c.call("create", {"table": table, "rows": rows, "cols": cols, **spec},
                                      timeout=self.timeout) for c in self.clients))

    def _pull_msgs(self, table: str, rows: np.ndarray) -> tuple[list, dict[int, dict]]:
        parts = self._split(rows)
        extra = {"worker": self.worker, "inc": self.inc} if self.worker is not None else {}
        return parts, {s: {"table": table, "rows": local, "f16": self.compress, **extra} for s, _, local in parts}

    def _assemble(self, table: str, rows: np.ndarray, parts: list, replies: dict[int, dict]) -> np.ndarray:
        if any(r.get("retired") for r in replies.values()):
            raise Retired(f"worker {self.worker} incarnation {self.inc} was retired")
        versions = self._versions.setdefault(table, [0] * self.k)
        for s, r in replies.items():
            versions[s] = r["version"]
        if self.k == 1:
            return np.asarray(replies[0]["values"], dtype=np.float32)
        cols = np.asarray(next(iter(replies.values()))["values"]).shape[1] if replies else 1
        out = np.empty((rows.size, cols), dtype=np.float32)
        for s, pos, _ in parts:
            out[pos] = replies[s]["values"]
        return out

    def _push_msgs(self, table: str, rows: np.ndarray, grads: np.ndarray) -> dict[int, dict]:
        grads = np.asarray(grads)
        if grads.ndim == 1:
            grads = grads.reshape(-1, 1)
        if self.compress:
            grads = grads.astype(np.float16)
        elif grads.dtype != np.float32:
            grads = grads.astype(np.float32)
        self.step += 1
        versions = self._versions.get(table, [0] * self.k)
        return {s: {"table": table, "rows": local, "grads": grads[pos], "worker": self.worker, "inc": self.inc,
                    "step": self.step, "version": versions[s]} for s, pos, local in self._split(rows)}

    async def pull(self, table: str, rows: np.ndarray) -> np.ndarray:
        """Values of global ``rows`` (unique int64) as a ``(len(rows), cols)`` float array."""
        rows = np.asarray(rows, dtype=np.int64)
        parts, msgs = self._pull_msgs(table, rows)
        shards = list(msgs)
        replies = await asyncio.gather(*(self.clients[s].call("pull", msgs[s], timeout=self.timeout) for s in shards))
        return self._assemble(table, rows, parts, dict(zip(shards, replies)))

    async def push_pull(self, table: str, rows: np.ndarray, grads: np.ndarray, next_rows: np.ndarray) -> np.ndarray:
        """:meth:`push` this step's gradient and :meth:`pull` the next step's rows in one round trip
        per shard (the shard applies the push first)."""
        rows = np.asarray(rows, dtype=np.int64)
        next_rows = np.asarray(next_rows, dtype=np.int64)
        pushes = self._push_msgs(table, rows, grads)
        parts, pulls = self._pull_msgs(table, next_rows)
        shards = sorted(set(pushes) | set(pulls))
        replies = await asyncio.gather(*(self.clients[s].call(
            "pushpull", {"push": pushes.get(s), "pull": pulls.get(s)}, timeout=self.timeout) for s in shards))
        return self._assemble(table, next_rows, parts, {s: r["pull"] for s, r in zip(shards, replies) if "pull" in r})

    async def pull_all(self, table: str, n_rows: int) -> np.ndarray:
        """The whole table (for evaluation and checkpoints of the driver), in global row order."""
        replies = await asyncio.gather(*(c.call("pull", {"table": table, "rows": np.empty(0, np.int64),
                                                         "all": True}, timeout=self.timeout)
                                         for c in self.clients))
        cols = np.asarray(replies[0]["values"]).shape[1]
        out = np.empty((n_rows, cols), dtype=np.float32)
        for s, r in enumerate(replies):
            out[s::self.k] = r["values"]
        return out

    async def push(self, table: str, rows: np.ndarray, grads: np.ndarray, *, wait: bool = False) -> list[dict] | None:
        """Send gradient ``grads`` for unique global ``rows`` (one step of this worker). Without
        ``wait`` it returns once sent (the shards count refusals); ``wait=True`` returns their replies."""
        msgs = self._push_msgs(table, np.asarray(rows, dtype=np.int64), grads)
        calls = [self.clients[s].call("push", m, timeout=self.timeout) if wait else self.clients[s].cast("push", m)
                 for s, m in msgs.items()]
        replies = await asyncio.gather(*calls)
        return list(replies) if wait else None

    async def retire(self, worker: str, inc: int) -> None:
        await asyncio.gather(*(c.call("retire", {"worker": worker, "inc": inc}, timeout=self.timeout)
                               for c in self.clients))

    async def kv_set(self, key: str, value: Any) -> None:
        await self.clients[hash_key(key, self.k)].call("kv_set", {"key": key, "value": value}, timeout=self.timeout)

    async def kv_get(self, key: str, default: Any = None) -> Any:
        r = await self.clients[hash_key(key, self.k)].call("kv_get", {"key": key}, timeout=self.timeout)
        return r["value"] if r["found"] else default

    async def stats(self) -> list[dict]:
        return list(await asyncio.gather(*(c.call("stats", timeout=self.timeout) for c in self.clients)))

    async def checkpoint(self) -> None:
        await asyncio.gather(*(c.call("checkpoint", timeout=self.timeout) for c in self.clients))


def hash_key(key: str, k: int) -> int:
    """The shard of a key-value key (stable across processes)."""
    h = 2166136261
    for b in key.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h % k
