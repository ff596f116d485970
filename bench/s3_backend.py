"""The zipcomm collective API implemented over S3: the thesis's "AWS S3" peer (section 4.7).

Every operation goes through an S3-compatible object store, the way serverless functions exchange
data through S3: the sender PUTs an object, the receivers poll GET (or LIST, when they wait for
several objects) until it is there.  bench/comm.py and bench/sort.py run it against a private
moto server on loopback (bench._services.S3Server), through the project's aiobotocore client
(``cirrus.storage.S3Store``; :func:`open_s3_store` gives it explicit settings, a connection pool
of 2 per rank and integrity checksums only where the S3 API requires them, botocore's default
before 1.36: the payload bytes are checked by the benchmarks themselves).

Every value object is published in two steps: its PUT, then, once the PUT returned, an empty
marker object; a reader LISTs or GETs markers and GETs a value only after its marker exists.
(moto computes an object's ETag lazily and without the object's lock, so a GET that overlaps the
end of the PUT, or a LIST, of a large object can return a corrupt body: seen with 8 readers of a
100 MB object.  A PUT returns after the ETag was computed, so the marker makes every value GET
safe.  Against real S3 the marker costs one small request per message.)

* ``broadcast``: the root publishes one value per call; every other rank polls GET for the
  marker, GETs the value, then PUTs an empty ack object and LISTs the acks: the rank whose LIST
  shows all ``size - 1`` acks (the last one to ack sees them all, LIST being strongly consistent)
  deletes the value, the marker and the acks.
* ``reduce``: every non-root rank publishes its contribution; the root polls LIST for the
  markers, GETs the new contributions concurrently, combines each as soon as it arrives and
  deletes it and its marker (the root is their only reader).
* ``allreduce``: reduce to rank 0, then broadcast from rank 0.
* ``shuffle``: each rank partitions its array (bench/_partition.py, the same ``item % n`` as the
  other backends), publishes one value per destination concurrently, then polls LIST for the
  markers of the parts sent to it, GETs each part once and deletes it and its marker.
  :meth:`S3Comm.shuffle_parts` is the same exchange for parts the caller partitioned itself
  (bench/sort.py sends rows of records).
* ``barrier``: every rank PUTs an (empty) arrival object and polls LIST until all ``size`` are
  there; then the acks-and-last-deletes scheme of broadcast removes the arrival objects.

Membership is fixed: ``size`` ranks that know their ``rank``.  Object keys are
``prefix/seq/...`` where ``seq`` counts the collective calls (every rank calls the same
collectives in the same order); every object is deleted once it has been read, so the store stays
bounded.  Values use bench/redis_backend.py's encoding (``encode`` / ``decode``: a msgpack header
and the raw array bytes; no pickle).

Polling: the first ``poll_spin`` seconds of a wait re-poll back to back; after that the poller
sleeps between requests, ``poll_sleep`` at first and twice as long after every empty poll up to
``poll_max``, so that waiting ranks do not flood the server (one Python process here) while it
serves the transfers.  The polling, the background clean-ups, allreduce and shuffle are
bench/_common.py's PollingComm, shared with bench/redis_backend.py's RedisComm.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench._backends import Backend, leak_check, package_version, s3_worker_cfg
from bench._common import PollingComm
from bench._services import S3Server, ServiceError
from bench._worker import CommBackend, Unavailable
from bench.redis_backend import _combine, decode, encode

__all__ = ["S3Comm", "S3CommTimeout", "S3", "S3Backend", "open_s3_store", "open_cfg_store"]


class S3CommTimeout(TimeoutError):
    """A collective did not complete before its deadline."""


def open_s3_store(bucket: str, settings: dict, pool: int = 16) -> Any:
    """A ``cirrus.storage.S3Store`` on ``bucket`` with explicit endpoint and credentials
    (``settings``: bench._services.S3Server.client_settings()) and ``pool`` connections."""
    from aiobotocore.config import AioConfig
    from cirrus.storage import S3Store
    settings = dict(settings)
    endpoint, region = settings.pop("endpoint_url"), settings.pop("region_name")
    config = AioConfig(max_pool_connections=pool, retries={"max_attempts": 3, "mode": "standard"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required")
    return S3Store(bucket, endpoint_url=endpoint, region_name=region,
                   client_kwargs=dict(settings, config=config))


def open_cfg_store(cfg: dict, size: int) -> Any:
    """:func:`open_s3_store` on a worker config's ``s3_bucket`` and ``s3_settings``, with 2
    connections per rank of ``size`` (at least 10)."""
    return open_s3_store(cfg["s3_bucket"], cfg["s3_settings"], pool=max(10, 2 * size))


class S3Comm(PollingComm):
    """Broadcast / reduce / allreduce / shuffle among ``size`` fixed ranks through one bucket.

    ``store`` is a ``cirrus.storage.S3Store`` (or any ``cirrus.storage.Store``: the operations
    use only put / get / list / delete); it is not closed by :meth:`aclose`.
    """

    SEP, TIMEOUT, STORED = "/", S3CommTimeout, "object"

    def __init__(self, store: Any, rank: int, size: int, prefix: str, *, timeout: float = 60.0,
                 poll_spin: float = 0.002, poll_sleep: float = 0.005,
                 poll_max: float = 0.05) -> None:
        super().__init__(rank, size, prefix, timeout=timeout, poll_spin=poll_spin,
                         poll_sleep=poll_sleep, poll_max=poll_max)
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty relative key, got {prefix!r}")
        self.store = store

    @classmethod
    def from_cfg(cls, store: Any, cfg: dict, rank: int, size: int, timeout: float) -> "S3Comm":
        """An S3Comm on ``store`` from a worker config's ``prefix`` and poll settings."""
        return cls(store, rank, size, cfg["prefix"], timeout=timeout, poll_spin=cfg["poll_spin"],
                   poll_sleep=cfg["poll_sleep"], poll_max=cfg["poll_max"])

    async def _ping(self) -> None:
        await self.store.list(self.prefix + "/")  # reachable, bucket exists

    async def aclose(self) -> None:
        """Finish the background acks and deletions (the store stays open)."""
        await self._finish_background()

    # -- helpers ---------------------------------------------------------------------------
    async def _delete(self, keys: list[str]) -> None:
        await asyncio.gather(*(self.store.delete(k) for k in keys))

    async def _ack(self, base: str, expected: int, also: list[str]) -> None:
        """PUT my ack under ``base/ack/``; the rank that then LISTs ``expected`` acks deletes
        them and ``also`` (several may: deleting is idempotent)."""
        await self.store.put(f"{base}/ack/{self.rank}", b"")
        acks = await self.store.list(base + "/ack/")
        if len(acks) >= expected:
            await self._delete(also + acks)

    async def _publish(self, base: str, name: str, obj: Any) -> None:
        """PUT ``base/v/name`` (the encoded ``obj``), then its marker ``base/ok/name``."""
        await self.store.put(f"{base}/v/{name}", encode(obj))
        await self.store.put(f"{base}/ok/{name}", b"")

    async def _take(self, base: str, name: str) -> bytes:
        """GET a published value this rank is the only reader of; delete it and its marker in
        the background."""
        value = await self.store.get(f"{base}/v/{name}")
        self._in_background(self._delete([f"{base}/v/{name}", f"{base}/ok/{name}"]))
        return value

    async def _gather_from(self, base: str, pending: dict[str, int],
                           on_value: Callable[[int, bytes], None], what: Callable[[], str],
                           timeout: float | None) -> None:
        """Poll LIST ``base/ok/``; GET (and delete) the values named in ``pending`` (name ->
        source rank) as their markers appear, concurrently; call ``on_value(src, value)``."""
        marks = base + "/ok/"

        async def attempt() -> bool:
            present = [k[len(marks):] for k in await self.store.list(marks)]
            present = [name for name in present if name in pending]
            values = await asyncio.gather(*(self._take(base, name) for name in present))
            for name, value in zip(present, values):
                on_value(pending.pop(name), value)
            return not pending

        await self._poll(attempt, what, timeout)

    # -- collectives -----------------------------------------------------------------------
    async def barrier(self, timeout: float | None = None) -> None:
        """All ranks wait until every rank has PUT its arrival object."""
        base = self._next() + "/g"
        if self.size == 1:
            return
        await self.store.put(f"{base}/in/{self.rank}", b"")
        seen: list[str] = []

        async def attempt() -> bool:
            seen[:] = await self.store.list(base + "/in/")
            return len(seen) >= self.size

        await self._poll(attempt, lambda: f"barrier {base} ({len(seen)} arrived)", timeout)
        self._in_background(self._ack(base, self.size, list(seen)))

    async def broadcast(self, obj: Any = None, root: int = 0, timeout: float | None = None) -> Any:
        """Root: PUT the value and return ``obj``.  Others: poll GET and return the value."""
        base = self._next() + "/b"
        if self.size == 1:
            return obj
        if self.rank == root:
            await self._publish(base, "0", obj)
            return obj
        from cirrus.errors import NotFound

        async def attempt() -> bool:
            try:
                await self.store.get(base + "/ok/0")
            except NotFound:
                return False
            return True

        await self._poll(attempt, lambda: f"broadcast {base} (root {root})", timeout)
        value = await self.store.get(base + "/v/0")
        self._in_background(self._ack(base, self.size - 1, [base + "/v/0", base + "/ok/0"]))
        return decode(value)

    async def reduce(self, obj: Any, op: Callable = np.add, root: int = 0,
                     timeout: float | None = None) -> Any:
        """Combine every rank's ``obj`` with ``op`` at ``root``; others get None once sent."""
        base = self._next() + "/r"
        if self.rank != root:
            await self._publish(base, str(self.rank), obj)
            return None
        pending = {str(src): src for src in range(self.size) if src != root}
        state = {"acc": obj, "owned": False}

        def on_value(src: int, value: bytes) -> None:
            state["acc"] = _combine(op, state["acc"], decode(value), state["owned"])
            state["owned"] = True

        await self._gather_from(base, pending, on_value, lambda: f"reduce {base} (root {root}, "
                                f"waiting for ranks {sorted(pending.values())})", timeout)
        return state["acc"]

    async def shuffle_parts(self, parts: list[np.ndarray],
                            timeout: float | None = None) -> list[np.ndarray]:
        """All-to-all: ``parts[d]`` goes to rank ``d``; return the parts sent to this rank, one
        per source rank (its own part is returned as given, not copied)."""
        self._check_parts(parts)
        base = self._next() + "/s"
        await asyncio.gather(*(self._publish(f"{base}/{dst}", str(self.rank), part)
                               for dst, part in enumerate(parts) if dst != self.rank))
        got: dict[int, np.ndarray] = {self.rank: parts[self.rank]}
        pending = {str(src): src for src in range(self.size) if src != self.rank}

        def on_value(src: int, value: bytes) -> None:
            got[src] = decode(value)

        await self._gather_from(f"{base}/{self.rank}", pending, on_value,
                                lambda: f"shuffle {base} (waiting for ranks "
                                        f"{sorted(pending.values())})", timeout)
        return [got[src] for src in range(self.size)]


class S3Backend(CommBackend):
    """One rank (bench._worker protocol)."""

    async def open(self) -> None:
        try:
            self.store = open_cfg_store(self.cfg, self.n)
        except ImportError as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        self.comm = S3Comm.from_cfg(self.store, self.cfg, self.rank, self.n, self.dl.seconds)
        await self.comm.__aenter__()


class S3(Backend):
    name = "s3"
    worker = "bench.s3_backend:S3Backend"
    summary = ("the thesis's S3 peer: the same API over a local S3-compatible server (moto, "
               "started by the run; PUT + polling GET/LIST)")
    needs = "pip packages moto[server] and aiobotocore"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--s3-poll-spin-ms", type=float, default=2.0, help="s3 backend: "
                            "re-poll back to back for this long before backing off "
                            "(default: %(default)s)")
        parser.add_argument("--s3-poll-sleep-ms", type=float, default=5.0, help="s3 backend: "
                            "first sleep between polls after the spin phase; doubled after "
                            "every empty poll (default: %(default)s)")
        parser.add_argument("--s3-poll-max-ms", type=float, default=50.0, help="s3 backend: "
                            "longest sleep between polls (default: %(default)s)")

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.server = S3Server(workdir)
        self.bucket = f"bench-{uuid.uuid4().hex[:12]}"
        self.started = False

    def start(self) -> None:
        for dist in ("moto", "aiobotocore"):
            if package_version(dist) is None:
                raise ServiceError(f"the Python package {dist} is not installed: pip install "
                                   f"'moto[server]' aiobotocore")
        self.server.start()
        try:
            self.server.create_bucket(self.bucket)
        except Exception as exc:
            self.server.stop()
            raise ServiceError(f"cannot create a bucket on the moto server: {exc}") from exc
        self.started = True

    def stop(self) -> None:
        self.server.stop()

    def info(self) -> dict:
        return {"moto": package_version("moto"), "aiobotocore": package_version("aiobotocore")}

    def worker_cfg(self) -> dict:
        return s3_worker_cfg(self.bucket, self.server.client_settings(), self.args)

    def cell(self, cell: dict, cfg: dict) -> contextlib.AbstractContextManager[None]:
        # a leak check; also empties the cell's prefix
        return leak_check(cell, "s3_keys_left", "moto server",
                          lambda: self.server.keys_left(self.bucket, cfg["prefix"] + "/"))
