"""A seeded frame fuzzer for every zipcomm listening endpoint, with server-side health probes.

Pieces (all usable on their own):

* :class:`FrameFuzzer` -- ``FrameFuzzer(seed)``; generators return raw bytes for the wire:
  ``random_bytes()``, ``valid_frame(endpoint)`` (a frame of a known ``op`` with random field
  values, encoded by the real encoder), ``mutate(frame, kind)`` for every kind in
  :data:`MUTATIONS`, ``greeting(endpoint)`` (the first frame a session expects) and
  ``burst(endpoint)`` -> :class:`Burst` (greeting?, valid frames, a malformed tail?).
* :class:`Monitor` -- installed in the loop that runs the *servers*: captures loop exception
  handler calls and ERROR records of the ``zipcomm``/``cirrus`` loggers (the expected
  "closing connection ... " WARNINGs are only counted), measures the worst event-loop stall with
  a task that sleeps 10 ms and records its lateness, and VmRSS (after ``gc.collect()``).
* :func:`run_fuzz` -- drives ``concurrency`` raw connections (client handshake, then a burst
  written in chunks of 1 byte .. 64 KiB, then close or wait for the server to close) at a set of
  endpoints until ``frames`` were sent or ``seconds`` passed, while :class:`Health` probes each
  endpoint with a well-behaved client; returns per-endpoint :class:`EndpointStats`.
* :func:`endpoints` -- async context manager that starts a controller, a member (its peer port),
  a host daemon and a parameter-server shard in the running loop, and yields their addresses.
* ``python -m zipcomm.testing.fuzz serve`` -- the same endpoints in a process of their own with a
  :class:`Monitor`; prints ``{"endpoints": ...}`` as one JSON line, and on ``stop`` from stdin
  prints the monitor's report as one JSON line (used by ``bench/fuzz.py`` so that the fuzzer's
  own CPU time is never counted as a server stall).

Every failure message carries ``seed=...``: ``FrameFuzzer(seed)`` replays the same frames (the
interleaving of concurrent connections on the sockets is up to the scheduler).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import random
import socket
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np

from ..errors import ProtocolError
from ..protocol import messages as _messages
from ..protocol.frames import encode_frame
from ..protocol.handshake import HELLO_SIZE, Handshake
from ..protocol.limits import DEFAULT_LIMITS, MAGIC, PREFIX, PREFIX_SIZE, VERSION
from ..protocol.payload import pack_payload
from ..transport.connection import parse_address

__all__ = [
    "MUTATIONS",
    "GENERATORS",
    "ENDPOINT_KINDS",
    "Burst",
    "FrameFuzzer",
    "Monitor",
    "Health",
    "EndpointStats",
    "FuzzResult",
    "run_fuzz",
    "endpoints",
    "raw_frame",
    "read_rss",
]

log = logging.getLogger("zipcomm.testing.fuzz")

MUTATIONS = (
    "bitflip",  # 1..8 random bits flipped anywhere in a valid frame
    "truncate",  # a valid frame cut short (the rest never comes)
    "splice",  # the head of one frame joined to the tail of another
    "dup_length",  # the prefix repeated, or length fields copied from another frame
    "oversize_length",  # header_len / buffers_len larger than the data or than the limits
    "prefix_fields",  # wrong magic, version, flags or reserved field
    "wrong_type",  # a header field (op, a record field, "bufs", a key) of the wrong type
    "deep_nest",  # lists / maps nested far deeper than any record
    "huge_bufs",  # "bufs" descriptors: thousands of them, huge shapes, bad dtypes, lies
    "unknown_op",  # an op no endpoint knows (empty, huge, unicode, near misses)
)
GENERATORS = ("random", "valid", *MUTATIONS)
ENDPOINT_KINDS = ("controller", "member", "daemon", "ps")

# Ops each endpoint acts on after its greeting; valid frames mostly use these so that the
# fuzzer gets past "unexpected op" into the handlers.
_ACCEPTED = {
    "controller": ("ping", "join", "leave", "lookup_root", "list_members"),
    "member": ("quiesce", "quiesce_ack", "link", "link_ack", "item", "up_done", "submit", "need_list",
               "piece", "sync_done", "result", "part", "rewire", "gone"),
    "daemon": ("d_alloc", "d_free", "d_join", "d_leave", "d_send", "d_reduce"),
    "ps": ("call", "cast"),
}
_PS_METHODS = ("create", "pull", "push", "pushpull", "retire", "kv_set", "kv_get", "stats", "nosuch")
_HEALTH_TABLE = "fuzz-health"  # the fuzzer never names it


def _registry() -> dict[str, type]:
    from ..daemon import protocol as _daemon_protocol  # noqa: F401  (registers the d_ ops)

    return dict(_messages._REGISTRY)


def raw_frame(header_bytes: bytes, body: bytes = b"", *, header_len: int | None = None,
              buffers_len: int | None = None, magic: bytes = MAGIC, version: int = VERSION,
              flags: int = 0, reserved: int = 0) -> bytes:
    """A frame assembled by hand: any prefix field may lie about what follows."""
    return PREFIX.pack(magic, version, flags, reserved,
                       len(header_bytes) if header_len is None else header_len,
                       len(body) if buffers_len is None else buffers_len) + header_bytes + body


def _join(pieces: list) -> bytes:
    return b"".join(bytes(p) for p in pieces)


@dataclass
class Burst:
    """What one connection sends: ``frames`` units (a random blob counts as one)."""

    data: bytes
    frames: int
    kinds: Counter


class FrameFuzzer:
    """Deterministic generators of frames and malformed frames (``random.Random(seed)``)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.ops = _registry()
        self.produced: Counter = Counter()  # generator / mutation kind -> count

    # -- values -----------------------------------------------------------------------------------
    def _int(self) -> int:
        r = self.rng
        return r.choice((0, 1, -1, 2, 7, 255, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1,
                         r.randrange(-1000, 1000), r.randrange(1 << 40)))

    def _str(self) -> str:
        r = self.rng
        return r.choice(("", "c0", "c1", "c2", "broadcast", "reduce", "shuffle", "sender", "receiver",
                         "both", "member", "sum", "max", "\x00", "é" * r.randrange(1, 40),
                         "x" * r.choice((1, 100, 5000)), "127.0.0.1:1", "unix:/nonexistent",
                         "".join(r.choice("abc:/. 0123456789") for _ in range(r.randrange(12)))))

    def _scalar(self) -> Any:
        r = self.rng
        k = r.randrange(7)
        return (None, True, self._int(), r.random() * 10 ** r.randrange(-5, 20), self._str(),
                r.randbytes(r.randrange(64)), float("nan"))[k]

    def _value(self, depth: int = 0) -> Any:
        r = self.rng
        k = r.randrange(10)
        if depth > 3 or k < 5:
            return self._scalar()
        if k < 7:
            return [self._value(depth + 1) for _ in range(r.randrange(5))]
        if k < 9:
            return {self._str(): self._value(depth + 1) for _ in range(r.randrange(5))}
        return self._array()

    def _array(self) -> np.ndarray:
        r = self.rng
        dtype = r.choice(("float32", "float64", "int64", "uint8", "float16", "bool", "complex64", "M8[s]"))
        shape = tuple(r.randrange(6) for _ in range(r.randrange(4)))
        if r.random() < 0.05:
            shape = (r.randrange(1, 70000),)  # a body bigger than the decoder's window
        return np.zeros(shape, dtype=dtype)

    def _field_value(self, kind: str | None, name: str) -> Any:
        r = self.rng
        if r.random() < 0.1:
            return self._value()  # any type at all
        if kind == "int":
            return self._int()
        if kind == "str":
            return self._str()
        if kind == "bool":
            return r.random() < 0.5
        if kind == "list":
            if name in ("key", "prev", "last_key"):
                return [self._int(), self._int()]
            return [self._int() if r.random() < 0.7 else self._value() for _ in range(r.randrange(4))]
        if kind == "dict":
            return {self._str(): self._value(1) for _ in range(r.randrange(3))}
        if name == "shm":
            return r.choice((None, [self._int(), self._int(), r.choice(("<f4", "|u1", "O", "<U9")),
                                     [r.randrange(8)]], [self._int()] * 5, [[1], 2, "<f4", [2]], "x"))
        return self._value()

    def _ps_data(self, method: str) -> Any:
        r = self.rng
        table = r.choice(("t0", "t1", "t2", ""))
        rows = [r.randrange(-2, 40) for _ in range(r.randrange(6))]
        if method == "create":
            return {"table": table, "rows": r.randrange(0, 64), "cols": r.randrange(1, 8),
                    "init": r.choice(("zeros", "normal", "bogus")), "seed": r.randrange(10),
                    "optimizer": r.choice(("sgd", "adam", "adagrad", "add", "bogus")),
                    "hyper": r.choice(({}, {"lr": 0.1}, {"bogus": 1}))}
        if method == "pull":
            return {"table": table, "rows": rows, "all": r.random() < 0.2, "f16": r.random() < 0.2,
                    "worker": r.choice((None, "w0", "w1")), "inc": r.randrange(3)}
        if method in ("push", "pushpull"):
            push = {"table": table, "rows": rows, "worker": r.choice(("w0", "w1", "w2")),
                    "inc": r.randrange(3), "step": r.randrange(1000), "version": r.randrange(5),
                    "grads": np.zeros((len(rows), r.randrange(1, 8)), dtype=r.choice(("f4", "f2", "f8")))}
            if method == "push":
                return push
            return {"push": push if r.random() < 0.7 else None, "pull": {"table": table, "rows": rows}}
        if method == "retire":
            return {"worker": r.choice(("w0", "w1", "w2")), "inc": r.randrange(3)}
        if method == "kv_set":
            return {"key": f"k{r.randrange(16)}", "value": self._value(2)}
        if method == "kv_get":
            return {"key": f"k{r.randrange(16)}"}
        return self._value()

    # -- frames -----------------------------------------------------------------------------------
    def _record(self, op: str, endpoint: str) -> tuple[dict, list]:
        r = self.rng
        if op in ("call", "cast"):
            method = r.choice(_PS_METHODS)
            header: dict = {"op": op, "m": method}
            if op == "call":
                header["id"] = r.randrange(1 << 31)
            data = self._ps_data(method) if r.random() < 0.9 else self._value()
        else:
            cls = self.ops[op]
            header = {"op": op}
            data = None
            for f in dataclasses.fields(cls):
                if f.name == "data":
                    data = self._value()
                elif r.random() < 0.97:  # now and then a field is missing
                    header[f.name] = self._field_value(f.metadata.get("kind"), f.name)
        if op in ("call", "cast") or any(f.name == "data" for f in dataclasses.fields(self.ops[op])):
            try:
                tree, buffers = pack_payload(data)
            except Exception:
                tree, buffers = None, []
            header["data"] = tree
            return header, buffers
        return header, []

    def _encode(self, header: dict, buffers: list) -> bytes:
        try:
            return _join(encode_frame(header, buffers))
        except Exception:  # e.g. a NaN-free float the encoder dislikes: send the op alone
            return _join(encode_frame({"op": header["op"]}))

    def valid_frame(self, endpoint: str = "controller") -> bytes:
        """A well-formed frame of a known op with random field values."""
        r = self.rng
        if r.random() < 0.85:
            op = r.choice(_ACCEPTED[endpoint])
        else:
            op = r.choice((*self.ops, "call", "cast", "ret", "err"))
        if op in ("ret", "err"):
            header: dict = {"op": op, "id": self._int(), "data": None}
            return self._encode(header, [])
        self.produced["valid"] += 1
        return self._encode(*self._record(op, endpoint))

    def greeting(self, endpoint: str) -> bytes:
        """The first frame a session on ``endpoint`` expects (a fresh random identity)."""
        r = self.rng
        member = (1 << 40) + r.randrange(1 << 40)  # never one of the real members' ids
        if endpoint == "controller":
            header = {"op": "hello", "member": member, "address": r.choice(("127.0.0.1:1", self._str())),
                      "host": r.choice(("fuzzhost", self._str()))}
        elif endpoint == "member":
            header = {"op": "peer_hello", "member": member, "address": r.choice(("", "", "127.0.0.1:1"))}
        elif endpoint == "daemon":
            header = {"op": "d_hello", "member": member, "pid": r.randrange(1 << 22)}
        else:
            return b""
        return _join(encode_frame(header))

    def random_bytes(self) -> bytes:
        r = self.rng
        self.produced["random"] += 1
        n = int(2 ** r.uniform(0, 14))
        blob = r.randbytes(n)
        if r.random() < 0.5:  # a plausible prefix in front, so the header parser sees it too
            blob = raw_frame(blob[: r.randrange(n + 1)], b"", header_len=r.randrange(n + 1),
                             buffers_len=r.choice((0, r.randrange(n + 1)))) + blob
        return blob

    # -- mutations ---------------------------------------------------------------------------------
    def mutate(self, frame: bytes, kind: str, other: bytes | None = None) -> bytes:
        """``frame`` (a valid frame) malformed the way ``kind`` says; never returns it unchanged."""
        r = self.rng
        if kind not in MUTATIONS:
            raise ValueError(f"unknown mutation {kind!r}; known: {MUTATIONS}")
        self.produced[kind] += 1
        other = other if other is not None else self.valid_frame()
        _, _, _, _, hlen, blen = PREFIX.unpack_from(frame)
        header_bytes = frame[PREFIX_SIZE: PREFIX_SIZE + hlen]
        body = frame[PREFIX_SIZE + hlen:]
        if kind == "bitflip":
            out = bytearray(frame)
            for _ in range(r.randrange(1, 9)):
                i = r.randrange(len(out))
                out[i] ^= 1 << r.randrange(8)
            out = bytes(out)
        elif kind == "truncate":
            out = frame[: r.randrange(1, len(frame))] if len(frame) > 1 else b""
        elif kind == "splice":
            out = frame[: r.randrange(1, len(frame))] + other[r.randrange(len(other)):]
        elif kind == "dup_length":
            if r.random() < 0.5:
                out = frame[:PREFIX_SIZE] + frame  # the prefix twice
            else:
                _, _, _, _, ohlen, oblen = PREFIX.unpack_from(other)
                out = raw_frame(header_bytes, body, header_len=ohlen, buffers_len=r.choice((oblen, blen)))
        elif kind == "oversize_length":
            big = r.choice((1, 2, 1000, DEFAULT_LIMITS.max_header, DEFAULT_LIMITS.max_header + 1, 2**31, 2**32 - 1))
            which = r.random()
            if which < 0.5:
                out = raw_frame(header_bytes, body, header_len=min(hlen + big, 2**32 - 1))
            else:
                out = raw_frame(header_bytes, body, buffers_len=r.choice(
                    (blen + 1, blen + 70000, DEFAULT_LIMITS.max_buffers, DEFAULT_LIMITS.max_buffers + 1, 2**63, 2**64 - 1)))
        elif kind == "prefix_fields":
            field_ = r.randrange(4)
            out = raw_frame(header_bytes, body,
                            magic=r.choice((b"ZIPD", b"zipc", b"\x00\x00\x00\x00", b"GET ")) if field_ == 0 else MAGIC,
                            version=r.choice((0, 2, 255)) if field_ == 1 else VERSION,
                            flags=r.randrange(1, 256) if field_ == 2 else 0,
                            reserved=r.randrange(1, 65536) if field_ == 3 else 0)
        else:
            header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=False)
            if kind == "wrong_type":
                wrong = r.choice((None, 1, -1, 2.5, "s", b"b", [1], {"a": 1}, True, 2**64 - 1))
                keys = [k for k in header if k != "bufs"]
                choice = r.randrange(4)
                if choice == 0:
                    header["op"] = wrong if not isinstance(wrong, str) else 7
                elif choice == 1 and len(keys) > 1:
                    header[r.choice(keys[1:])] = wrong
                elif choice == 2:
                    header["bufs"] = r.choice(({"nd": 1}, "b", 5, [None], [["b"]], [["b", -1]]))
                else:
                    header[r.choice((1, b"k", None, 2.5))] = 1
                out = raw_frame(msgpack.packb(header, strict_types=False), body)
            elif kind == "deep_nest":
                depth = r.choice((101, 200, 1000, 3000, 10000))
                nest: Any = r.choice((0, "x", None))
                use_map = r.random() < 0.3
                for _ in range(depth):
                    nest = {"k": nest} if use_map else [nest]
                target = r.choice(("data", "meta", "result", "key", "zz"))
                try:
                    packed = msgpack.packb({**header, target: nest})
                except (ValueError, RecursionError):  # the encoder has its own depth limit
                    packed = msgpack.packb(header)[:1] + b"\x91" * depth + b"\xc0"
                out = raw_frame(packed, body)
            elif kind == "huge_bufs":
                choice = r.randrange(6)
                if choice == 0:
                    bufs = [["b", 0]] * r.choice((4096, 4097, 20000))
                    blen2 = 0
                elif choice == 1:
                    bufs = [["nd", "<f8", [2**62, 2**62], 0]]
                    blen2 = 0
                elif choice == 2:
                    bufs = [["nd", r.choice(("O", "|O8", "<U999999999", "V0", "<f4,<i4", "(2,)f4", "<M8[as]", "<f4" * 20)),
                             [1], 4]]
                    blen2 = 4
                elif choice == 3:
                    bufs = [["nd", "<f4", [3, 0, 2**63 - 1], 0]]
                    blen2 = 0
                elif choice == 4:
                    bufs = [["b", 2**40]]
                    blen2 = 2**40
                else:
                    bufs = [["nd", "<f4", [r.randrange(100)] * 65, 0]]
                    blen2 = 0
                header["bufs"] = bufs
                packed = msgpack.packb(header)
                out = raw_frame(packed, b"", buffers_len=blen2) if len(packed) <= DEFAULT_LIMITS.max_header \
                    else raw_frame(packed[: 1 << 16], b"")
            else:  # unknown_op
                header["op"] = r.choice(("", "HELLO", "hello ", "d_", "call\x00", "x" * 100000, "ü" * 50,
                                         "".join(r.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(8))))
                out = raw_frame(msgpack.packb(header), body)
        if out == frame:  # e.g. a bit flipped twice; still a mutation, so make it differ
            out = frame + b"\x00"
        return out

    def malformed(self, endpoint: str = "controller") -> tuple[str, bytes]:
        kind = self.rng.choice(MUTATIONS)
        return kind, self.mutate(self.valid_frame(endpoint), kind, self.valid_frame(endpoint))

    def burst(self, endpoint: str, max_frames: int = 200) -> Burst:
        """One connection's worth: greeting (usually), valid frames, and often a malformed tail."""
        r = self.rng
        kinds: Counter = Counter()
        pieces: list[bytes] = []
        x = r.random()
        if x < 0.1:
            pieces.append(self.random_bytes())
            kinds["random"] += 1
        else:
            if x < 0.8:
                g = self.greeting(endpoint)
                if g:
                    pieces.append(g)
                    kinds["greeting"] += 1
            for _ in range(r.randrange(max_frames + 1)):
                pieces.append(self.valid_frame(endpoint))
                kinds["valid"] += 1
            if r.random() < 0.6:
                kind, bad = self.malformed(endpoint)
                pieces.append(bad)
                kinds[kind] += 1
        if not pieces:  # never an empty connection
            pieces.append(self.valid_frame(endpoint))
            kinds["valid"] += 1
        return Burst(b"".join(pieces), sum(kinds.values()), kinds)


# --- server-side monitoring ---------------------------------------------------------------------


def read_rss() -> int:
    """This process's resident set size in bytes (VmRSS), after a full collection."""
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Capture(logging.Handler):
    def __init__(self, monitor: Monitor) -> None:
        super().__init__(logging.WARNING)
        self.monitor = monitor

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            exc = record.exc_info[1] if record.exc_info else None
            self.monitor._failure(f"log {record.name}", record.getMessage(), exc)
        else:
            self.monitor.warnings += 1


class Monitor:
    """Install in the servers' loop: uncaught exceptions, ERROR logs, stalls, RSS."""

    LOGGERS = ("zipcomm", "cirrus")

    def __init__(self, tick: float = 0.010) -> None:
        self.tick = tick
        self.failures: list[dict] = []  # first 50 in full
        self.signatures: Counter = Counter()
        self.uncaught = 0
        self.warnings = 0
        self.max_stall = 0.0
        self.max_stall_cpu = 0.0
        self.stalls_over_100ms = 0
        self.rss_before = self.rss_after = 0
        self._task: asyncio.Task | None = None
        self._handler = _Capture(self)
        self._saved: list = []
        self._old_exc_handler = None

    def _failure(self, source: str, message: str, exc: BaseException | None) -> None:
        self.uncaught += 1
        where = ""
        if exc is not None and exc.__traceback__ is not None:
            last = traceback.extract_tb(exc.__traceback__)[-1]
            where = f" at {os.path.basename(last.filename)}:{last.lineno}"
        sig = f"{type(exc).__name__ if exc else 'no exception'}{where}"
        if isinstance(exc, ProtocolError):
            sig = "protocol-error-logged-as-exception: " + sig
        self.signatures[sig] += 1
        if len(self.failures) < 50 or self.signatures[sig] == 1:  # the first of each kind is always kept
            self.failures.append({"source": source, "message": message[:300], "signature": sig,
                                  "exception": repr(exc)[:300] if exc else None,
                                  "traceback": "".join(traceback.format_exception(exc))[-2000:] if exc else None})

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        self._failure("loop", str(context.get("message")), context.get("exception"))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._old_exc_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        for name in self.LOGGERS:
            lg = logging.getLogger(name)
            self._saved.append((lg, lg.level, lg.propagate))
            lg.setLevel(logging.WARNING)
            lg.propagate = False  # nothing piles up in other handlers (pytest's capture) during the run
            lg.addHandler(self._handler)
        self.rss_before = read_rss()
        self._task = asyncio.create_task(self._watch(), name="fuzz-stall-monitor")

    async def _watch(self) -> None:
        while True:
            began, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.tick)
            late = time.perf_counter() - began - self.tick
            if late > self.max_stall:
                self.max_stall = late
                # the loop thread's own CPU time over that tick: far below the stall means the
                # process was waiting for a core (a loaded machine), not busy in a handler
                self.max_stall_cpu = time.thread_time() - cpu
            if late > 0.100:
                self.stalls_over_100ms += 1

    async def stop(self) -> dict:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.rss_after = read_rss()
        return self.report()

    def uninstall(self) -> None:
        asyncio.get_running_loop().set_exception_handler(self._old_exc_handler)
        for lg, level, propagate in self._saved:
            lg.removeHandler(self._handler)
            lg.setLevel(level)
            lg.propagate = propagate
        self._saved.clear()

    def report(self) -> dict:
        return {"uncaught": self.uncaught, "signatures": dict(self.signatures), "failures": self.failures,
                "protocol_warnings": self.warnings, "max_stall": self.max_stall, "max_stall_cpu": self.max_stall_cpu,
                "stalls_over_100ms": self.stalls_over_100ms, "rss_before": self.rss_before,
                "rss_after": self.rss_after, "rss_growth": self.rss_after - self.rss_before}


# --- endpoints ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def endpoints():
    """Start one endpoint of each kind in the running loop; yields ``{kind: address}``."""
    import zipcomm
    from cirrus.ps import Shard

    from ..daemon import Daemon

    tmp = tempfile.mkdtemp(prefix="zipcomm-fuzz-")
    async with zipcomm.Controller("127.0.0.1:0") as ctl, \
            Daemon(ctl.address, os.path.join(tmp, "d.sock"), shm_size=8 << 20) as dm:
        rt = await zipcomm.connect(ctl.address, daemon="")
        shard = Shard(0, 1)
        try:
            ps = await shard.start()
            yield {"controller": ctl.address, "member": rt.address, "daemon": "unix:" + dm.socket_path, "ps": ps}
        finally:
            await shard.aclose()
            await rt.aclose()
    with contextlib.suppress(OSError):
        os.rmdir(tmp)


# --- health probes (a well-behaved client per endpoint) -----------------------------------------


class Health:
    """Probes each endpoint the way a real client uses it; counts passes and failures."""

    def __init__(self, addresses: dict[str, str], timeout: float = 10.0) -> None:
        self.addresses = addresses
        self.timeout = timeout
        self.passed: Counter = Counter()
        self.failed: Counter = Counter()
        self.errors: list[str] = []
        self.worst: dict[str, float] = {}
        self._rt = None
        self._ps = None
        self._n = 0

    async def setup(self) -> None:
        import zipcomm

        if "controller" in self.addresses:
            self._rt = await zipcomm.connect(self.addresses["controller"], daemon="")
        if "ps" in self.addresses:
            self._ps = await zipcomm.rpc_connect(self.addresses["ps"])
            await self._ps.call("create", {"table": _HEALTH_TABLE, "rows": 4, "cols": 2, "optimizer": "add"})

    async def aclose(self) -> None:
        if self._ps is not None:
            await self._ps.aclose()
        if self._rt is not None:
            await self._rt.aclose()

    async def _probe(self, kind: str) -> None:
        from ..transport.connection import open_connection

        address = self.addresses[kind]
        self._n += 1
        if kind == "controller":
            ch = await self._rt.broadcast_channel(f"health-{self._n}")  # a real member joins a channel
            await ch.aclose()
        elif kind == "ps":
            got = await self._ps.call("pull", {"table": _HEALTH_TABLE, "rows": [0, 1]})
            assert got["values"].shape == (2, 2), got
        else:
            conn = await open_connection(address)  # a legit handshake
            await conn.aclose()

    async def check(self, kind: str) -> bool:
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                await self._probe(kind)
        except Exception as exc:  # noqa: BLE001 - any failure of a probe is the finding
            self.failed[kind] += 1
            if len(self.errors) < 20:
                self.errors.append(f"{kind}: {exc!r}"[:300])
            return False
        took = time.perf_counter() - began
        self.worst[kind] = max(self.worst.get(kind, 0.0), took)
        self.passed[kind] += 1
        return True

    async def check_all(self) -> bool:
        results = [await self.check(kind) for kind in self.addresses]
        return all(results)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Probe every endpoint every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            await self.check_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


# --- the fuzz driver ----------------------------------------------------------------------------


@dataclass
class EndpointStats:
    frames: int = 0
    bytes: int = 0
    connections: int = 0
    closed_by_server: int = 0  # the server ended the connection before we did
    connect_failures: int = 0
    stuck: int = 0  # a connection where writing or closing did not finish within the deadline
    kinds: Counter = field(default_factory=Counter)
    # (generator seed, connection number, ending, burst bytes) of the first stuck connections:
    # FrameFuzzer(seed) replays them, or send the bytes after a handshake
    stuck_samples: list = field(default_factory=list)


@dataclass
class FuzzResult:
    seed: int
    seconds: float
    stats: dict[str, EndpointStats]
    health_during: Health
    health_after_ok: bool = False

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.stats.values())

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {
            "seed": self.seed, "seconds": round(self.seconds, 2), "frames": self.frames,
            "frames_per_s": round(self.frames_per_second),
            "endpoints": {k: {"frames": s.frames, "bytes": s.bytes, "connections": s.connections,
                              "closed_by_server": s.closed_by_server, "connect_failures": s.connect_failures,
                              "stuck": s.stuck, "kinds": dict(s.kinds),
                              "stuck_samples": [f"seed={a} connection={b} ending={c} bytes={len(d)}"
                                                for a, b, c, d in s.stuck_samples]}
                          for k, s in self.stats.items()},
            "health_during": {"passed": dict(self.health_during.passed), "failed": dict(self.health_during.failed),
                              "worst_s": {k: round(v, 3) for k, v in self.health_during.worst.items()},
                              "errors": self.health_during.errors},
            "health_after_ok": self.health_after_ok,
        }


async def _open_raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, where = parse_address(address)
    if kind == "unix":
        return await asyncio.open_unix_connection(where)  # type: ignore[arg-type]
    host, port = where  # type: ignore[misc]
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _one_connection(fz: FrameFuzzer, kind: str, address: str, st: EndpointStats,
                          deadline: float = 10.0) -> None:
    rng = fz.rng
    number = fz.produced["connections"]
    fz.produced["connections"] += 1
    burst = fz.burst(kind)
    # chunk sizes are drawn before any await so that the frames a seed produces do not depend on
    # how connections interleave
    sizes = []
    left = len(burst.data)
    small = rng.random() < 0.1  # now and then a byte-at-a-time (or nearly) delivery
    while left > 0:
        n = max(1, min(left, int(2 ** rng.uniform(0, 4 if small else 16))))
        sizes.append(n)
        left -= n
    if len(sizes) > 512:  # a drip of tiny chunks covers the first bytes of a long burst only
        rest = sum(sizes[512:])
        sizes = sizes[:512] + [rest]
    ending = rng.choice(("close", "abort", "wait"))
    hs = Handshake(is_client=True, secret=None)
    st.connections += 1
    try:
        reader, writer = await asyncio.wait_for(_open_raw(address), deadline)
    except (OSError, TimeoutError):
        st.connect_failures += 1
        return
    server_closed = False
    drainer: asyncio.Task | None = None
    phase = "handshake"

    async def discard_replies() -> bool:
        # replies are read and dropped so that a server answering us never blocks on a full socket
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
            return True
        return True

    try:
        async with asyncio.timeout(deadline):
            writer.write(hs.initial_bytes())
            got = await reader.readexactly(HELLO_SIZE)
            hs.receive(got)
            assert hs.done
            drainer = asyncio.create_task(discard_replies())
            phase = "write"
            sent, pos = 0, 0
            for n in sizes:
                if writer.transport.is_closing():  # the server already closed it
                    raise ConnectionResetError("closed by the server mid-burst")
                writer.write(burst.data[pos: pos + n])
                pos += n
                sent += n
                if writer.transport.get_write_buffer_size() > (256 << 10):
                    phase = f"drain at byte {pos}"
                    await writer.drain()
                    phase = "write"
                elif n < 64:
                    await asyncio.sleep(0)  # let tiny chunks go out as separate segments
            st.frames += burst.frames
            st.bytes += sent
            st.kinds.update(burst.kinds)
            phase = f"end ({ending})"
            if ending == "wait":
                # the server either closes this connection (a protocol error) or keeps it:
                # read (discarding replies) until EOF or a short deadline
                done, _ = await asyncio.wait([drainer], timeout=0.2)
                server_closed = bool(done)
            else:
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
        server_closed = True
        st.frames += burst.frames  # partially delivered: the server cut us off
        st.kinds.update(burst.kinds)
    except Exception as exc:  # noqa: BLE001 - a timeout, or e.g. the server's hello is malformed
        st.stuck += 1
        st.kinds[f"stuck:{type(exc).__name__}"] += 1
        if len(st.stuck_samples) < 5:
            st.stuck_samples.append((fz.seed, number, f"{ending}, {type(exc).__name__} in {phase}", burst.data))
    finally:
        if drainer is not None:
            if drainer.done():
                server_closed = True
            drainer.cancel()
        if server_closed:
            st.closed_by_server += 1
        if ending == "abort":
            writer.transport.abort()
        else:
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


async def run_fuzz(addresses: dict[str, str], *, seed: int, frames: int, seconds: float,
                   concurrency: int = 32, health_interval: float = 0.5,
                   progress: Callable[[FuzzResult], Any] | None = None) -> FuzzResult:
    """Fuzz ``addresses`` (``{kind: address}``, kinds from :data:`ENDPOINT_KINDS`) until
    ``frames`` were sent or ``seconds`` passed; health probes run meanwhile and once after."""
    stats = {kind: EndpointStats() for kind in addresses}
    health = Health(addresses)
    await health.setup()
    result = FuzzResult(seed, 0.0, stats, health)
    kinds = list(addresses)
    stop = asyncio.Event()
    began = time.perf_counter()
    give_up = began + seconds

    async def worker(i: int) -> None:
        fz = FrameFuzzer(seed * 1000 + i)
        j = i
        while not stop.is_set():
            if result.frames >= frames or time.perf_counter() >= give_up:
                stop.set()
                break
            kind = kinds[j % len(kinds)]
            j += 1
            await _one_connection(fz, kind, addresses[kind], stats[kind])

    async def reporter() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)
            result.seconds = time.perf_counter() - began
            if progress is not None:
                progress(result)

    prober = asyncio.create_task(health.run(health_interval, stop))
    rep = asyncio.create_task(reporter())
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        stop.set()
        result.seconds = time.perf_counter() - began
        await prober
        await rep
    result.health_after_ok = await health.check_all()
    await health.aclose()
    return result


# --- the endpoints in a process of their own ----------------------------------------------------


async def _serve_main() -> None:
    logging.basicConfig(level=logging.CRITICAL, handlers=[logging.NullHandler()])
    monitor = Monitor()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with endpoints() as eps:
        await monitor.start()
        print(json.dumps({"endpoints": eps, "pid": os.getpid()}), flush=True)
        while True:
            line = await reader.readline()
            if not line or line.strip() == b"stop":
                break
        report = await monitor.stop()
    report["shutdown_uncaught"] = monitor.uncaught - report["uncaught"]
    monitor.uninstall()
    print(json.dumps(report), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["serve"]:
        print("usage: python -m zipcomm.testing.fuzz serve   (endpoints + monitor; 'stop' on stdin ends it)",
              file=sys.stderr)
        return 2
    asyncio.run(_serve_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
