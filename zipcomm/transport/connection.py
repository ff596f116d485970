"""Frame connections over asyncio streams (TCP and Unix sockets).

One :class:`Connection` carries frames both ways. Receiving uses
``asyncio.BufferedProtocol`` so that a numpy payload lands straight in its final
array; sending uses ``writelines`` of memoryviews so it is never concatenated.
Both directions are bounded: the receive queue pauses the socket when full, and a
peer that stops reading is cut off once ``max_outbound`` bytes are waiting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import socket
from typing import Awaitable, Callable

from ..errors import (
    BrokenByPeer,
    ClosedByUs,
    ConnectionClosed,
    HandshakeError,
    ProtocolError,
    ZipTimeout,
)
from ..protocol.frames import Frame, FrameDecoder, encode_control_frame, encode_frame
from ..protocol.handshake import Handshake
from ..protocol.limits import DEFAULT_LIMITS, Limits

log = logging.getLogger("zipcomm.transport")

HANDSHAKE_TIMEOUT = 5.0
RECV_QUEUE_FRAMES = 256  # pause reading beyond this many undelivered frames
DEFAULT_MAX_OUTBOUND = 2 << 30  # bytes queued for a peer that does not read
WRITE_HIGH_WATER = 16 << 20  # drain() waits while more than this is queued
STALL_TIMEOUT = 30.0  # drain() cuts off a peer that takes no byte for this long
CLOSE_FLUSH_TIMEOUT = 5.0  # a finished handler's last frames get this long to leave
DEFAULT_MAX_CONNECTIONS = 16384  # a server closes connections beyond this many at once (counted)

# Process-wide counts of the limits this module enforced (for operators and tests).
counters: collections.Counter[str] = collections.Counter()


class Connection:
    """A frame connection. Create with :func:`open_connection` or :func:`start_server`."""

    def __init__(self, limits: Limits, max_outbound: int, stall_timeout: float = None) -> None:  # type: ignore[assignment]
        self._limits = limits
        self._max_outbound = max_outbound
        self._stall_timeout = STALL_TIMEOUT if stall_timeout is None else stall_timeout
        self._transport: asyncio.Transport | None = None
        self._frames: collections.deque[Frame] = collections.deque()
        self._frame_ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._paused_reading = False
        self._error: BaseException | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.peer: str = "?"
        self.info: dict = {}  # owner's annotations (e.g. the peer's member id)
        self._soon: list = []  # pieces of the frames send_soon() queued in this loop iteration
        self._soon_bytes = 0
        self._protocol: _FrameProtocol | None = None

    def set_placer(self, placer) -> None:
        """Receive frame buffers where ``placer(header, descriptors)`` says (see
        ``FrameDecoder.placer``); None: into new arrays."""
        if self._protocol is not None:
            self._protocol._decoder.placer = placer

    # -- sending -------------------------------------------------------------

    def send(self, header: dict, buffers=()) -> None:
        """Queue one frame for sending without waiting (see :meth:`drain`)."""
        if self._error is not None:
            raise self._closed_error()
        pieces = encode_frame(header, buffers, self._limits)
        if self._soon:
            self._write_soon()  # frames keep their order
        self._write(pieces, 0)

    def send_soon(self, header: dict, buffers=()) -> None:
        """Like :meth:`send`, but the frame is written at the end of this loop iteration together
        with every other ``send_soon`` frame of the connection: one system call for a burst of small
        frames (a server answering a batch of pipelined requests). :meth:`send`, :meth:`drain`,
        :meth:`flush` and :meth:`aclose` write them first; :meth:`abort` drops them."""
        if self._error is not None:
            raise self._closed_error()
        if buffers:
            pieces = encode_frame(header, buffers, self._limits)
            nbytes = sum(map(len, pieces))  # bytes and flat uint8 memoryviews
        else:  # a control frame (a reply, a push): one piece
            piece = encode_control_frame(header, self._limits)
            pieces = (piece,)
            nbytes = len(piece)
        soon = self._soon
        if not soon:
            asyncio.get_running_loop().call_soon(self._write_soon)
        soon += pieces
        pending = self._soon_bytes = self._soon_bytes + nbytes
        transport = self._transport
        assert transport is not None
        if transport.get_write_buffer_size() + pending > self._max_outbound:
            self._check_outbound(pending)

    def _write_soon(self) -> None:
        pieces, self._soon = self._soon, []
        self._soon_bytes = 0
        if pieces and self._error is None:
            try:
                self._write(pieces, 0)
            except ConnectionClosed:
                pass  # recorded: the owner's next call on the connection raises it

    def _write(self, pieces: list, pending: int) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            self._fail(BrokenByPeer(f"connection to {self.peer} is closing"))
            raise self._closed_error()
        transport.writelines(pieces)
        self._check_outbound(pending)

    def _check_outbound(self, pending: int) -> None:
        transport = self._transport
        assert transport is not None
        queued = transport.get_write_buffer_size() + pending
        if queued > self._max_outbound:
            counters["slow_consumers_cut_off"] += 1
            log.warning("cutting off %s: it stopped reading (%d bytes queued, cap %d)", self.peer,
                        queued, self._max_outbound)
            self.abort(BrokenByPeer(f"peer {self.peer} stopped reading: outbound cap reached"))
            raise self._closed_error()

    async def drain(self) -> None:
        """Wait until the socket's send buffer is below its high-water mark. A peer that takes
        nothing for ``stall_timeout`` seconds meanwhile is cut off (it stopped reading)."""
        if self._soon:
            self._write_soon()
        last = -1
        while not self._drained.is_set():
            if self._error is not None:
                raise self._closed_error()
            transport = self._transport
            queued = transport.get_write_buffer_size() if transport is not None else 0
            if queued == last:  # nothing left the buffer during a whole stall_timeout
                counters["slow_consumers_cut_off"] += 1
                log.warning("cutting off %s: it took nothing for %.1f s (%d bytes queued)", self.peer,
                            self._stall_timeout, queued)
                self.abort(BrokenByPeer(f"peer {self.peer} stopped reading: nothing taken for "
                                        f"{self._stall_timeout} s"))
                raise self._closed_error()
            last = queued
            waiter = asyncio.ensure_future(self._drained.wait())
            try:
                await asyncio.wait([waiter, self.closed], timeout=self._stall_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if self._error is not None:
            raise self._closed_error()

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to the kernel."""
        if self._soon:
            self._write_soon()
        transport = self._transport
        if transport is None or self._error is not None:
            return
        # With a zero low-water mark the protocol is told to resume only once the
        # buffer is empty; setting the limits pauses it at once if anything is queued.
        transport.set_write_buffer_limits(high=1, low=0)  # type: ignore[attr-defined]
        try:
            await self.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    # -- receiving -----------------------------------------------------------

    async def recv(self) -> Frame:
        """The next frame; raises :class:`ConnectionClosed` once the connection ends."""
        while not self._frames:
            if self._error is not None:
                raise self._closed_error()
            self._frame_ready.clear()
            await self._frame_ready.wait()
        frame = self._frames.popleft()
        if self._paused_reading and len(self._frames) < RECV_QUEUE_FRAMES // 2:
            self._paused_reading = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
        return frame

    async def recv_batch(self) -> list[Frame]:
        """Every frame received and not yet delivered (at least one): what ``recv()`` would return
        call after call without waiting, in one list. Raises like :meth:`recv`."""
        while not self._frames:
            if self._error is not None:
                raise self._closed_error()
            self._frame_ready.clear()
            await self._frame_ready.wait()
        frames = list(self._frames)
        self._frames.clear()
        if self._paused_reading:
            self._paused_reading = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
        return frames

    # -- lifecycle -----------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    def abort(self, cause: BaseException | None = None) -> None:
        self._fail(cause or ClosedByUs("connection closed"))
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self) -> None:
        if self._soon:
            self._write_soon()  # what was sent before aclose() still goes out
        if self._error is None:
            self._fail(ClosedByUs("connection closed"))
            if self._transport is not None:
                self._transport.close()
        if self._transport is not None:
            await asyncio.shield(self.closed)

    def _closed_error(self) -> ConnectionClosed:
        err = self._error
        if isinstance(err, ConnectionClosed):
            return type(err)(*err.args)
        closed = BrokenByPeer(f"connection to {self.peer} broken: {err}")
        closed.__cause__ = err
        return closed

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
            self._frame_ready.set()
            self._drained.set()
            if not self.ready.done():
                self.ready.set_exception(self._closed_error())
                self.ready.exception()  # mark retrieved: nobody may be waiting

    # called by the protocol
    def _deliver(self, frames: list[Frame]) -> None:
        self._frames.extend(frames)
        self._frame_ready.set()
        if not self._paused_reading and len(self._frames) >= RECV_QUEUE_FRAMES:
            self._paused_reading = True
            assert self._transport is not None
            self._transport.pause_reading()


class _FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, conn: Connection, is_client: bool, secret: bytes | None) -> None:
        self._conn = conn
        self._handshake: Handshake | None = Handshake(is_client=is_client, secret=secret)
        self._hs_buffer = bytearray(4096)
        self._decoder = FrameDecoder(conn._limits)
        self._timer: asyncio.TimerHandle | None = None
        conn._protocol = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conn = self._conn
        conn._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        conn.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)
        assert self._handshake is not None
        transport.write(self._handshake.initial_bytes())  # type: ignore[attr-defined]

    def _handshake_expired(self) -> None:
        if self._handshake is not None:
            self._conn.abort(HandshakeError(f"handshake with {self._conn.peer} not done in {HANDSHAKE_TIMEOUT}s"))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._handshake is not None:
            return memoryview(self._hs_buffer)
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        try:
            if self._handshake is not None:
                hs = self._handshake
                reply = hs.receive(bytes(self._hs_buffer[:nbytes]))
                if reply:
                    conn._transport.write(reply)  # type: ignore[union-attr]
                if not hs.done:
                    return
                self._handshake = None
                if self._timer is not None:
                    self._timer.cancel()
                if not conn.ready.done():
                    conn.ready.set_result(None)
                frames = self._decoder.feed(hs.leftover) if hs.leftover else []
            else:
                frames = self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            log.warning("closing connection from %s: %s", conn.peer, exc)
            conn.abort(exc)
            return
        if frames:
            conn._deliver(frames)

    def pause_writing(self) -> None:
        self._conn._drained.clear()

    def resume_writing(self) -> None:
        self._conn._drained.set()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        conn = self._conn
        conn._fail(BrokenByPeer(f"connection to {conn.peer} lost" + (f": {exc}" if exc else "")))
        if not conn.closed.done():
            conn.closed.set_result(None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal) is this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_open_listen(host: str, secret: bytes | None, what: str) -> None:
    """Listening beyond loopback without a secret is refused (anyone could join or inject)."""
    if secret is None and not is_loopback(host):
        raise ValueError(f"refusing to listen on non-loopback {host} for {what} without a secret "
                         "(set ZIPCOMM_SECRET or give a secret file)")


def parse_address(address: str) -> tuple[str, object]:
    """``host:port`` -> ("tcp", (host, port)); ``unix:/path`` -> ("unix", path)."""
    if address.startswith("unix:"):
        return "unix", address[5:]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected HOST:PORT or unix:/path")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


async def open_connection(
    address: str,
    *,
    secret: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
    max_outbound: int = DEFAULT_MAX_OUTBOUND,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Connection:
    """Connect and complete the handshake, or raise a :class:`ConnectionClosed` / timeout."""
    loop = asyncio.get_running_loop()
    conn = Connection(limits, max_outbound)
    kind, where = parse_address(address)
    factory = lambda: _FrameProtocol(conn, True, secret)  # noqa: E731
    try:
        async with asyncio.timeout(timeout):
            if kind == "unix":
                await loop.create_unix_connection(factory, sock=_unix_socket(where))  # type: ignore[arg-type]
            else:
                host, port = where  # type: ignore[misc]
                await loop.create_connection(factory, host, port)
            await conn.ready
    except TimeoutError:
        conn.abort()
        raise ZipTimeout(f"connecting to {address} timed out after {timeout}s") from None
    except OSError as exc:
        raise BrokenByPeer(f"cannot connect to {address}: {exc}") from exc
    return conn


def _unix_socket(path: str) -> socket.socket:
    """A Unix stream socket connected to ``path``. Connected here rather than by the event loop:
    uvloop refuses abstract names (a leading NUL byte) in ``create_unix_connection(path=...)``.
    A local connect completes at once or fails (ECONNREFUSED; EAGAIN when the listener's backlog
    is full), so a non-blocking attempt never stalls the loop."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(path)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """A listening socket whose accepted connections are handed to a callback."""

    def __init__(self) -> None:
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()
        self.address = ""
        self.refused_connections = 0  # closed on arrival: the server held max_connections already

    @property
    def connections(self) -> int:
        """Connections being served now (handshaking ones included)."""
        return len(self._handlers)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def start_server(
    address: str,
    on_connection: Callable[[Connection], Awaitable[None]],
    *,
    secret: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
    max_outbound: int = DEFAULT_MAX_OUTBOUND,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    stall_timeout: float = STALL_TIMEOUT,
) -> Server:
    """Listen on ``address``; each handshaken connection runs ``on_connection(conn)``
    in its own task, owned by the server and cancelled by :meth:`Server.aclose`. Beyond
    ``max_connections`` at once, a new connection is closed on arrival (``refused_connections``)."""
    loop = asyncio.get_running_loop()
    server = Server()

    def factory() -> asyncio.BaseProtocol:
        if len(server._handlers) >= max_connections:
            server.refused_connections += 1
            counters["connections_refused"] += 1
            return _Refuse()
        conn = Connection(limits, max_outbound, stall_timeout)
        task = loop.create_task(_serve_one(conn, on_connection))
        server._handlers.add(task)
        task.add_done_callback(server._handlers.discard)
        return _FrameProtocol(conn, False, secret)

    kind, where = parse_address(address)
    if kind == "unix":
        server._server = await loop.create_unix_server(factory, where)  # type: ignore[arg-type]
        server.address = address
    else:
        host, port = where  # type: ignore[misc]
        server._server = await loop.create_server(factory, host, port, reuse_address=True)
        sockname = server._server.sockets[0].getsockname()
        server.address = f"{sockname[0]}:{sockname[1]}"
    return server


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


async def _serve_one(conn: Connection, on_connection: Callable[[Connection], Awaitable[None]]) -> None:
    try:
        await conn.ready
    except ConnectionClosed:
        return
    try:
        await on_connection(conn)
    except ConnectionClosed:
        pass
    except ProtocolError as exc:  # the peer broke the protocol: one line, no traceback
        counters["protocol_errors"] += 1
        log.warning("closing connection from %s: %s", conn.peer, exc)
    except Exception:
        log.exception("connection handler for %s failed", conn.peer)
    else:  # the handler is done: what it sent is flushed (bounded) before the socket closes
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await asyncio.wait_for(conn.aclose(), CLOSE_FLUSH_TIMEOUT)
    finally:
        conn.abort()
