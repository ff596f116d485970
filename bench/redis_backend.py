"""The zipcomm collective API implemented over Redis: the baseline of thesis section 4.7.

Every operation goes through the Redis server, the way serverless functions communicate through
an external store: the sender SETs a key, the receivers poll GET until the key is there.

* ``broadcast``: the root SETs one key per round; every other rank polls GET for it.  Each reader
  then INCRs an ack counter; the last reader deletes the value and the counter.
* ``reduce``: every non-root rank SETs its contribution; the root polls GETDEL for all the keys it
  still misses (one pipelined round trip per poll) and combines each one as soon as it arrives
  (the thesis's "keep track of which objects are already available").
* ``allreduce``: reduce to rank 0, then broadcast from rank 0.
* ``shuffle``: each rank partitions its int64 array by ``arr % size`` (bench/_partition.py,
  vectorized: a radix ``argsort(kind="stable")`` over an 8/16-bit bucket array), SETs one key per destination in one
  pipeline, then polls GETDEL for the parts sent to it and concatenates them in source order.
  :meth:`RedisComm.shuffle_parts` is the same exchange for parts the caller partitioned itself
  (bench/sort.py sends rows of records).
* ``barrier``: INCR + BLPOP (event-driven, not polled) - the benchmark uses it between rounds.

Membership is fixed: ``size`` ranks that know their ``rank``.  Keys are ``prefix:seq:...`` where
``seq`` counts the collective calls (every rank calls the same collectives in the same order), and
every key is deleted once it has been read, so Redis memory stays bounded.

Wire format of a value (no pickle): ``uint32 little-endian header length | msgpack header | body``.
A numpy array's header holds its dtype string and shape and the body is its raw bytes (decoded
zero-copy with ``np.frombuffer``); any other object is msgpack in the body.

Polling: the first ``poll_spin`` seconds of a wait re-poll back to back (one round trip each, so
small operations finish with round-trip latency); after that the poller sleeps ``poll_sleep``
between polls so that waiting ranks do not steal the CPU from the Redis server and the senders.
What RedisComm shares with bench/s3_backend.py's S3Comm (polling, background clean-ups,
allreduce, shuffle) is bench/_common.py's PollingComm.
"""
from __future__ import annotations

import math
import struct
from typing import Any, Callable

import msgpack
import numpy as np
import redis.asyncio as aioredis

from bench._common import PollingComm
from bench._partition import partition  # shared with the mpi and gloo backends

__all__ = ["RedisComm", "RedisCommTimeout", "encode", "decode", "partition"]

_HDR = struct.Struct("<I")
_ND_KINDS = "biufc"  # bool, int, uint, float, complex: plain bytes, safe to ship raw


class RedisCommTimeout(TimeoutError):
    """A collective did not complete before its deadline."""


def encode(obj: Any) -> bytes:
    """Serialize a numpy array (raw bytes + msgpack header) or a msgpack-able object."""
    scalar = isinstance(obj, np.generic)
    if isinstance(obj, np.ndarray) or scalar:
        arr = np.ascontiguousarray(obj)
        if arr.dtype.kind not in _ND_KINDS:
            raise TypeError(f"cannot send numpy dtype {arr.dtype} (only {_ND_KINDS!r} kinds)")
        header = {"k": "nd", "dt": arr.dtype.str, "sh": list(arr.shape), "sc": scalar}
        raw = msgpack.packb(header)
        return b"".join((_HDR.pack(len(raw)), raw, arr.reshape(-1).view(np.uint8)))
    raw = msgpack.packb({"k": "mp"})
    return b"".join((_HDR.pack(len(raw)), raw, msgpack.packb(obj)))


def decode(buf: bytes) -> Any:
    """Inverse of :func:`encode`; arrays are read-only views over ``buf`` (no copy)."""
    (hlen,) = _HDR.unpack_from(buf, 0)
    off = _HDR.size + hlen
    header = msgpack.unpackb(buf[_HDR.size:off])
    if header["k"] == "mp":
        return msgpack.unpackb(memoryview(buf)[off:])
    dtype = np.dtype(header["dt"])
    shape = tuple(header["sh"])
    count = math.prod(shape)
    if len(buf) - off != count * dtype.itemsize:
        raise ValueError(f"corrupt value: {len(buf) - off} bytes for {dtype}{list(shape)}")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=off).reshape(shape)
    return arr[()] if header.get("sc") else arr


def _combine(op: Callable, acc: Any, part: Any, owned: bool) -> Any:
    """acc op part; in place once ``acc`` is our own array (never mutates the caller's input)."""
    if owned and isinstance(op, np.ufunc) and isinstance(acc, np.ndarray) \
            and isinstance(part, np.ndarray) and acc.shape == part.shape:
        return op(acc, part, out=acc)
    return op(acc, part)


class RedisComm(PollingComm):
    """Broadcast / reduce / allreduce / shuffle among ``size`` fixed ranks through one Redis."""

    SEP, TIMEOUT, STORED = ":", RedisCommTimeout, "key"

    def __init__(self, url: str, rank: int, size: int, prefix: str, *, timeout: float = 60.0,
                 poll_spin: float = 0.005, poll_sleep: float = 0.001) -> None:
        super().__init__(rank, size, prefix, timeout=timeout, poll_spin=poll_spin,
                         poll_sleep=poll_sleep)
        self.url = url
        # One connection for the collectives (single_connection_client skips the pool: about 50
        # us less per command) and a pooled client for the background clean-ups.
        # Blocking reads (BLPOP, big GETs) may take long: the socket timeout is the deadline's.
        self.r = aioredis.Redis.from_url(url, single_connection_client=True,
                                         socket_timeout=timeout + 5)
        self._bg_r = aioredis.Redis.from_url(url, socket_timeout=timeout + 5)

    @classmethod
    def from_cfg(cls, cfg: dict, rank: int, size: int, timeout: float) -> "RedisComm":
        """A RedisComm from a worker config's ``redis_url``, ``prefix`` and poll settings."""
        return cls(cfg["redis_url"], rank, size, cfg["prefix"], timeout=timeout,
                   poll_spin=cfg["poll_spin"], poll_sleep=cfg["poll_sleep"])

    async def _ping(self) -> None:
        await self.r.ping()

    async def aclose(self) -> None:
        """Finish the background clean-ups (ack / delete), then close the connections."""
        try:
            await self._finish_background()
        finally:
            await self.r.aclose()
            await self._bg_r.aclose()

    # -- helpers ---------------------------------------------------------------------------
    async def _getdel_pending(self, keys: dict[int, str]) -> dict[int, bytes]:
        """One pipelined round trip: GETDEL every key; return those that were present."""
        pipe = self.r.pipeline(transaction=False)
        for key in keys.values():
            pipe.getdel(key)
        values = await pipe.execute()
        return {src: v for src, v in zip(keys, values) if v is not None}

    # -- collectives -----------------------------------------------------------------------
    async def barrier(self, timeout: float | None = None) -> None:
        """All ranks wait until every rank has arrived (INCR; the last one RPUSHes tokens)."""
        base = self._next() + ":barrier"
        if self.size == 1:
            return
        limit = self.timeout if timeout is None else timeout
        arrived = await self.r.incr(base + ":n")
        if arrived == self.size:
            pipe = self.r.pipeline(transaction=False)
            pipe.delete(base + ":n")
            pipe.rpush(base + ":go", *([1] * (self.size - 1)))
            await pipe.execute()
        elif await self.r.blpop([base + ":go"], timeout=limit) is None:
            raise RedisCommTimeout(f"rank {self.rank}/{self.size}: barrier {base} not complete "
                                   f"after {limit:.1f}s ({arrived} arrived before this rank)")

    async def broadcast(self, obj: Any = None, root: int = 0, timeout: float | None = None) -> Any:
        """Root: SET the value and return ``obj``.  Others: poll GET and return the value."""
        key = self._next() + ":b"
        if self.size == 1:
            return obj
        if self.rank == root:
            await self.r.set(key, encode(obj))
            return obj
        box: list[bytes] = []

        async def attempt() -> bool:
            value = await self.r.get(key)
            if value is not None:
                box.append(value)
            return bool(box)

        await self._poll(attempt, lambda: f"broadcast {key} (root {root})", timeout)
        self._in_background(self._ack_broadcast(key))
        return decode(box[0])

    async def _ack_broadcast(self, key: str) -> None:
        if await self._bg_r.incr(key + ":ack") >= self.size - 1:
            await self._bg_r.delete(key, key + ":ack")

    async def reduce(self, obj: Any, op: Callable = np.add, root: int = 0,
                     timeout: float | None = None) -> Any:
        """Combine every rank's ``obj`` with ``op`` at ``root``; others get None once sent."""
        base = self._next() + ":r"
        if self.rank != root:
            await self.r.set(f"{base}:{self.rank}", encode(obj))
            return None
        pending = {src: f"{base}:{src}" for src in range(self.size) if src != root}
        acc, owned = obj, False

        async def attempt() -> bool:
            nonlocal acc, owned
            for src, value in (await self._getdel_pending(pending)).items():
                acc, owned = _combine(op, acc, decode(value), owned), True
                del pending[src]
            return not pending

        await self._poll(attempt, lambda: f"reduce {base} (root {root}, waiting for ranks "
                                          f"{sorted(pending)})", timeout)
        return acc

    async def shuffle_parts(self, parts: list[np.ndarray],
                            timeout: float | None = None) -> list[np.ndarray]:
        """All-to-all: ``parts[d]`` goes to rank ``d`` (SET in one pipeline, then poll GETDEL);
        return the parts sent to this rank, one per source rank (its own part as given)."""
        self._check_parts(parts)
        base = self._next() + ":s"
        pipe = self.r.pipeline(transaction=False)
        for dst, part in enumerate(parts):
            if dst != self.rank:
                pipe.set(f"{base}:{self.rank}:{dst}", encode(part))
        await pipe.execute()
        got: dict[int, np.ndarray] = {self.rank: parts[self.rank]}
        pending = {src: f"{base}:{src}:{self.rank}" for src in range(self.size)
                   if src != self.rank}

        async def attempt() -> bool:
            for src, value in (await self._getdel_pending(pending)).items():
                got[src] = decode(value)
                del pending[src]
            return not pending

        await self._poll(attempt, lambda: f"shuffle {base} (waiting for ranks {sorted(pending)})",
                         timeout)
        return [got[src] for src in range(self.size)]
