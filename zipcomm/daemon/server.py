"""The per-host daemon: one tree member per host for every channel its local
members use, a shared-memory arena, zero-copy delivery to local members.

* Broadcast: the daemon is the host's member of the channel tree, so an item
  crosses each host once; it lands in the arena once and every local member
  maps the same bytes read-only. A local sender writes its array into an arena
  range and hands the range over; the daemon sends it on without a copy.
* Reduce: local members hand their contributions over as arena ranges; the
  daemon combines them in place (numpy) and takes part in the round as one
  piece covering exactly those members, so one partial per host goes up.
* Shuffle and reduce channels with a custom ``reduce_f`` do not use the daemon:
  members talk to their peers directly, as without a daemon.

Ranges are reference counted: the daemon's own views (stream history, rounds
in flight) and every view a member holds. A range is freed when the last one
is dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import logging
import mmap
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..channels.broadcast import BroadcastChannel
from ..channels.core import HISTORY_BYTES, History
from ..channels.reduce import _NOTHING, ReduceChannel
from ..errors import (ArenaError, ArenaFull, ArenaUnavailable, ChannelClosed, ConnectionClosed,
                      MembershipError, ProtocolError, RemoteProtocolError, ZipError)
from ..ops import FastOp, reduce_by_name
from ..protocol import messages as m
from ..protocol.limits import SHM_MIN
from ..runtime import Runtime
from ..shm import Arena, SegmentLedger, sweep
from ..transport.connection import Connection, Server, start_server
from . import protocol as d

log = logging.getLogger("zipcomm.daemon")

MAX_RANGES_PER_SESSION = 1 << 16
ROUNDS_AHEAD = 1024  # how far ahead of the host's current round a member may contribute
HISTORY_SHARE = 8  # a channel's repair history may pin 1/HISTORY_SHARE of the arena
REDUCE_BLOCK = 256 << 10  # bytes of the partial result combined at a time (fits a core's L2)


def history_bytes_for(arena_size: int | None) -> int:
    """What a channel's repair history may pin, in the daemon and in each local member: its
    items' data sit in the arena, so at most 1/HISTORY_SHARE of it (the members' own data
    needs the rest)."""
    if not arena_size:
        return HISTORY_BYTES
    return max(SHM_MIN, min(HISTORY_BYTES, arena_size // HISTORY_SHARE))


def range_of(arr: np.ndarray) -> list:
    return [0, int(arr.nbytes), arr.dtype.str, list(arr.shape)]


class Ranges:
    """Reference counts of arena ranges; a range is freed at count zero."""

    def __init__(self, arena: Arena | None) -> None:
        self.arena = arena
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.starts: list[int] = []  # sorted offsets of live ranges
        self.base = 0
        if arena is not None:
            self.base = np.frombuffer(arena.buf, dtype=np.uint8, count=1).__array_interface__["data"][0]

    def alloc(self, nbytes: int) -> int:
        if self.arena is None:
            raise ArenaFull("this daemon has no arena")
        off = self.arena.alloc(nbytes)
        self.refs[off] = 1
        self.sizes[off] = nbytes
        bisect.insort(self.starts, off)
        return off

    def hold(self, off: int) -> None:
        self.refs[off] += 1

    def release(self, off: int) -> None:
        left = self.refs.get(off)
        if left is None:
            return
        if left > 1:
            self.refs[off] = left - 1
            return
        del self.refs[off], self.sizes[off]
        self.starts.pop(bisect.bisect_left(self.starts, off))
        assert self.arena is not None
        if not self.arena.closed:  # views outliving the daemon's arena die with the process
            self.arena.free(off)

    def wrap(self, off: int, dtype: str, shape: list) -> np.ndarray:
        """A daemon-side writable view of range ``off``; it carries one reference,
        given back when the view and all arrays derived from it are gone."""
        assert self.arena is not None
        base = self.arena.ndarray(off, np.uint8, (self.sizes[off],))
        arr = base[: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
        # numpy points every derived view at the first array of the chain whose base is
        # not an array (the one over the segment's buffer): that one dies last.
        root = base
        while isinstance(root.base, np.ndarray):
            root = root.base
        weakref.finalize(root, self.release, off).atexit = False
        return arr

    def locate(self, arr: np.ndarray) -> int | None:
        """The range ``arr`` starts, if it is a whole-range view of the arena."""
        if self.arena is None or not arr.flags.c_contiguous:
            return None
        addr = arr.__array_interface__["data"][0] - self.base
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or self.starts[i] != addr or arr.nbytes > self.sizes[addr]:
            return None
        return addr


def checked_dtype(text: str) -> np.dtype:
    try:
        dtype = np.dtype(text)
    except TypeError as exc:
        raise RemoteProtocolError(f"bad dtype {text!r}") from exc
    if dtype.hasobject:
        raise RemoteProtocolError(f"object dtype {text!r} refused")
    return dtype


@dataclass(eq=False)
class Session:
    conn: Connection
    member: int
    held: dict[int, int] = field(default_factory=dict)  # range -> references this member holds
    channels: set[str] = field(default_factory=set)

    def send(self, msg: m.Message) -> None:
        try:
            self.conn.send(*msg.to_frame())
        except ConnectionClosed:
            pass


class DaemonBroadcast(BroadcastChannel):
    def __init__(self, daemon: Daemon, name: str) -> None:
        super().__init__(daemon.rt, name)
        self.daemon = daemon
        self.history = History(max_bytes=daemon.history_bytes())
        # Published whole: its members take it from the arena as one range. (Parts that a
        # direct root publishes are assembled before they reach on_item.)
        self.chunk_bytes = 0
        self.locals: dict[int, Session] = {}

    async def on_item(self, item: m.Item) -> None:
        if item.kind == "b":
            self._ack(item)
        self.daemon.feed(self.name, list(self.locals.values()), item, item.kind == "b")


@dataclass
class _Local:
    session: Session
    first_round: int


class DaemonReduce(ReduceChannel):
    def __init__(self, daemon: Daemon, name: str, fn: str) -> None:
        reduce_f = reduce_by_name(fn)
        if reduce_f is None:
            raise MembershipError(f"the daemon combines only built-in reduce functions, not {fn!r}",
                                  channel=name)
        super().__init__(daemon.rt, name, reduce_f=reduce_f)
        self.daemon = daemon
        self.history = History(max_bytes=daemon.history_bytes())
        self.chunk_bytes = 0  # (as in DaemonBroadcast)
        self._own_is_callers = False  # our values are arena ranges we own
        self.locals: dict[int, _Local] = {}
        self.waiting: dict[int, dict[int, tuple[d.DReduce, Any]]] = {}
        self.first_seen: dict[int, float] = {}  # round -> when its first local contribution came

    async def on_item(self, item: m.Item) -> None:
        await super().on_item(item)
        sessions = [local.session for local in self.locals.values()]
        self.daemon.feed(self.name, sessions, item, item.kind == "r" and bool(item.meta.get("all")))

    def add_local(self, session: Session) -> int:
        first = self.next_round
        self.locals[session.member] = _Local(session, first)
        return first

    def remove_local(self, member: int) -> None:
        self.locals.pop(member, None)
        self.start_ready_rounds()

    def on_local(self, member: int, msg: d.DReduce, value: Any) -> None:
        local = self.locals.get(member)
        if local is None or not max(local.first_round, self.next_round) <= msg.round < self.next_round + ROUNDS_AHEAD:
            raise RemoteProtocolError(f"reduce round {msg.round} is not open for member {member:x}")
        entries = self.waiting.setdefault(msg.round, {})
        if not entries:
            self.first_seen[msg.round] = time.perf_counter()
        if member in entries:
            raise RemoteProtocolError(f"member {member:x} gave round {msg.round} twice")
        entries[member] = (msg, value)
        self.start_ready_rounds()

    def start_ready_rounds(self) -> None:
        while not self.closed:
            r = self.next_round
            entries = self.waiting.get(r, {})
            active = [mid for mid, local in self.locals.items() if local.first_round <= r]
            if not entries or any(mid not in entries for mid in active):
                return
            del self.waiting[r]
            values, ids, wants = [], [], []
            allreduce = any(msg.allreduce for msg, _ in entries.values())
            for mid, (msg, value) in entries.items():
                if msg.has_data:
                    values.append(value)
                    ids.append(mid)
                if msg.want or msg.allreduce:
                    wants.append(mid)
            data = _NOTHING
            began = time.perf_counter()
            if values:
                data = self._combine_local(values)
            first = self.first_seen.pop(r, began)
            self.daemon.profile.append({"channel": self.name, "round": r, "gather_ms": (began - first) * 1e3,
                                        "combine_ms": (time.perf_counter() - began) * 1e3,
                                        "members": len(entries)})
            # An allreduce result reaches every local member in the stream feed; a plain
            # reduce's result only those whose handler asked for it.
            _, fut = self.start_round(data, ids=ids, allreduce=allreduce, want=bool(wants))
            if fut is not None:
                # the result must not outlive its delivery: it may hold a range of the arena
                fut.add_done_callback(lambda f, r=r: self._waiters.pop(r, None) if self._waiters.get(r) is f else None)
                if not allreduce:
                    fut.add_done_callback(lambda f, r=r, wants=wants: self._answer(r, wants, f))

    def _combine_local(self, values: list) -> Any:
        if len(values) == 1:
            return values[0]
        assert self.reduce_f is not None
        first = values[0]
        if not (isinstance(self.reduce_f, FastOp) and isinstance(first, np.ndarray)
                and all(isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype
                        for v in values)):
            if isinstance(self.reduce_f, FastOp):
                return self.reduce_f.combine(values, reuse_first=True)
            return self.reduce_f(values)
        # In place in the arena: into the first contribution, unless its member still
        # views it; then into a fresh range. Slices are combined in parallel threads
        # (numpy releases the GIL), all of them reading the shared buffers directly.
        acc = first if first.flags.writeable and first.flags.c_contiguous else self.daemon.empty_like(first)
        self.daemon.parallel_reduce(self.reduce_f.ufunc, values, acc)
        return acc

    def _answer(self, r: int, wants: list[int], fut: asyncio.Future) -> None:
        targets = [self.locals[mid].session for mid in wants if mid in self.locals]
        if fut.cancelled() or fut.exception() is not None:
            error = "channel closed" if fut.cancelled() else str(fut.exception())
            for s in targets:
                s.send(d.DResult(channel=self.name, round=r, error=error))
            return
        value, contributors = fut.result()
        self.daemon.deliver(targets, value, lambda shm, data: d.DResult(
            channel=self.name, round=r, contributors=list(contributors), shm=shm, data=data))


class Daemon:
    """``async with Daemon(controller, socket_path) as daemon``: serve local members."""

    def __init__(self, controller: str, socket_path: str, *, shm_size: int = 1 << 30,
                 secret: bytes | None = None, listen_host: str = "127.0.0.1",
                 host_id: str | None = None, state_file: str | None = None) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.shm_size = shm_size
        self.rt = Runtime(controller, secret=secret, listen_host=listen_host, host_id=host_id)
        self.secret = self.rt.secret
        self.state_file = state_file or self.socket_path + ".segments"
        self.arena: Arena | None = None
        self.ranges = Ranges(None)
        self.channels: dict[str, DaemonBroadcast | DaemonReduce] = {}
        self._joining: dict[str, asyncio.Future] = {}
        self._leaving: dict[str, asyncio.Task] = {}
        self.sessions: set[Session] = set()
        self.by_member: dict[int, Session] = {}  # the latest session of each local member
        self._server: Server | None = None
        self.swept: list[str] = []
        self.stats = {"bytes_to_members_shm": 0, "bytes_to_members_inline": 0, "copies_into_arena": 0}
        self.threads = len(os.sched_getaffinity(0))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # the last rounds' local reduce timings: gathering the contributions, combining them
        self.profile: collections.deque[dict] = collections.deque(maxlen=64)

    async def start(self) -> Daemon:
        self.swept = sweep(self.state_file)
        if self.swept:
            log.info("swept %d segments left by a crashed daemon", len(self.swept))
        try:
            self.arena = Arena.create(self.shm_size, tag="d", ledger=SegmentLedger(self.state_file))
        except ArenaUnavailable as exc:
            log.warning("no shared-memory arena (%s): local members get their data over the socket", exc)
        self.ranges = Ranges(self.arena)
        if self.arena is not None:
            # Map every page into this process now (one read per page): otherwise the first
            # pass over each range, e.g. combining 8 x 100 MB, pays ~25,000 page faults per
            # 100 MB, which costs more than the arithmetic.
            np.frombuffer(self.arena.buf, dtype=np.uint8)[::mmap.PAGESIZE].max()
        await self.rt.start()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a dead daemon's socket (a live one would own the ledger)
        old = os.umask(0o177)
        try:
            self._server = await start_server(f"unix:{self.socket_path}", self._serve, secret=self.secret)
        finally:
            os.umask(old)
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            await self._server.aclose()
        for s in list(self.sessions):
            s.conn.abort()
        await self.rt.aclose()
        for task in list(self._leaving.values()):
            task.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.arena is not None:
            self.arena.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    async def __aenter__(self) -> Daemon:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- data ----------------------------------------------------------------

    def history_bytes(self) -> int:
        return history_bytes_for(self.arena.size if self.arena is not None else None)

    def to_arena(self, value: Any) -> tuple[int | None, Any]:
        """(range, arena view) for an array worth sharing, else (None, value)."""
        if not isinstance(value, np.ndarray) or value.nbytes < SHM_MIN or self.arena is None \
                or value.dtype.hasobject:
            return None, value
        off = self.ranges.locate(value)
        if off is not None:
            return off, value
        try:
            off = self.ranges.alloc(value.nbytes)
        except ArenaFull:
            return None, value
        view = self.ranges.wrap(off, value.dtype.str, list(value.shape))  # holds the range from now on
        np.copyto(view, value)
        self.stats["copies_into_arena"] += 1
        return off, view

    def deliver(self, targets: list[Session], value: Any, make) -> None:
        off, value = self.to_arena(value)
        for s in targets:
            if off is None:
                self.stats["bytes_to_members_inline"] += getattr(value, "nbytes", 0)
                s.send(make(None, value))
                continue
            self.ranges.hold(off)
            s.held[off] = s.held.get(off, 0) + 1
            self.stats["bytes_to_members_shm"] += value.nbytes
            s.send(make([off, int(value.nbytes), value.dtype.str, list(value.shape)], None))

    def empty_like(self, like: np.ndarray) -> np.ndarray:
        """A writable array shaped like ``like``: in the arena if there is room."""
        if self.arena is not None and like.nbytes >= SHM_MIN:
            try:
                return self.ranges.wrap(self.ranges.alloc(like.nbytes), like.dtype.str, list(like.shape))
            except ArenaFull:
                pass
        return np.empty_like(like)

    def parallel_reduce(self, ufunc: np.ufunc, values: list[np.ndarray], out: np.ndarray) -> None:
        """``out = ufunc.reduce(values)`` elementwise, sliced across this host's cores."""
        flat = [v.reshape(-1) for v in values]
        acc = out.reshape(-1)
        n = acc.size
        parts = max(1, min(self.threads, n // (1 << 16)))

        step = max(1, REDUCE_BLOCK // acc.itemsize)

        def work(lo: int, hi: int) -> None:
            # block by block, so that the partial sum stays in cache while every
            # contribution streams through it once (not once per contribution)
            for i in range(lo, hi, step):
                j = min(i + step, hi)
                block = acc[i:j]
                ufunc(flat[0][i:j], flat[1][i:j], out=block)
                for v in flat[2:]:
                    ufunc(block, v[i:j], out=block)

        bounds = [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]
        if parts == 1:
            work(0, n)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="zipcomm-reduce")
        for fut in [self._pool.submit(work, lo, hi) for lo, hi in bounds]:
            fut.result()

    def feed(self, channel: str, targets: list[Session], item: m.Item, with_data: bool) -> None:
        """Pass a stream item to the local members (its data only where they use it)."""
        if not targets:
            return
        make = lambda shm, data: d.DItem(channel=channel, key=list(item.key), prev=list(item.prev),  # noqa: E731
                                          kind=item.kind, meta=item.meta, shm=shm, data=data)
        if with_data:
            self.deliver(targets, item.data, make)
        else:
            for s in targets:
                s.send(make(None, None))

    def _take(self, s: Session, shm: list | None, data: Any) -> Any:
        """The value a member handed over: its range becomes the daemon's."""
        if shm is None:
            return data
        if not (isinstance(shm, list) and len(shm) in (4, 5)):
            raise RemoteProtocolError("bad range descriptor")
        off, nbytes, dtype, shape = shm[:4]
        kept = len(shm) == 5 and shm[4] is True  # the member still views it (zipcomm's empty())
        dt = checked_dtype(dtype)
        if not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape):
            raise RemoteProtocolError("bad shape")
        if s.held.get(off, 0) < 1 or nbytes > self.ranges.sizes.get(off, -1) \
                or int(np.prod(shape, dtype=np.int64)) * dt.itemsize != nbytes:
            raise RemoteProtocolError(f"range {off} is not this member's or does not fit")
        if kept:  # the view takes a reference of its own and must never write there
            self.ranges.hold(off)
            view = self.ranges.wrap(off, dtype, shape)
            view.flags.writeable = False
            return view
        self._drop_held(s, off)
        return self.ranges.wrap(off, dtype, shape)  # the member's reference passes to the view

    def _drop_held(self, s: Session, off: int) -> None:
        left = s.held.get(off, 0) - 1
        if left <= 0:
            s.held.pop(off, None)
        else:
            s.held[off] = left
        # the reference itself moves or is released by the caller

    # -- sessions ------------------------------------------------------------

    async def _serve(self, conn: Connection) -> None:
        hello = m.decode(await conn.recv())
        if not isinstance(hello, d.DHello):
            raise RemoteProtocolError(f"expected d_hello, got {hello.OP!r}")
        s = Session(conn, hello.member)
        self.sessions.add(s)
        self.by_member[s.member] = s
        conn.send(*d.DWelcome(daemon=self.rt.member_id, arena=self.arena.name if self.arena else "",
                              size=self.arena.size if self.arena else 0).to_frame())
        try:
            while True:
                msg = m.decode(await conn.recv())
                self._on_member(s, msg)
        finally:
            self.sessions.discard(s)
            if self.by_member.get(s.member) is s:
                del self.by_member[s.member]
            for name in list(s.channels):
                self._remove_local(name, s)
            for off, count in s.held.items():
                for _ in range(count):
                    self.ranges.release(off)
            s.held.clear()

    def _on_member(self, s: Session, msg: m.Message) -> None:
        match msg:
            case d.DAlloc():
                if len(s.held) >= MAX_RANGES_PER_SESSION:
                    s.send(d.DReply(req=msg.req, ok=False, error="too many ranges held"))
                    return
                if not isinstance(msg.nbytes, int) or msg.nbytes < 0:
                    s.send(d.DReply(req=msg.req, ok=False, error=f"cannot allocate {msg.nbytes!r} bytes"))
                    return
                try:
                    off = self.ranges.alloc(msg.nbytes)
                except (ArenaError, ValueError) as exc:
                    s.send(d.DReply(req=msg.req, ok=False, error=str(exc)))
                    return
                s.held[off] = 1
                s.send(d.DReply(req=msg.req, result={"offset": off}))
            case d.DFree():
                for off in msg.offsets:
                    if isinstance(off, int) and s.held.get(off, 0) > 0:
                        self._drop_held(s, off)
                        self.ranges.release(off)
            case d.DShare():
                s.send(d.DReply(req=msg.req, result={"delivered": self._share(s, msg)}))
            case d.DJoin():
                self.rt._spawn(self._join(s, msg), f"local-join-{msg.channel}")
            case d.DLeave():
                self._remove_local(msg.channel, s)
            case d.DSend():
                ch = self._channel_of(s, msg.channel, DaemonBroadcast)
                value = self._take(s, msg.shm, msg.data)
                self.rt._spawn(self._send(s, ch, msg.msg_id, value), f"local-send-{msg.channel}")
            case d.DReduce():
                ch = self._channel_of(s, msg.channel, DaemonReduce)
                value = self._take(s, msg.shm, msg.data) if msg.has_data else None
                ch.on_local(s.member, msg, value)
            case _:
                raise RemoteProtocolError(f"unexpected {msg.OP!r} from a local member")

    def _share(self, s: Session, msg: d.DShare) -> list[int]:
        """Hand pieces of a range ``s`` holds to other local members (a shuffle's parts):
        each gets a reference of its own and a descriptor; no byte moves.  A malformed
        request is a protocol error (checked whole before anything is handed out)."""
        off = msg.offset
        if not isinstance(off, int) or s.held.get(off, 0) < 1 or off not in self.ranges.sizes:
            raise RemoteProtocolError(f"range {off!r} is not this member's")
        size = self.ranges.sizes[off]
        dt = checked_dtype(msg.dtype)
        if not isinstance(msg.parts, list):
            raise RemoteProtocolError("parts must be a list")
        checked = []
        for part in msg.parts:
            if not (isinstance(part, list) and len(part) == 3 and isinstance(part[0], int)
                    and isinstance(part[1], int) and isinstance(part[2], list)
                    and all(isinstance(x, int) and x >= 0 for x in part[2])):
                raise RemoteProtocolError("bad part descriptor")
            member, start, shape = part
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if start < 0 or start % dt.itemsize or start + nbytes > size:
                raise RemoteProtocolError(f"part [{start}, {start + nbytes}) outside range {off}")
            checked.append((member, start, nbytes, shape))
        delivered = []
        for member, start, nbytes, shape in checked:
            target = self.by_member.get(member)
            if target is None or target is s or len(target.held) >= MAX_RANGES_PER_SESSION:
                continue  # not here (or at its limit): the sender's direct link carries it
            self.ranges.hold(off)
            target.held[off] = target.held.get(off, 0) + 1
            self.stats["bytes_to_members_shm"] += nbytes
            target.send(d.DPart(channel=msg.channel, round=msg.round, sender=s.member, range=off,
                                shm=[off + start, nbytes, dt.str, shape]))
            delivered.append(member)
        return delivered

    def _channel_of(self, s: Session, name: str, kind: type) -> Any:
        ch = self.channels.get(name)
        if name not in s.channels or not isinstance(ch, kind):
            raise RemoteProtocolError(f"member {s.member:x} is not in {kind.__name__} {name!r} here")
        return ch

    async def _send(self, s: Session, ch: DaemonBroadcast, msg_id: int, value: Any) -> None:
        error = ""
        try:
            await ch.send_as(s.member, msg_id, value, owned=True, timeout=None)
        except ZipError as exc:
            error = f"{type(exc).__name__}: {exc}"
        s.send(d.DAck(channel=ch.name, msg_id=msg_id, error=error))

    async def _join(self, s: Session, msg: d.DJoin) -> None:
        try:
            ch = await self._channel(msg.channel, msg.kind, msg.fn)
            if msg.channel in s.channels:
                raise MembershipError("already in this channel", channel=msg.channel)
            if isinstance(ch, DaemonReduce):
                if msg.kind != "reduce" or (msg.fn and msg.fn != ch.fn_name):
                    raise MembershipError(f"channel is a reduce over {ch.fn_name!r} here", channel=msg.channel)
                result = {"first_round": ch.add_local(s)}
            else:
                if msg.kind != "broadcast":
                    raise MembershipError("channel is a broadcast channel here", channel=msg.channel)
                ch.locals[s.member] = s
                result = {"last_key": list(ch.last_key)}
            s.channels.add(msg.channel)
            s.send(d.DReply(req=msg.req, result=result))
        except (ZipError, asyncio.TimeoutError, ValueError, TypeError) as exc:  # bad names, kinds, ...
            s.send(d.DReply(req=msg.req, ok=False, error=f"{type(exc).__name__}: {exc}"))

    async def _channel(self, name: str, kind: str, fn: str):
        while True:
            if (leaving := self._leaving.get(name)) is not None:
                await asyncio.shield(leaving)
                continue
            ch = self.channels.get(name)
            if ch is not None:
                return ch
            if (pending := self._joining.get(name)) is not None:
                await asyncio.shield(pending)
                continue
            break
        fut = asyncio.get_running_loop().create_future()
        self._joining[name] = fut
        try:
            core = DaemonReduce(self, name, fn) if kind == "reduce" else DaemonBroadcast(self, name)
            if kind not in ("reduce", "broadcast"):
                raise MembershipError(f"the daemon serves broadcast and reduce channels, not {kind!r}",
                                      channel=name)
            ch = await self.rt._join(core, 30.0)
            self.channels[name] = ch
            return ch
        finally:
            del self._joining[name]
            fut.set_result(None)

    def _remove_local(self, name: str, s: Session) -> None:
        s.channels.discard(name)
        ch = self.channels.get(name)
        if ch is None:
            return
        if isinstance(ch, DaemonReduce):
            ch.remove_local(s.member)
        else:
            ch.locals.pop(s.member, None)
        if not ch.locals:  # the host has nobody left there: leave the tree
            del self.channels[name]
            self._leaving[name] = self.rt._spawn(self._leave(name, ch), f"leave-{name}")

    async def _leave(self, name: str, ch) -> None:
        try:
            await ch.aclose()
        finally:
            self._leaving.pop(name, None)
