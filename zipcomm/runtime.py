"""The per-process runtime: one controller session, one peer listener, one
outbound connection per peer process, and the channel handles of this process.

Data is received and forwarded in the background (reader tasks owned by the
runtime), before the application calls ``receive()``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
from typing import TYPE_CHECKING, Any

from .buffers import POOLED_MIN, BufferPool
from .errors import (
    BrokenByPeer,
    ChannelClosed,
    ConnectionClosed,
    MembershipError,
    ProtocolError,
    RemoteProtocolError,
    ZipTimeout,
)
from .protocol import messages as m
from .protocol.handshake import load_secret
from .transport.connection import (Connection, Server, open_connection, parse_address, refuse_open_listen,
                                   start_server)

if TYPE_CHECKING:
    from .channels.core import ChannelCore

log = logging.getLogger("zipcomm.runtime")

PENDING_FRAMES_PER_PEER = 4096  # frames queued while a peer connection is being opened
CONTROLLER_REQUESTS_IN_FLIGHT = 1024
CLOSE_FLUSH_TIMEOUT = 30.0  # a peer that takes longer to handle what we sent is not waited for


# With ZIPCOMM_LOCAL_PEERS=1, peers in the same network namespace talk over a Unix socket (an
# abstract one: no file to clean up, scoped to the namespace, like loopback), falling back to TCP.
# Off by default: receiving 100 MB over it took more CPU than over loopback TCP (CPU time per
# receiving member, 8 members of one host, uvloop and asyncio alike).
LOCAL_PEERS = os.environ.get("ZIPCOMM_LOCAL_PEERS", "0") == "1"


def local_address(address: str) -> str:
    """The abstract Unix socket of the member listening on TCP ``address``: TCP addresses are
    unique within a network namespace, and so are abstract socket names."""
    return "unix:\0zipcomm-peer/" + address


class _PeerLink:
    """Outbound, send-only connection to one peer process (FIFO per peer)."""

    def __init__(self, runtime: Runtime, member: int, address: str) -> None:
        self.member = member
        self.address = address
        self.conn: Connection | None = None
        self.pending: list[tuple[dict, list]] = []
        self.failed: BaseException | None = None
        self.settled = asyncio.Event()  # connected (pending frames handed over) or failed
        self.task = runtime._spawn(self._connect(runtime), f"peer-connect-{member:x}")

    async def _connect(self, runtime: Runtime) -> None:
        try:
            conn = None
            if LOCAL_PEERS:
                try:  # a peer in the same network namespace: its Unix socket, then TCP
                    conn = await open_connection(local_address(self.address), secret=runtime.secret)
                except ConnectionClosed:
                    pass
            if conn is None:
                conn = await open_connection(self.address, secret=runtime.secret)
            conn.info["member"] = self.member
            conn.send(*m.PeerHello(member=runtime.member_id, address=runtime.address).to_frame())
            for header, buffers in self.pending:
                conn.send(header, buffers)
            # this coroutine lives as long as the link: it must not keep the last frame's
            # buffers (e.g. views of a shared-memory range) alive
            header = buffers = None
            self.pending.clear()
            self.conn = conn
            self.settled.set()
            await asyncio.shield(conn.closed)  # cancelling us must not cancel the connection's future
            raise BrokenByPeer(f"connection to peer {self.member:x} at {self.address} closed")
        except (ConnectionClosed, ZipTimeout) as exc:
            self.failed = exc
            self.pending.clear()
            self.settled.set()
            runtime._peer_lost(self, exc)

    def send(self, header: dict, buffers: list) -> None:
        if self.failed is not None:
            raise BrokenByPeer(f"peer {self.member:x} unreachable: {self.failed}")
        if self.conn is not None:
            self.conn.send(header, buffers)
            return
        if len(self.pending) >= PENDING_FRAMES_PER_PEER:
            raise BrokenByPeer(f"peer {self.member:x}: {PENDING_FRAMES_PER_PEER} frames pending while connecting")
        self.pending.append((header, buffers))

    async def drain(self) -> None:
        if self.conn is not None:
            await self.conn.drain()


class Runtime:
    """One per process. Use ``async with zipcomm.connect("HOST:PORT") as rt``."""

    def __init__(
        self,
        controller: str,
        *,
        secret: bytes | None = None,
        listen_host: str | None = None,
        host_id: str | None = None,
        connect_timeout: float = 10.0,
        daemon: str | None = None,
    ) -> None:
        self.controller_address = controller
        self.secret = secret if secret is not None else load_secret()
        self.listen_host = listen_host or os.environ.get("ZIPCOMM_LISTEN_HOST") or "127.0.0.1"
        self.host_id = host_id or os.environ.get("ZIPCOMM_HOST_ID") or socket.gethostname()
        # The host daemon's Unix socket ("" = none): broadcast and reduce go through it.
        self.daemon_path = daemon if daemon is not None else os.environ.get("ZIPCOMM_DAEMON", "")
        self.daemon = None
        self._locals: dict[str, Any] = {}
        self.member_id = random.SystemRandom().getrandbits(62) | (1 << 62)
        self.connect_timeout = connect_timeout
        self.address = ""
        self.channels: dict[str, ChannelCore] = {}
        self.buffers = BufferPool()  # large items' receive buffers, reused
        self._tasks: set[asyncio.Task] = set()
        self._server: Server | None = None
        self._local_server: Server | None = None
        self._session: Connection | None = None
        self._session_ready = asyncio.Event()
        self._session_task: asyncio.Task | None = None
        self._requests: dict[int, asyncio.Future] = {}
        self._req_ids = itertools.count(1)
        self._peers: dict[int, _PeerLink] = {}
        self._quiesce_waiters: dict[tuple[int, int], asyncio.Future] = {}
        self._closing = False
        self.heartbeat = 1.0
        self.heartbeat_timeout = 5.0

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> Runtime:
        if self._server is not None or self._closing:
            raise RuntimeError("this runtime was already started (await zipcomm.connect(...) starts it)")
        refuse_open_listen(self.listen_host, self.secret, "a member's peer port")
        self._server = await start_server(f"{self.listen_host}:0", self._serve_peer, secret=self.secret)
        self.address = self._server.address
        if LOCAL_PEERS:
            try:
                self._local_server = await start_server(local_address(self.address), self._serve_peer,
                                                        secret=self.secret)
            except OSError as exc:  # the peers reach us over TCP as well
                log.info("no local peer socket for %s: %s", self.address, exc)
        await self._open_session(deadline=self.connect_timeout)
        self._session_task = self._spawn(self._session_loop(), "controller-session")
        if self.daemon_path:
            from .daemon.client import DaemonClient

            try:
                self.daemon = await DaemonClient.open(self, self.daemon_path)
            except (OSError, ConnectionClosed, ProtocolError, TimeoutError) as exc:
                log.warning("host daemon at %s unavailable (%s): using direct links", self.daemon_path, exc)
            else:
                if self.daemon.attachment is None:  # no shared memory there: it would only add a hop
                    log.warning("host daemon at %s has no shared memory: using direct links", self.daemon_path)
                    await self.daemon.aclose()
                    self.daemon = None
        return self

    async def aclose(self) -> None:
        if self._closing:
            return
        # A graceful leave needs the runtime's background tasks: the session loop reads
        # the controller's replies, the peer readers the quiesce acks. When the event loop
        # is being torn down (asyncio.run unwinding after SystemExit or KeyboardInterrupt
        # cancels every task) they are gone, and waiting for them would only wait out
        # every deadline: close at once instead; the peers and the controller see a
        # failed member, and the tree is repaired around it.
        graceful = self._alive()
        self._closing = True
        if not graceful:
            log.info("runtime torn down under its channels: closing without a graceful leave")
        # Frames queued on links still connecting (e.g. shuffle parts just sent) go out first.
        connecting = [asyncio.ensure_future(link.settled.wait()) for link in self._peers.values()
                      if not link.settled.is_set()]
        if connecting:
            _, late = await asyncio.wait(connecting, timeout=5.0 if graceful else 0)
            for waiter in late:
                waiter.cancel()
        for handle in list(self._locals.values()):
            try:
                await handle.aclose(graceful)
            except Exception:
                log.debug("leave of %s failed", handle.name, exc_info=True)
        if self.daemon is not None:
            await self.daemon.aclose()
        # What we sent or forwarded reaches the peers before we leave: a child may hold
        # the only copy of a broadcast we sequenced, once we are gone.
        if graceful:
            await self.quiesce()
        for core in list(self.channels.values()):
            try:
                await core.aclose(graceful=graceful and self._session_ready.is_set())
            except Exception:  # leaving is best effort; the session loss repairs the tree
                log.debug("leave of %s failed", core.name, exc_info=True)
        if self._session is not None:
            self._session.abort()
        if self._server is not None:
            await self._server.aclose()
        if self._local_server is not None:
            await self._local_server.aclose()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Flush what we forwarded (a child may still need the last item we passed on),
        # then close gracefully; abort only what will not drain in time.
        links = [link.conn for link in self._peers.values() if link.conn is not None]
        self._peers.clear()
        if links:
            await asyncio.gather(*(self._close_flushed(conn, 5.0 if graceful else 1.0) for conn in links))
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("runtime closed"))
        self._requests.clear()

    def _alive(self) -> bool:
        """Whether the controller session loop runs (nobody but ``aclose`` stops it)."""
        task = self._session_task
        return task is not None and not task.done() and not task.cancelling()

    async def quiesce(self, timeout: float = CLOSE_FLUSH_TIMEOUT) -> None:
        """Wait until every peer we sent to has *processed* all of it (not merely
        received it): a member about to leave may hold the only path of a result in
        flight, and its departure must not overtake it. Peers that are gone or do
        not answer within ``timeout`` are skipped."""
        token = next(self._req_ids)
        waiters = []
        for link in list(self._peers.values()):
            if link.failed is not None:
                continue
            fut = asyncio.get_running_loop().create_future()
            self._quiesce_waiters[(link.member, token)] = fut
            waiters.append(fut)
            try:
                link.send(*m.Quiesce(token=token).to_frame())
            except ConnectionClosed:
                fut.cancel()
        pending = [w for w in waiters if not w.done()]
        try:
            if pending:
                await asyncio.wait(pending, timeout=timeout)
        finally:
            for key in [k for k in self._quiesce_waiters if k[1] == token]:
                fut = self._quiesce_waiters.pop(key)
                if not fut.done():
                    fut.cancel()

    @staticmethod
    async def _close_flushed(conn: Connection, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(conn.flush(), timeout)
            await asyncio.wait_for(conn.aclose(), timeout)
        except (ConnectionClosed, TimeoutError):
            conn.abort()

    async def __aenter__(self) -> Runtime:
        if not self.address:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __await__(self):  # ``rt = await zipcomm.connect(...)``
        return self.start().__await__()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- channels ------------------------------------------------------------

    async def broadcast_channel(self, name: str, *, queue_size: int = 64, timeout: float | None = 30.0):
        from .channels.broadcast import BroadcastChannel

        if self._use_daemon(name):
            from .daemon.client import LocalBroadcast

            return await self._join_local(LocalBroadcast(self.daemon, name, queue_size), timeout)
        return await self._join(BroadcastChannel(self, name, queue_size=queue_size), timeout)

    async def reduce_channel(self, name: str, reduce_f: Any = None, handler: Any = None,
                             *, timeout: float | None = 30.0):
        from .channels.reduce import ReduceChannel
        from .ops import reduce_name, resolve_reduce

        if reduce_f is not None:
            reduce_f = resolve_reduce(reduce_f)
        if self._use_daemon(name) and reduce_name(reduce_f):  # the daemon runs only built-ins
            from .daemon.client import LocalReduce

            return await self._join_local(LocalReduce(self.daemon, name, reduce_f, handler), timeout)
        return await self._join(ReduceChannel(self, name, reduce_f=reduce_f, handler=handler), timeout)

    def _use_daemon(self, name: str) -> bool:
        if self._closing:
            raise ChannelClosed("runtime closed")
        if name in self.channels or name in self._locals:
            raise MembershipError("this process already holds a handle to the channel", channel=name)
        return self.daemon is not None and not self.daemon.lost

    async def _join_local(self, handle: Any, timeout: float | None):
        self._locals[handle.name] = handle
        try:
            async with asyncio.timeout(timeout):
                return await handle.join()
        except BaseException as exc:
            self._locals.pop(handle.name, None)
            if isinstance(exc, TimeoutError):
                raise ZipTimeout(f"joining channel {handle.name!r} timed out after {timeout}s") from None
            raise

    def _forget_local(self, handle: Any) -> None:
        if self._locals.get(handle.name) is handle:
            del self._locals[handle.name]

    async def shuffle_channel(self, name: str, role: str = "both", *, timeout: float | None = 30.0):
        from .channels.shuffle import ShuffleChannel

        return await self._join(ShuffleChannel(self, name, role=role), timeout)

    async def _join(self, core: ChannelCore, timeout: float | None):
        if self._closing:
            raise ChannelClosed("runtime closed")
        if core.name in self.channels:
            raise MembershipError("this process already holds a handle to the channel", channel=core.name)
        self.channels[core.name] = core
        try:
            async with asyncio.timeout(timeout):
                result = await self.request(
                    m.Join, channel=core.name, kind=core.kind, role=core.role, epoch_hint=0
                )
                core.on_rewire(m.Rewire(channel=core.name, **result))
                await core.joined.wait()
        except BaseException as exc:
            self.channels.pop(core.name, None)
            if isinstance(exc, TimeoutError):
                raise ZipTimeout(f"joining channel {core.name!r} timed out after {timeout}s") from None
            raise
        return core

    def _forget(self, core: ChannelCore) -> None:
        if self.channels.get(core.name) is core:
            del self.channels[core.name]

    # -- controller session --------------------------------------------------

    async def request(self, cls: type[m.Message], **fields: Any) -> dict:
        """Send a request to the controller and wait for its reply (across reconnects).

        A lookup in a channel this process belongs to that the controller does not know
        (it restarted and the members have not re-announced it yet) is asked again, with
        backoff, until it is known: the caller's own deadline bounds the wait."""
        delay = 0.01
        while True:
            try:
                return await self._request_once(cls, **fields)
            except MembershipError as exc:
                name = fields.get("channel")
                if (exc.code != MembershipError.NO_SUCH_CHANNEL or cls not in (m.LookupRoot, m.ListMembers)
                        or (name not in self.channels and name not in self._locals) or self._closing):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _request_once(self, cls: type[m.Message], **fields: Any) -> dict:
        while True:
            await self._wait_session()
            session = self._session
            assert session is not None
            if len(self._requests) >= CONTROLLER_REQUESTS_IN_FLIGHT:
                raise MembershipError("too many controller requests in flight")
            req = next(self._req_ids)
            fut = asyncio.get_running_loop().create_future()
            self._requests[req] = fut
            try:
                session.send(*cls(req=req, **fields).to_frame())
                reply: m.Reply = await fut
            except ConnectionClosed:
                # The session loop reconnects; ask again on the next session. Until the loop
                # has noticed the loss, this session still looks ready: abort it (so the loop
                # notices now) and wait for another one, never retrying on the dead one.
                if self._session is session:
                    self._session_ready.clear()
                    session.abort()
                continue
            finally:
                self._requests.pop(req, None)
            if not reply.ok:
                raise MembershipError(reply.error, channel=fields.get("channel"), member=self.member_id,
                                      code=reply.code)
            return reply.result

    async def _wait_session(self) -> None:
        """Wait for a ready controller session; ChannelClosed once none can come (the
        runtime is closed, or its session loop was stopped under it)."""
        if self._session_ready.is_set():
            return
        if not self._alive():
            raise ChannelClosed("runtime closed: no controller session")
        ready = asyncio.ensure_future(self._session_ready.wait())
        try:
            await asyncio.wait([ready, self._session_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._session_ready.is_set():
            raise ChannelClosed("runtime closed: no controller session")

    async def _open_session(self, deadline: float | None) -> None:
        """Connect to the controller with capped, jittered backoff under a deadline."""
        loop = asyncio.get_running_loop()
        give_up = None if deadline is None else loop.time() + deadline
        delay = 0.02
        while True:
            try:
                conn = await open_connection(self.controller_address, secret=self.secret)
                conn.send(*m.Hello(member=self.member_id, address=self.address, host=self.host_id).to_frame())
                welcome = m.decode(await asyncio.wait_for(conn.recv(), 5.0))
                if not isinstance(welcome, m.Welcome):
                    raise RemoteProtocolError(f"controller answered {welcome.OP!r} to hello")
                self.heartbeat, self.heartbeat_timeout = welcome.heartbeat, welcome.timeout
                self._session = conn
                self._session_ready.set()
                return
            except (ConnectionClosed, ZipTimeout, TimeoutError, ProtocolError) as exc:
                if give_up is not None and loop.time() + delay > give_up:
                    raise ZipTimeout(f"cannot reach the controller at {self.controller_address}: {exc}") from exc
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    async def _session_loop(self) -> None:
        try:
            await self._session_loop_body()
        finally:
            # Stopped (by aclose, or cancelled with every other task when the event loop
            # is torn down): no reply can come any more; nobody waits for one in vain.
            self._session_ready.clear()
            for fut in list(self._requests.values()):
                if not fut.done():
                    fut.set_exception(ChannelClosed("runtime closed: no controller session"))

    async def _session_loop_body(self) -> None:
        while not self._closing:
            session = self._session
            assert session is not None
            beat = self._spawn(self._heartbeat(session), "controller-heartbeat")
            try:
                while True:
                    frame = await asyncio.wait_for(session.recv(), self.heartbeat_timeout)
                    self._on_controller(m.decode(frame))
            except (ConnectionClosed, TimeoutError, ProtocolError) as exc:
                if not self._closing:
                    log.warning("controller session lost (%s); reconnecting", exc)
            finally:
                beat.cancel()
                session.abort()
            self._session_ready.clear()
            for core in list(self.channels.values()):
                core.suspend()
            for fut in list(self._requests.values()):
                if not fut.done():
                    fut.set_exception(BrokenByPeer("controller session lost"))
            if self._closing:
                return
            await self._open_session(deadline=None)
            # The controller may have restarted: re-announce every channel (new tree, new epoch).
            for core in list(self.channels.values()):
                self._spawn(self._rejoin(core), f"rejoin-{core.name}")

    async def _rejoin(self, core: ChannelCore) -> None:
        try:
            result = await self.request(m.Join, channel=core.name, kind=core.kind, role=core.role,
                                        epoch_hint=core.epoch + 1)
        except MembershipError as exc:
            if exc.code == MembershipError.ALREADY_MEMBER:
                core.unsuspend()  # the controller kept its state: nothing to rebuild
                return
            raise
        core.rebuilt()
        core.on_rewire(m.Rewire(channel=core.name, **result))

    async def _heartbeat(self, session: Connection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            session.send(*m.Ping().to_frame())

    def _on_controller(self, msg: m.Message) -> None:
        match msg:
            case m.Reply(req=req):
                fut = self._requests.get(req)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            case m.Rewire(channel=name) | m.Gone(channel=name):
                core = self.channels.get(name)
                if core is not None:
                    core.on_controller(msg)
            case m.Ping():
                pass
            case _:
                raise RemoteProtocolError(f"unexpected {msg.OP!r} from the controller")

    # -- peers ---------------------------------------------------------------

    def send_to(self, member: int, address: str, msg: m.Message) -> None:
        """Send a record to a peer without waiting; failures are reported to channels."""
        header, buffers = msg.to_frame()
        if member == self.member_id:
            raise AssertionError("send_to self")
        link = self._peers.get(member)
        if link is None or link.failed is not None:
            link = _PeerLink(self, member, address)
            self._peers[member] = link
        try:
            link.send(header, buffers)
        except ConnectionClosed as exc:
            log.info("dropping %s to %x: %s", msg.OP, member, exc)
        except RuntimeError as exc:  # a transport torn down under us: same as a broken peer
            log.info("dropping %s to %x: %s", msg.OP, member, exc)

    async def drain_to(self, member: int) -> None:
        link = self._peers.get(member)
        if link is not None:
            try:
                await link.drain()
            except ConnectionClosed:
                pass

    def _peer_lost(self, link: _PeerLink, exc: BaseException) -> None:
        if self._peers.get(link.member) is link:
            del self._peers[link.member]
        for (member, _token), fut in self._quiesce_waiters.items():
            if member == link.member and not fut.done():
                fut.set_result(None)  # nobody left there to wait for
        for core in list(self.channels.values()):
            core.on_peer_lost(link.member)

    def _place(self, header: dict, descriptors: list) -> list | None:
        """Where a peer frame's buffers are received: a part of a large stream item straight into
        the channel's array being assembled (see ``ChannelCore.place_part``), any other large
        array into a reused buffer (see ``BufferPool``)."""
        if header.get("op") == "item" and header.get("kind") == "p":
            name = header.get("channel")
            core = self.channels.get(name) if type(name) is str else None
            placed = core.place_part(header, descriptors) if core is not None else None
            if placed is not None:
                return placed
        if len(descriptors) != 1:
            return None
        descriptor = descriptors[0]
        if descriptor[0] != "nd" or descriptor[3] < POOLED_MIN:
            return None
        return [self.buffers.array(descriptor[1], descriptor[2])]

    async def _serve_peer(self, conn: Connection) -> None:
        hello = m.decode(await conn.recv())
        if not isinstance(hello, m.PeerHello):
            raise RemoteProtocolError(f"expected peer_hello, got {hello.OP!r}")
        if hello.address:
            try:
                kind, _ = parse_address(hello.address)
            except ValueError as exc:
                raise RemoteProtocolError(f"peer_hello with a bad address: {exc}") from None
            if kind != "tcp":  # peers reach each other over TCP; never dial a path a peer names
                raise RemoteProtocolError(f"peer_hello with a non-TCP address {hello.address!r}")
        sender = hello.member
        conn.set_placer(self._place)
        while True:
            frame = await conn.recv()
            msg = m.decode(frame)
            if isinstance(msg, m.Quiesce):
                if hello.address:  # FIFO: everything it sent before has been handled
                    self.send_to(sender, hello.address, m.QuiesceAck(token=msg.token))
                continue
            if isinstance(msg, m.QuiesceAck):
                waiter = self._quiesce_waiters.get((sender, msg.token))
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                continue
            name = getattr(msg, "channel", None)
            if name is None:
                raise RemoteProtocolError(f"peer sent {msg.OP!r} outside any channel")
            core = self.channels.get(name)
            if core is not None:
                await core.on_peer(sender, msg)
            # not kept while waiting for the next frame: a large buffer is freed (or back in
            # the pool) as soon as the channel is done with it
            frame = msg = None  # type: ignore[assignment]


def connect(controller: str | None = None, **kwargs: Any) -> Runtime:
    """A runtime for ``controller`` (``HOST:PORT``; default ``$ZIPCOMM_CONTROLLER``).

    ``rt = await zipcomm.connect(...)`` or ``async with await zipcomm.connect(...) as rt``.
    """
    address = controller or os.environ.get("ZIPCOMM_CONTROLLER")
    if not address:
        raise ValueError("no controller address: pass one or set ZIPCOMM_CONTROLLER=HOST:PORT")
    return Runtime(address, **kwargs)
