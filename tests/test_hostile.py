"""Hostile input against every listening endpoint over real sockets: the controller, a member's
peer port, a host daemon's socket and a parameter-server shard. An HTTP request and oversized
length prefixes (2^31, 2^32-1, 2^64-1) each close that one connection within a second; the
endpoint keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import tracemalloc

import pytest

import zipcomm
from cirrus.ps import Shard
from zipcomm.daemon import Daemon
from zipcomm.errors import ConnectionClosed, FrameTooLarge
from zipcomm.protocol.frames import FrameDecoder
from zipcomm.protocol.limits import MAGIC, PREFIX, VERSION
from zipcomm.transport.connection import open_connection, parse_address

HUGE = [(2**31, 0), (2**32 - 1, 0), (10, 2**64 - 1), (10, 2**31 * 3)]


@contextlib.asynccontextmanager
async def endpoints():
    """(name, address) of one live endpoint of each kind."""
    tmp = tempfile.mkdtemp(prefix="zipcomm-hostile-")
    async with zipcomm.Controller("127.0.0.1:0") as ctl, \
            Daemon(ctl.address, os.path.join(tmp, "d.sock"), shm_size=8 << 20) as dm:
        rt = await zipcomm.connect(ctl.address, daemon="")
        shard = Shard(0, 1)
        try:
            with pytest.raises(RuntimeError, match="already started"):
                await rt.start()
            ps = await shard.start()
            yield [("controller", ctl.address), ("member peer port", rt.address),
                   ("daemon socket", "unix:" + dm.socket_path), ("parameter server", ps)], ctl
        finally:
            await shard.aclose()
            await rt.aclose()


async def _raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, where = parse_address(address)
    if kind == "unix":
        return await asyncio.open_unix_connection(where)  # type: ignore[arg-type]
    host, port = where  # type: ignore[misc]
    return await asyncio.open_connection(host, port)


async def _still_serving(address: str) -> None:
    conn = await open_connection(address)  # a full handshake works after the abuse
    await conn.aclose()


def test_the_decoder_refuses_huge_prefixes_before_allocating_and_at_once() -> None:
    for header_len, buffers_len in HUGE:
        decoder = FrameDecoder()
        prefix = PREFIX.pack(MAGIC, VERSION, 0, 0, header_len, buffers_len)
        tracemalloc.start()
        began = time.perf_counter()
        try:
            with pytest.raises(FrameTooLarge):
                decoder.feed(prefix)
            took = time.perf_counter() - began
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024 and took < 0.010, (header_len, buffers_len, peak, took)


@pytest.mark.asyncio
async def test_an_http_request_to_each_port_is_closed_within_a_second() -> None:
    async with endpoints() as (eps, _):
        for name, address in eps:
            r, w = await _raw(address)
            w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n")
            await w.drain()
            began = time.monotonic()
            with contextlib.suppress(ConnectionError):
                while await asyncio.wait_for(r.read(4096), 1.0):  # until EOF
                    pass
            assert time.monotonic() - began < 1.0, name
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
            await _still_serving(address)


@pytest.mark.asyncio
async def test_huge_length_prefixes_after_the_handshake_close_that_connection_only() -> None:
    async with endpoints() as (eps, _):
        for name, address in eps:
            bystander = await open_connection(address)
            for header_len, buffers_len in HUGE:
                conn = await open_connection(address)  # handshaken: the frame decoder is next
                conn._transport.write(PREFIX.pack(MAGIC, VERSION, 0, 0, header_len, buffers_len))  # type: ignore[union-attr]
                began = time.monotonic()
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(conn.recv(), 1.0)
                assert time.monotonic() - began < 1.0, (name, header_len, buffers_len)
                await conn.aclose()
            assert not bystander.is_closed, name  # the other connection was not touched
            await bystander.aclose()
            await _still_serving(address)


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_silent_and_slow_drip_sockets_are_closed_by_their_deadline_while_joins_keep_working() -> None:
    from zipcomm.protocol.handshake import Handshake
    from zipcomm.transport.connection import HANDSHAKE_TIMEOUT

    hello = Handshake(True, None).initial_bytes()  # a real client hello, sent one byte at a time

    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        host, port = ctl.address.rsplit(":", 1)
        async with await zipcomm.connect(ctl.address, daemon="") as rt:
            async def joins(tag: str, n: int = 300) -> list[float]:
                lat = []
                for i in range(n):
                    began = time.perf_counter()
                    ch = await rt.broadcast_channel(f"{tag}-{i}")
                    lat.append(time.perf_counter() - began)
                    await ch.aclose()
                return lat

            quiet = await joins("quiet")
            opened = time.monotonic()
            silent = [await asyncio.open_connection(host, int(port)) for _ in range(1000)]
            drips = [await asyncio.open_connection(host, int(port)) for _ in range(100)]

            async def drip(w: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    for b in hello * 100:  # never completes: one byte every 0.2 s
                        w.write(bytes([b]))
                        await w.drain()
                        await asyncio.sleep(0.2)

            drippers = [asyncio.create_task(drip(w)) for _, w in drips]
            loaded = await joins("loaded")  # while 1,100 sockets hang on the controller

            async def eof(r: asyncio.StreamReader) -> float:
                with contextlib.suppress(ConnectionError):
                    while await r.read(4096):
                        pass
                return time.monotonic() - opened

            try:
                closed = await asyncio.wait_for(asyncio.gather(*(eof(r) for r, _ in silent + drips)),
                                                HANDSHAKE_TIMEOUT + 10)
            finally:
                for t in drippers:
                    t.cancel()
                await asyncio.gather(*drippers, return_exceptions=True)
                for _, w in silent + drips:
                    w.close()
            print(f"quiet join p99 {_p99(quiet) * 1e3:.2f} ms, loaded {_p99(loaded) * 1e3:.2f} ms; "
                  f"abusive sockets closed after {min(closed):.2f}..{max(closed):.2f} s")
            # every one closed by its handshake deadline (they were opened over `opened`..now)
            assert max(closed) <= HANDSHAKE_TIMEOUT + 3.0 and min(closed) >= HANDSHAKE_TIMEOUT - 0.5
            assert _p99(loaded) <= 2 * _p99(quiet), (_p99(loaded), _p99(quiet))
            ch = await rt.broadcast_channel("after")  # and the controller still serves
            await ch.aclose()


@pytest.mark.asyncio
async def test_connections_beyond_the_cap_are_closed_on_arrival_and_counted() -> None:
    from zipcomm.transport.connection import start_server

    async def serve(conn) -> None:
        await conn.closed

    server = await start_server("127.0.0.1:0", serve, max_connections=5)
    try:
        kept = [await open_connection(server.address) for _ in range(5)]
        host, port = server.address.rsplit(":", 1)
        for _ in range(3):
            r, w = await asyncio.open_connection(host, int(port))
            assert await asyncio.wait_for(r.read(), 1.0) == b""  # closed at once
            w.close()
        assert server.refused_connections == 3 and server.connections == 5
        await kept.pop().aclose()
        await _until(lambda: server.connections == 4)
        again = await open_connection(server.address)  # a freed slot is usable again
        await again.aclose()
        for c in kept:
            await c.aclose()
    finally:
        await server.aclose()


async def _until(pred, limit: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit
    while not pred():  # poll a predicate under a deadline
        assert loop.time() < give_up, "timed out"
        await asyncio.sleep(0.01)
