"""A member's side of its host daemon: the session, and the channel handles that
go through it (same API as the direct ones).

If the daemon goes away, each handle falls back to a direct channel: a
broadcast handle re-joins the tree after the last item it delivered (nothing
lost, nothing twice); a reduce handle re-sends its contributions to rounds
without a result as late pieces, which the root counts once or not at all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..channels.broadcast import BroadcastChannel
from ..channels.core import History, get_or_stop
from ..channels.reduce import _NOTHING, ReduceAPI, ReduceChannel
from ..errors import (ArenaAttachError, ChannelClosed, CollectiveTimeout, ConnectionClosed, MembershipError,
                      ProtocolError, RemoteProtocolError, ZipTimeout)
from ..ops import freeze, reduce_name
from ..protocol import messages as m
from ..protocol.payload import snapshot_payload
from ..shm import Attachment
from ..transport.connection import Connection, open_connection
from . import protocol as d
from .server import SHM_MIN, history_bytes_for

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("zipcomm.daemon")


class DaemonLost(ConnectionClosed):
    """The host daemon went away; handles fall back to direct channels."""


class DaemonClient:
    def __init__(self, rt: Runtime, conn: Connection, welcome: d.DWelcome) -> None:
        self.rt = rt
        self.conn = conn
        self.daemon = welcome.daemon
        self.arena_size = welcome.size if welcome.arena else 0
        self.attachment: Attachment | None = None
        if welcome.arena:
            try:
                self.attachment = Attachment.open(welcome.arena, welcome.size)
            except ArenaAttachError as exc:
                log.warning("cannot map the daemon's arena (%s): data goes over the socket", exc)
        self.handles: dict[str, LocalBroadcast | LocalReduce] = {}
        self._own: dict[int, tuple[int, int]] = {}  # address -> (range, bytes) of empty() arrays
        self._req = itertools.count(1)
        self._replies: dict[int, asyncio.Future] = {}
        self.lost = False
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self.task = rt._spawn(self._read(), "daemon-session")

    @classmethod
    async def open(cls, rt: Runtime, path: str, timeout: float = 5.0) -> DaemonClient:
        conn = await asyncio.wait_for(open_connection(f"unix:{path}", secret=rt.secret), timeout)
        try:
            conn.send(*d.DHello(member=rt.member_id, pid=__import__("os").getpid()).to_frame())
            welcome = m.decode(await asyncio.wait_for(conn.recv(), timeout))
            if not isinstance(welcome, d.DWelcome):
                raise RemoteProtocolError(f"daemon answered {welcome.OP!r} to d_hello")
        except BaseException:
            conn.abort()
            raise
        return cls(rt, conn, welcome)

    async def aclose(self) -> None:
        self.lost = True
        self.conn.abort()
        if self.attachment is not None:
            self.attachment.close()

    # -- requests ------------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        if self.lost:
            raise DaemonLost("the host daemon is gone")
        self.conn.send(*msg.to_frame())

    async def request(self, cls: type[m.Message], **fields: Any) -> dict:
        req = next(self._req)
        fut = asyncio.get_running_loop().create_future()
        self._replies[req] = fut
        try:
            self.send(cls(req=req, **fields))
            reply: d.DReply = await fut
        finally:
            self._replies.pop(req, None)
        if not reply.ok:
            raise MembershipError(f"daemon: {reply.error}", channel=fields.get("channel"))
        return reply.result

    async def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        """A writable array in the arena: sent or contributed, it moves without a copy."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if self.attachment is None or nbytes < SHM_MIN or dt.hasobject:
            return np.empty(shape, dt)
        try:
            off = (await self.request(d.DAlloc, nbytes=nbytes))["offset"]
        except MembershipError:
            return np.empty(shape, dt)  # arena full
        arr = self.attachment.writable(off, dt, shape)
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        self._own[arr.__array_interface__["data"][0]] = (off, nbytes)
        weakref.finalize(root, self._free, off).atexit = False  # our reference, given back when dropped
        return arr

    async def put(self, value: Any) -> tuple[list | None, Any]:
        """Hand ``value`` over: an array from :meth:`empty` as it is (it becomes read-only:
        others read it now); another large array is written into an arena range (one
        copy, the caller keeps its array); anything else travels inline."""
        if (self.attachment is None or not isinstance(value, np.ndarray) or value.nbytes < SHM_MIN
                or value.dtype.hasobject):
            return None, value
        own = self._own.get(value.__array_interface__["data"][0]) if value.flags.c_contiguous else None
        if own is not None and own[1] == value.nbytes and value.flags.writeable:
            value.flags.writeable = False
            return [own[0], int(value.nbytes), value.dtype.str, list(value.shape), True], None
        try:
            off = (await self.request(d.DAlloc, nbytes=int(value.nbytes)))["offset"]
        except MembershipError:
            return None, value  # arena full: the socket carries it
        np.copyto(self.attachment.writable(off, value.dtype, value.shape), value)
        return [off, int(value.nbytes), value.dtype.str, list(value.shape)], None

    async def share(self, channel: str, r: int, buf: np.ndarray,
                    parts: list[tuple[int, np.ndarray]]) -> set[int]:
        """Hand ``parts`` (pieces of ``buf``, an array from :meth:`empty`) to the members of
        this host named with them, without a copy; return the members the daemon reached
        (the others need the bytes over a direct link).  Nothing is shared if ``buf`` is not
        in the arena."""
        own = self._own.get(buf.__array_interface__["data"][0]) if buf.flags.c_contiguous else None
        if own is None or not parts:
            return set()
        base = buf.__array_interface__["data"][0]
        desc = [[member, part.__array_interface__["data"][0] - base, list(part.shape)]
                for member, part in parts]
        result = await self.request(d.DShare, channel=channel, round=r, offset=own[0],
                                    dtype=buf.dtype.str, parts=desc)
        return set(result["delivered"])

    def take(self, shm: list | None, data: Any) -> Any:
        """A delivered value: a read-only view of the arena, given back when dropped."""
        if shm is None:
            return freeze(data)
        off, _, dtype, shape = shm
        assert self.attachment is not None
        return self.attachment.view(off, np.dtype(dtype), tuple(shape), on_release=lambda: self._free(off))

    def _free(self, off: int) -> None:
        if self.attachment is not None and not self.attachment.closed:
            self._own.pop(self.attachment.address + off, None)
        # The last view may die in any thread (the blocking facade's caller): the
        # session belongs to the loop's thread.
        if threading.get_ident() != self._thread:
            try:
                self._loop.call_soon_threadsafe(self._free, off)
            except RuntimeError:
                pass  # the loop is closed: the session and its ranges are gone with it
            return
        if not self.lost:
            try:
                self.send(d.DFree(offsets=[off]))
            except ConnectionClosed:
                pass

    def _on_part(self, msg: d.DPart) -> None:
        """A shuffle part another member of this host left in the arena for us."""
        shm = msg.shm
        if self.attachment is None or not (isinstance(shm, list) and len(shm) == 4):
            raise RemoteProtocolError("a shuffle part without a usable range")
        off, _nbytes, dtype, shape = shm
        view = self.attachment.view(off, np.dtype(dtype), tuple(shape),
                                    on_release=lambda: self._free(msg.range))
        core = self.rt.channels.get(msg.channel)
        if core is not None and hasattr(core, "on_shared_part"):
            core.on_shared_part(msg.round, msg.sender, view)
        # else: the channel is gone here; dropping the view gives the range back

    # -- the session ---------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                msg = m.decode(await self.conn.recv())
                match msg:
                    case d.DReply():
                        fut = self._replies.get(msg.req)
                        if fut is not None and not fut.done():
                            fut.set_result(msg)
                    case d.DPart():
                        self._on_part(msg)
                    case d.DAck() | d.DItem() | d.DResult():
                        handle = self.handles.get(msg.channel)
                        if handle is not None:
                            await handle.on_daemon(msg)
                    case _:
                        raise RemoteProtocolError(f"unexpected {msg.OP!r} from the daemon")
        except (ConnectionClosed, ProtocolError) as exc:
            if not self.lost:  # not our own close
                log.warning("host daemon lost (%s): channels fall back to direct links", exc)
        finally:
            self.lost = True
            self.conn.abort()
            for fut in self._replies.values():
                if not fut.done():
                    fut.set_exception(DaemonLost("the host daemon is gone"))
            for handle in list(self.handles.values()):
                handle.daemon_lost()


class _LocalHandle:
    kind = ""

    def __init__(self, client: DaemonClient, name: str) -> None:
        self.client = client
        self.rt = client.rt
        self.name = name
        self.closed = False
        self.direct: Any = None  # the direct channel after a fallback
        self._fallback: asyncio.Task | None = None
        self._fallen = asyncio.Event()
        # The stream as the daemon fed it, bounded like any node's history: after a
        # fallback this member serves it to its new children.
        self.last_key: tuple = (0, 0)
        self.history = History(max_bytes=history_bytes_for(client.arena_size))

    def _record(self, msg: d.DItem) -> m.Item:
        value = self.client.take(msg.shm, msg.data)
        item = m.Item(channel=self.name, key=msg.key, prev=msg.prev, kind=msg.kind, meta=msg.meta, data=value)
        self.last_key = tuple(msg.key)
        self.history.append(item)
        return item

    async def empty(self, shape: Any, dtype: Any = np.float64) -> np.ndarray:
        """A writable array to fill and then send or contribute without a copy: it lives
        in the daemon's shared memory (it turns read-only once handed over)."""
        if self.direct is not None or self.client.lost:
            return self.rt.buffers.empty(shape, dtype)  # the direct links' way (see ChannelCore.empty)
        return await self.client.empty(shape, dtype)

    async def _join(self, fn: str = "") -> dict:
        self.client.handles[self.name] = self
        try:
            return await self.client.request(d.DJoin, channel=self.name, kind=self.kind, fn=fn)
        except BaseException:
            self.client.handles.pop(self.name, None)
            raise

    def daemon_lost(self) -> None:
        if not self.closed and self._fallback is None:
            self._fallback = self.rt._spawn(self._fall_back(), f"fallback-{self.name}")

    async def _fall_back(self) -> None:
        try:
            self.direct = await self.rt._join(self._direct_core(), None)
        finally:
            self._fallen.set()

    async def _wait_direct(self, timeout: float | None) -> Any:
        try:
            await asyncio.wait_for(self._fallen.wait(), timeout)
        except TimeoutError:
            raise ZipTimeout(f"channel {self.name!r}: re-joining without the daemon timed out") from None
        if self.direct is None:
            raise ChannelClosed(f"channel {self.name!r}: could not re-join without the daemon")
        return self.direct

    def _direct_core(self) -> Any:
        raise NotImplementedError

    async def aclose(self, graceful: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.handles.pop(self.name, None)
        self.rt._forget_local(self)
        if self._fallback is not None and not self._fallback.done():
            self._fallback.cancel()
        if self.direct is not None:
            await self.direct.aclose(graceful)
        elif not self.client.lost:
            try:
                self.client.send(d.DLeave(channel=self.name))
            except ConnectionClosed:
                pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LocalBroadcast(_LocalHandle):
    kind = "broadcast"

    def __init__(self, client: DaemonClient, name: str, queue_size: int = 64) -> None:
        super().__init__(client, name)
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self._msg_ids = itertools.count(1)
        self._acks: dict[int, asyncio.Future] = {}
        self.last_msg: dict[int, int] = {}

    async def join(self) -> LocalBroadcast:
        result = await self._join()
        self.last_key = tuple(result["last_key"])
        return self

    async def send(self, data: Any, *, timeout: float | None = 30.0) -> None:
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        if self.direct is None and not self.client.lost:
            m.Submit(channel=self.name, origin=0, msg_id=0, data=data).to_frame()  # refuse bad payloads here
            msg_id = next(self._msg_ids)
            ack = asyncio.get_running_loop().create_future()
            self._acks[msg_id] = ack
            try:
                async with asyncio.timeout(timeout):
                    shm, inline = await self.client.put(data)
                    self.client.send(d.DSend(channel=self.name, msg_id=msg_id, shm=shm, data=inline))
                    error = await ack
            except TimeoutError:
                raise CollectiveTimeout("broadcast not delivered", channel=self.name, epoch=0,
                                        round=msg_id) from None
            except ConnectionClosed:
                error = None  # the daemon died with it: send it directly
            finally:
                self._acks.pop(msg_id, None)
            if error == "":
                return
            if error:
                raise ChannelClosed(f"channel {self.name!r}: {error}")
            # The same (origin, msg_id) again: if the daemon got it into the stream
            # before it died, the root drops the copy.
            direct = await self._wait_direct(timeout)
            await direct.send_as(self.rt.member_id, msg_id, data, timeout=timeout)
            return
        direct = await self._wait_direct(timeout)
        await direct.send(data, timeout=timeout)

    async def receive(self, *, timeout: float | None = None) -> Any:
        if not self._queue.empty():
            return self._queue.get_nowait()
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        if self.direct is not None:
            return await self.direct.receive(timeout=timeout)
        outcome, value = await get_or_stop(self._queue, self._fallen.wait(), timeout)
        if outcome == "item":
            return value
        if outcome == "stop":  # the daemon is gone: what it delivered first, then the direct channel
            return await self.receive(timeout=timeout)
        raise CollectiveTimeout("no broadcast received", channel=self.name, epoch=0, round=self.last_key[1])

    async def on_daemon(self, msg: m.Message) -> None:
        if isinstance(msg, d.DAck):
            ack = self._acks.get(msg.msg_id)
            if ack is not None and not ack.done():
                ack.set_result(msg.error)
        elif isinstance(msg, d.DItem):
            item = self._record(msg)
            if item.kind != "b":
                return
            origin, msg_id = item.meta["origin"], item.meta["msg_id"]
            self.last_msg[origin] = max(self.last_msg.get(origin, -1), msg_id)
            if origin != self.rt.member_id:
                await self._queue.put(item.data)  # a full queue stops reading the daemon: backpressure

    def daemon_lost(self) -> None:
        # sends waiting for the daemon's ack would otherwise wait out their whole timeout: they
        # go again over the direct channel at once (the root drops a copy it already has)
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(DaemonLost("the host daemon is gone"))
        super().daemon_lost()

    def _direct_core(self) -> BroadcastChannel:
        core = BroadcastChannel(self.rt, self.name, queue_size=self.queue_size)
        core.resume(self.last_key, next(self._msg_ids), self.history, self.last_msg)
        return core


class LocalReduce(ReduceAPI, _LocalHandle):
    kind = "reduce"

    def __init__(self, client: DaemonClient, name: str, reduce_f: Any, handler: Callable | None) -> None:
        super().__init__(client, name)
        self.reduce_f = reduce_f
        self.handler = handler
        self.fn = reduce_name(reduce_f)
        self.next_round = 0
        self._waiters: dict[int, asyncio.Future] = {}
        self._given: dict[int, tuple[Any, bool, bool]] = {}  # round -> (value, allreduce, want) until done

    async def join(self) -> LocalReduce:
        result = await self._join(self.fn)
        self.next_round = result["first_round"]
        return self

    async def _contribute(self, data: Any, *, allreduce: bool, want: bool, timeout: float | None):
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        if self.direct is not None or self.client.lost:
            direct = await self._wait_direct(timeout)
            return await direct._contribute(data, allreduce=allreduce, want=want, timeout=timeout)
        if data is not _NOTHING:
            m.Piece(channel=self.name, round=0, contributors=[], data=data).to_frame()  # refuse bad payloads
        r = self.next_round
        self.next_round += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiters[r] = fut
        try:
            async with asyncio.timeout(timeout):
                shm, inline = (None, None) if data is _NOTHING else await self.client.put(data)
                # Kept until the round is done, for a fallback to re-send. A caller that
                # waits for the result cannot touch its array meanwhile: no copy then.
                kept = data if (data is _NOTHING or want or shm is not None and len(shm) == 5) \
                    else snapshot_payload(data)  # (an empty() array is read-only from now on)
                self._given[r] = (kept, allreduce, want)
                try:
                    self.client.send(d.DReduce(channel=self.name, round=r, has_data=data is not _NOTHING,
                                               want=want, allreduce=allreduce, shm=shm, data=inline))
                except ConnectionClosed:
                    pass  # the fallback re-sends what we gave
                if not want:
                    return None
                return await fut
        except TimeoutError:
            raise CollectiveTimeout("reduce round did not complete", channel=self.name, epoch=0, round=r,
                                    missing=["host daemon"]) from None
        finally:
            self._waiters.pop(r, None)

    async def on_daemon(self, msg: m.Message) -> None:
        if isinstance(msg, d.DItem):
            item = self._record(msg)
            if item.kind != "r":
                return
            r = item.meta["round"]
            for old in [k for k in self._given if k <= r]:
                del self._given[old]  # rounds complete in order
            if item.meta.get("all"):
                self._resolve(r, item.data, item.meta["contributors"])
        elif isinstance(msg, d.DResult):
            if msg.error:
                fut = self._waiters.get(msg.round)
                if fut is not None and not fut.done():
                    fut.set_exception(ChannelClosed(f"channel {self.name!r} round {msg.round}: {msg.error}"))
            else:
                self._resolve(msg.round, self.client.take(msg.shm, msg.data), msg.contributors)

    def _resolve(self, r: int, value: Any, contributors: list) -> None:
        fut = self._waiters.get(r)
        if fut is not None and not fut.done():
            fut.set_result((value, contributors))

    def _direct_core(self) -> ReduceChannel:
        core = ReduceChannel(self.rt, self.name, reduce_f=self.reduce_f, handler=self.handler)
        core.resume(self.next_round, self._given, self._waiters, self.last_key, self.history)
        return core

