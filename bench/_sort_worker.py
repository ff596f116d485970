"""One worker of one bench/sort.py repetition: ``python -m bench._sort_worker '<json config>'``.

The records and their vectorized helpers (shared with bench/sort.py, which generates the input and
checks the workers' reports) and the worker itself: it joins its shuffle backend, waits at a
barrier, then runs the four timed phases of thesis figure 4.6:

* **load**: GET its input objects from the dataset store (``cirrus.storage.open_store``) and view
  them as an ``(n, 100)`` uint8 array (one copy: the concatenation);
* **shuffle**: in rounds of at most ``chunk_records`` records, range-partition by the first two
  key bytes (record goes to class ``key16 * W >> 16``) and exchange through the backend; then a
  barrier (every worker has all its records: see ``run``) and the concatenation of what was
  received;
* **sort**: ``np.argsort`` of the key's bytes 0-7 viewed as a big-endian uint64 (a lexsort
  with bytes 8-9 too if two of those are equal), then one row gather;
* **write**: PUT the sorted records as objects of at most ``block_records`` records.

Every phase is vectorized numpy (no per-record Python).  After the timed phases the worker reads
its output back from the store and reports, on stdout (JSON lines): the phase timestamps (all
``time.perf_counter()``, CLOCK_MONOTONIC, comparable across processes) and the process's CPU
time (``time.process_time()``) at the same points, and the key class it
holds, its record count, whether its output is sorted, its first and last key and the sum of a
64-bit hash of its records (bench/sort.py checks these against the input); then it deletes its
output.  ``{"type": "error", ...}`` and exit code 2 on any failure.

Backends (``cfg["backend"]``):

* ``zipcomm`` and ``zipcomm-daemon`` (the same, with ``ZIPCOMM_DAEMON`` in the environment):
  ``zipcomm.connect(controller)`` and a ``ShuffleChannel`` (role BOTH), one
  ``shuffle_send_receive(chunk, hash_function, parts=True)`` per round (zipcomm partitions;
  the round comes back as the senders' parts, not joined, and with a host daemon the parts of
  the other workers stay views of its shared memory until the concatenation); the receiving
  class of a member is dealt out by zipcomm, so each worker learns its class from the keys it
  received (they must all be of one class);
* ``redis``: bench/redis_backend.py's ``RedisComm.shuffle_parts`` (SET in one pipeline, polling
  GETDEL: every key is deleted as it is read), the parts partitioned here;
* ``s3``: bench/s3_backend.py's ``S3Comm.shuffle_parts`` against the run's moto server, the
  parts partitioned here.
"""
from __future__ import annotations

import asyncio
import json
import math
import resource
import sys
import time
from typing import Any

import numpy as np

from bench._common import close_comm, emit, report_error, run_on_loop

RECORD = 100  # bytes: a 10-byte key and a 90-byte value
KEY = 10
EXIT_ERROR = 2

# Views of a record array (buffer of n * 100 bytes) without copies.
_KEY_DT = np.dtype({"names": ["hi", "lo"], "formats": [">u8", ">u2"], "offsets": [0, 8],
                    "itemsize": RECORD})
_WORDS_DT = np.dtype({"names": [f"w{i}" for i in range(13)],
                      "formats": ["<u8"] * 12 + ["<u4"],
                      "offsets": [8 * i for i in range(13)], "itemsize": RECORD})
_PREFIX_DT = np.dtype({"names": ["p"], "formats": [">u2"], "offsets": [0], "itemsize": RECORD})
_MUL = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def as_records(buf: Any) -> np.ndarray:
    """A bytes-like of whole records as an ``(n, 100)`` uint8 array (no copy)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    if arr.size % RECORD:
        raise ValueError(f"{arr.size} bytes is not a whole number of {RECORD}-byte records")
    return arr.reshape(-1, RECORD)


def _struct_view(recs: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if recs.ndim != 2 or recs.shape[1] != RECORD or recs.dtype != np.uint8:
        raise ValueError(f"expected an (n, {RECORD}) uint8 array, got {recs.dtype}{recs.shape}")
    recs = np.ascontiguousarray(recs)
    return recs.reshape(-1).view(dtype) if recs.size else np.empty(0, dtype)


def generate(seed: int, worker: int, block: int, first: int, count: int) -> np.ndarray:
    """``count`` records of input block ``(worker, block)``: random bytes (from the seed), with
    bytes 10-17 of the value set to the record's global number (big-endian) so that every record
    is distinct."""
    rng = np.random.default_rng([seed, worker, block])
    recs = as_records(bytearray(rng.bytes(count * RECORD)))
    recs[:, KEY:KEY + 8] = np.arange(first, first + count, dtype=">u8").view(np.uint8).reshape(-1, 8)
    return recs


def record_hashes(recs: np.ndarray) -> np.ndarray:
    """A 64-bit hash of every record (vectorized over the 13 words of a record)."""
    words = _struct_view(recs, _WORDS_DT)
    h = np.full(len(words), 0x243F6A8885A308D3, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in _WORDS_DT.names:
            h ^= words[name].astype(np.uint64)
            h *= _MUL
            h ^= h >> np.uint64(29)
        h *= _MIX1
        h ^= h >> np.uint64(32)
        h *= _MIX2
        h ^= h >> np.uint64(29)
    return h


def checksum(recs: np.ndarray) -> int:
    """Sum (mod 2^64) of the record hashes: equal for two arrays holding the same records."""
    return int(record_hashes(recs).sum(dtype=np.uint64))


def key_classes(recs: np.ndarray, n: int) -> np.ndarray:
    """Range partition: the class (0..n-1) of every record, from its first two key bytes."""
    if not 1 <= n <= 256:
        raise ValueError(f"between 1 and 256 classes, not {n}")
    prefix = _struct_view(recs, _PREFIX_DT)["p"].astype(np.uint32)
    return ((prefix * np.uint32(n)) >> np.uint32(16)).astype(np.uint8)


def partition_records(recs: np.ndarray, n: int) -> list[np.ndarray]:
    """Split records by class (counting partition: radix argsort of the uint8 classes)."""
    cls = key_classes(recs, n)
    counts = np.bincount(cls, minlength=n)
    ordered = np.take(recs, np.argsort(cls, kind="stable"), axis=0)  # a row gather
    return np.split(ordered, np.cumsum(counts)[:-1])


def sort_records(recs: np.ndarray) -> np.ndarray:
    """The records ordered by their 10-byte key (big-endian, i.e. byte-wise).

    An argsort of the first 8 key bytes as one big-endian uint64; only if two of those are equal
    (about n^2 / 2^65 likely for random keys) a lexsort that also takes the last 2 bytes.  Then
    one row gather (``np.take`` along rows: 3x faster than fancy indexing of 100-byte rows)."""
    keys = _struct_view(recs, _KEY_DT)
    hi = keys["hi"].astype(np.uint64)
    order = np.argsort(hi)
    ordered_hi = hi[order]
    if len(hi) > 1 and np.any(ordered_hi[1:] == ordered_hi[:-1]):
        order = np.lexsort((keys["lo"].astype(np.uint16), hi))
    return np.take(recs, order, axis=0)


def key_hex(recs: np.ndarray, i: int) -> str:
    return bytes(recs[i, :KEY]).hex()


def is_sorted(recs: np.ndarray) -> bool:
    if len(recs) < 2:
        return True
    keys = _struct_view(recs, _KEY_DT)
    hi, lo = keys["hi"].astype(np.uint64), keys["lo"].astype(np.uint16)
    return bool(np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))))


class WrongResult(Exception):
    """The shuffle delivered records of the wrong class."""


# -- shuffle backends ----------------------------------------------------------------------------
class Exchange:
    """One worker's side of a shuffle backend: barrier and one all-to-all round."""

    def __init__(self, cfg: dict) -> None:
        self.cfg, self.rank, self.n = cfg, cfg["rank"], cfg["workers"]
        self.timeout = cfg["timeout"]

    async def open(self) -> None: ...

    async def barrier(self) -> None:
        raise NotImplementedError

    async def round(self, chunk: np.ndarray) -> list[np.ndarray]:
        """Send every record of ``chunk`` to the worker of its key class; return the pieces of
        records this worker received (all of one class)."""
        raise NotImplementedError

    async def close(self) -> None: ...


class ZipcommExchange(Exchange):
    async def open(self) -> None:
        import zipcomm
        self.zc = zipcomm
        name = self.cfg["prefix"]
        self.rt = await zipcomm.connect(self.cfg["controller"])
        self.ch = await self.rt.shuffle_channel(f"{name}-sort", role=zipcomm.BOTH)
        self.bar = await self.rt.reduce_channel(f"{name}-barrier", reduce_f=zipcomm.SUM)
        # Every worker joined the shuffle channel before the barrier channel: once a barrier
        # round counts all n contributors, every worker is a member of the shuffle channel.
        while await self._count() != self.n:
            pass

    async def _count(self) -> int:
        got = await self.bar.allreduce(np.ones(1, dtype=np.int64), timeout=self.timeout)
        count = int(np.asarray(got).reshape(-1)[0])
        if count > self.n:
            raise WrongResult(f"barrier counted {count} contributors, expected {self.n}")
        return count

    async def barrier(self) -> None:
        if (count := await self._count()) != self.n:
            raise WrongResult(f"barrier counted {count} contributors, expected {self.n}")

    async def round(self, chunk: np.ndarray) -> list[np.ndarray]:
        # parts=True: the senders' parts as they came (through a host daemon: views of its
        # shared memory), joined once with every round's after the last, as the others do
        return await self.ch.shuffle_send_receive(chunk, hash_function=key_classes,
                                                  timeout=self.timeout, parts=True)

    async def close(self) -> None:
        if getattr(self, "rt", None) is not None:
            await self.rt.aclose()


class CommExchange(Exchange):
    """An exchange whose ``open`` sets ``self.comm``, a bench._common.PollingComm (and maybe
    ``self.store``, closed after it); a round is the comm's ``shuffle_parts`` of the records
    partitioned by key class."""

    async def barrier(self) -> None:
        await self.comm.barrier(timeout=self.timeout)

    async def round(self, chunk: np.ndarray) -> list[np.ndarray]:
        return await self.comm.shuffle_parts(partition_records(chunk, self.n), self.timeout)

    async def close(self) -> None:
        await close_comm(self)


class RedisExchange(CommExchange):
    async def open(self) -> None:
        from bench.redis_backend import RedisComm
        self.comm = RedisComm.from_cfg(self.cfg, self.rank, self.n, self.timeout)
        await self.comm.__aenter__()


class S3Exchange(CommExchange):
    async def open(self) -> None:
        from bench.s3_backend import S3Comm, open_cfg_store
        self.store = open_cfg_store(self.cfg, self.n)
        self.comm = S3Comm.from_cfg(self.store, self.cfg, self.rank, self.n, self.timeout)
        await self.comm.__aenter__()


EXCHANGES = {"zipcomm": ZipcommExchange, "zipcomm-daemon": ZipcommExchange,  # + ZIPCOMM_DAEMON
             "redis": RedisExchange, "s3": S3Exchange}


def _usage() -> tuple[float, int]:
    """This process's kernel CPU seconds and minor page faults so far: a fresh page costs a fault
    and a zero fill, and on a virtual machine that can cost more than the work done in it."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_stime, ru.ru_minflt


# -- the worker ----------------------------------------------------------------------------------
async def run(cfg: dict, state: dict) -> None:
    from cirrus.storage import open_store
    rank, n = cfg["rank"], cfg["workers"]
    ex = EXCHANGES[cfg["backend"]](cfg)
    store = open_store(cfg["store"])
    try:
        state["phase"] = "setup"
        await ex.open()
        await ex.barrier()
        state["phase"] = "load"
        t0, c0, u0 = time.perf_counter(), time.process_time(), _usage()
        blobs = await asyncio.gather(*(store.get(k) for k in cfg["inputs"]))
        recs = np.concatenate([as_records(b) for b in blobs]) if blobs else \
            np.empty((0, RECORD), np.uint8)
        del blobs
        t1, c1, u1 = time.perf_counter(), time.process_time(), _usage()
        state["phase"] = "shuffle"
        pieces: list[np.ndarray] = []
        step = cfg["chunk_records"]
        for r in range(cfg["rounds"]):
            pieces.extend(await ex.round(recs[r * step:(r + 1) * step]))
        del recs
        # Every backend: wait until every worker has all its records before going CPU-bound.
        # zipcomm needs it: shuffle_send_receive returns once this member has received its
        # parts, its own outgoing parts may still sit in the socket buffers, and a sort that
        # blocks the event loop would hold them back from the others (and miss the controller's
        # heartbeats); for redis and s3 every send was complete when round() returned.
        await ex.barrier()
        pieces = [p for p in pieces if len(p)]
        mine = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else \
            np.empty((0, RECORD), np.uint8)
        del pieces
        t2, c2, u2 = time.perf_counter(), time.process_time(), _usage()
        state["phase"] = "sort"
        out = sort_records(mine)
        del mine
        t3, c3, u3 = time.perf_counter(), time.process_time(), _usage()
        state["phase"] = "write"
        cls = int(key_classes(out[:1], n)[0]) if len(out) else None
        tag = f"c{cls:03d}" if cls is not None else f"empty-r{rank:03d}"
        block = cfg["block_records"]
        keys = [f"{cfg['output']}/part-{tag}-{j:04d}" for j in range(max(1, math.ceil(len(out) / block)))]
        await asyncio.gather(*(store.put(k, out[j * block:(j + 1) * block])
                               for j, k in enumerate(keys)))
        t4, c4, u4 = time.perf_counter(), time.process_time(), _usage()
        del out
        emit(type="phases", rank=rank, t=[t0, t1, t2, t3, t4], cpu=[c0, c1, c2, c3, c4],
             sys=[u[0] for u in (u0, u1, u2, u3, u4)], minflt=[u[1] for u in (u0, u1, u2, u3, u4)])
        state["phase"] = "verify"
        back = [as_records(b) for b in await asyncio.gather(*(store.get(k) for k in keys))]
        got = np.concatenate(back) if back else np.empty((0, RECORD), np.uint8)
        del back
        classes = np.unique(key_classes(got, n)) if len(got) else np.empty(0, np.uint8)
        emit(type="result", rank=rank, cls=cls, classes=[int(c) for c in classes],
             count=len(got), checksum=str(checksum(got)), sorted=is_sorted(got),
             first=key_hex(got, 0) if len(got) else None,
             last=key_hex(got, -1) if len(got) else None)
        del got
        await asyncio.gather(*(store.delete(k) for k in keys))
        state["phase"] = "close"
        await ex.close()
        ex = None
    finally:
        try:
            if ex is not None:
                await asyncio.wait_for(ex.close(), timeout=10)
        except BaseException:
            pass
        await store.aclose()
    emit(type="done", rank=rank)


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    state = {"phase": "start"}

    async def body() -> None:
        await asyncio.wait_for(run(cfg, state), timeout=cfg["timeout"])

    try:
        run_on_loop(body, cfg.get("loop"))
    except BaseException as exc:  # report everything, including timeouts and wrong answers
        report_error(cfg, state["phase"], exc)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    from bench._sort_worker import main as _main  # the module's own name, not __main__
    sys.exit(_main(sys.argv))
