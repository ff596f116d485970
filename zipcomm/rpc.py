"""Point-to-point requests (1:1) between two processes, on zipcomm frames.

A server answers named calls; a client pipelines them over one connection::

    async def handler(method: str, data, peer: zipcomm.RpcPeer):
        if method == "add":
            return data["a"] + data["b"]          # numpy arrays travel without copies
        raise ValueError(f"no method {method}")

    async with await zipcomm.serve_rpc("127.0.0.1:0", handler) as server:
        async with await zipcomm.rpc_connect(server.address) as client:
            await client.call("add", {"a": x, "b": y}, timeout=5)   # -> x + y
            await client.cast("log", {"line": "hi"})                 # one-way, no reply

Payloads are what zipcomm's channels carry (dicts, lists, str, int, float, bool, None, bytes, numpy
arrays; never pickle). Calls of one connection are handled one at a time, in the order they were
sent, casts included — so a cast followed by a call is applied before the call is answered.
A handler's exception comes back as :class:`RemoteError` (its type name and message; the
connection stays up). A call waits at most ``timeout`` seconds (:class:`~zipcomm.ZipTimeout`),
at most ``max_in_flight`` calls are outstanding per client (further calls wait for a slot), and a
connection that dies fails every outstanding call with :class:`~zipcomm.ConnectionClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable

from .errors import ConnectionClosed, RemoteProtocolError, ZipError, ZipTimeout
from .protocol.frames import Frame
from .protocol.limits import DEFAULT_LIMITS
from .protocol.payload import pack_payload, unpack_payload
from .transport.connection import Connection, open_connection, start_server

__all__ = ["RemoteError", "RpcPeer", "RpcServer", "RpcClient", "serve_rpc", "rpc_connect"]

log = logging.getLogger("zipcomm.rpc")

Handler = Callable[[str, Any, "RpcPeer"], Any]


class RemoteError(ZipError):
    """The server's handler raised: ``remote_type`` is the exception's class name."""

    def __init__(self, method: str, remote_type: str, message: str) -> None:
        super().__init__(f"{method}: {remote_type}: {message}")
        self.method = method
        self.remote_type = remote_type
        self.remote_message = message


class RpcPeer:
    """One client connection as the server's handler sees it. ``state`` is the handler's own
    per-connection dict (e.g. who the client said it is)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.address = conn.peer
        self.state: dict[str, Any] = {}

    def close(self) -> None:
        """Drop this connection (e.g. a client that broke the server's rules)."""
        self._conn.abort()


def _send(conn: Connection, header: dict, data: Any) -> None:
    tree, buffers = pack_payload(data)
    conn.send({**header, "data": tree}, buffers)


def _payload(frame: Frame) -> Any:
    if "data" not in frame.header:
        raise RemoteProtocolError(f"frame of op {frame.op!r} carries no payload")
    return unpack_payload(frame.header["data"], frame.buffers, DEFAULT_LIMITS)


class RpcServer:
    def __init__(self, handler: Handler, on_disconnect: Callable[[RpcPeer], Any] | None) -> None:
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._server: Any = None
        self.address = ""
        self.peers: set[RpcPeer] = set()

    async def _serve(self, conn: Connection) -> None:
        peer = RpcPeer(conn)
        self.peers.add(peer)
        try:
            while True:
                frame = await conn.recv()
                op = frame.header.get("op")
                method = frame.header.get("m")
                if op not in ("call", "cast") or not isinstance(method, str):
                    raise RemoteProtocolError(f"rpc frame with op {op!r} / method {method!r}")
                call_id = frame.header.get("id")
                if op == "call" and not isinstance(call_id, int):
                    raise RemoteProtocolError("rpc call without an integer id")
                data = _payload(frame)
                try:
                    result = self._handler(method, data, peer)
                    if asyncio.iscoroutine(result):
                        result = await result
                except Exception as exc:  # the handler's error goes back to the caller
                    if op == "call":
                        conn.send({"op": "err", "id": call_id, "type": type(exc).__name__,
                                   "msg": str(exc)[:4000]})
                    else:
                        log.debug("cast %s from %s failed: %r", method, peer.address, exc)
                    continue
                if op == "call":
                    _send(conn, {"op": "ret", "id": call_id}, result)
                    await conn.drain()
        finally:
            self.peers.discard(peer)
            if self._on_disconnect is not None:
                with contextlib.suppress(Exception):
                    self._on_disconnect(peer)

    async def aclose(self) -> None:
        if self._server is not None:
            await self._server.aclose()
            self._server = None

    async def __aenter__(self) -> RpcServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def serve_rpc(address: str, handler: Handler, *, secret: bytes | None = None,
                    on_disconnect: Callable[[RpcPeer], Any] | None = None) -> RpcServer:
    """Listen on ``address`` (``HOST:PORT``, port 0 for any; or ``unix:/path``) and answer calls
    with ``handler(method, data, peer)`` (a function or coroutine function). ``on_disconnect(peer)``
    runs when a client's connection ends."""
    server = RpcServer(handler, on_disconnect)
    server._server = await start_server(address, server._serve, secret=secret)
    server.address = server._server.address
    return server


class RpcClient:
    def __init__(self, conn: Connection, address: str, max_in_flight: int) -> None:
        self._conn = conn
        self.address = address
        self._next_id = 0
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._error: BaseException | None = None
        self._reader = asyncio.create_task(self._read(), name=f"zipcomm-rpc-client-{address}")

    async def _read(self) -> None:
        try:
            while True:
                frame = await self._conn.recv()
                op, call_id = frame.header.get("op"), frame.header.get("id")
                entry = self._pending.pop(call_id, None) if isinstance(call_id, int) else None
                if entry is None:
                    if op in ("ret", "err"):
                        continue  # the answer to a call that timed out
                    raise RemoteProtocolError(f"unexpected rpc frame op {op!r}")
                method, fut = entry
                if fut.done():
                    continue
                if op == "ret":
                    fut.set_result(_payload(frame))
                elif op == "err":
                    fut.set_exception(RemoteError(method, str(frame.header.get("type")),
                                                  str(frame.header.get("msg"))))
                else:
                    raise RemoteProtocolError(f"unexpected rpc frame op {op!r}")
        except ConnectionClosed as exc:
            self._fail(exc)
        except Exception as exc:
            self._conn.abort(exc)
            self._fail(ConnectionClosed(f"rpc connection to {self.address} failed: {exc}"))

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        pending, self._pending = self._pending, {}
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _check(self) -> None:
        if self._error is not None:
            raise ConnectionClosed(f"rpc connection to {self.address} is closed: {self._error}")

    async def call(self, method: str, data: Any = None, *, timeout: float | None = 30.0) -> Any:
        """Call ``method`` with ``data`` and return the handler's result."""
        self._check()
        async with self._slots:
            self._check()
            call_id = self._next_id
            self._next_id += 1
            fut = asyncio.get_running_loop().create_future()
            self._pending[call_id] = (method, fut)
            try:
                _send(self._conn, {"op": "call", "id": call_id, "m": method}, data)
                await self._conn.drain()
                async with asyncio.timeout(timeout):
                    return await fut
            except TimeoutError:
                raise ZipTimeout(f"rpc call {method!r} to {self.address} got no answer within {timeout} s") from None
            finally:
                self._pending.pop(call_id, None)

    async def cast(self, method: str, data: Any = None) -> None:
        """Send ``method`` with ``data`` without waiting for it to be handled (no reply); waits only
        while the connection's send buffer is over its high-water mark."""
        self._check()
        _send(self._conn, {"op": "cast", "m": method}, data)
        await self._conn.drain()

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def aclose(self) -> None:
        if self._error is None:
            self._fail(ConnectionClosed(f"rpc client for {self.address} closed"))
        await self._conn.aclose()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def rpc_connect(address: str, *, secret: bytes | None = None, timeout: float = 5.0,
                      max_in_flight: int = 64) -> RpcClient:
    """Connect to an :func:`serve_rpc` server."""
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
    conn = await open_connection(address, secret=secret, timeout=timeout)
    return RpcClient(conn, address, max_in_flight)
