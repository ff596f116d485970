"""zipcomm.rpc: the public point-to-point request API over real loopback sockets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import zipcomm
from zipcomm import ConnectionClosed, RemoteError, ZipTimeout


async def _handler(method, data, peer):
    if method == "add":
        return {"sum": data["a"] + data["b"], "n": len(peer.state.setdefault("log", []))}
    if method == "note":
        peer.state.setdefault("log", []).append(data)
        return None
    if method == "log":
        return list(peer.state.get("log", []))
    if method == "echo":
        return data
    if method == "wait":
        await asyncio.sleep(data)
        return "late"
    raise KeyError(f"no method {method!r}")


@pytest.mark.asyncio
async def test_calls_casts_order_arrays_and_errors() -> None:
    gone = asyncio.Event()
    async with await zipcomm.serve_rpc("127.0.0.1:0", _handler, on_disconnect=lambda p: gone.set()) as srv:
        async with await zipcomm.rpc_connect(srv.address) as c:
            a = np.arange(1_000_000, dtype=np.float32)
            got = await c.call("add", {"a": a, "b": np.ones_like(a)}, timeout=10)
            np.testing.assert_array_equal(got["sum"], a + 1)
            assert got["n"] == 0
            for i in range(5):
                await c.cast("note", i)          # one-way, applied in order before the next call
            assert await c.call("log") == [0, 1, 2, 3, 4]
            # pipelined calls all come back to the right caller
            res = await asyncio.gather(*(c.call("echo", {"i": i, "x": np.full(3, i)}) for i in range(200)))
            assert [r["i"] for r in res] == list(range(200))
            assert all((r["x"] == r["i"]).all() for r in res)
            with pytest.raises(RemoteError) as err:
                await c.call("nope")
            assert err.value.remote_type == "KeyError" and "nope" in str(err.value)
            assert await c.call("echo", "still up") == "still up"   # the connection survived the error
            with pytest.raises(zipcomm.UnsupportedPayload):
                await c.call("echo", {"x": object()})
        await asyncio.wait_for(gone.wait(), 5)


@pytest.mark.asyncio
async def test_timeout_and_a_dying_server_fail_calls_with_typed_errors() -> None:
    srv = await zipcomm.serve_rpc("127.0.0.1:0", _handler)
    c = await zipcomm.rpc_connect(srv.address, max_in_flight=4)
    try:
        with pytest.raises(ZipTimeout):
            await c.call("wait", 5.0, timeout=0.2)
        pending = asyncio.create_task(c.call("wait", 30.0, timeout=60))
        await asyncio.sleep(0)  # let the call go out
        await srv.aclose()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(pending, 10)
        with pytest.raises(ConnectionClosed):
            await c.call("echo", 1)
        assert c.closed
    finally:
        await c.aclose()
        await srv.aclose()


@pytest.mark.asyncio
async def test_garbage_closes_only_that_connection() -> None:
    async with await zipcomm.serve_rpc("127.0.0.1:0", _handler) as srv:
        host, port = srv.address.rsplit(":", 1)
        r, w = await asyncio.open_connection(host, int(port))
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        assert await asyncio.wait_for(r.read(), 10) is not None  # closed by the server (EOF)
        w.close()
        async with await zipcomm.rpc_connect(srv.address) as c:
            assert await c.call("echo", 7) == 7
