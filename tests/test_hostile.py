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
