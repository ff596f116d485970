"""In-process runtime behaviour: deadlines, typed errors, hostile connections."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import zipcomm
from zipcomm.protocol.frames import encode_frame
from zipcomm.protocol.handshake import Handshake
from zipcomm.protocol.limits import PREFIX

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


async def test_stalled_allreduce_names_channel_epoch_round_and_missing_member() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a, zipcomm.connect(ctl.address) as b, \
                zipcomm.connect(ctl.address) as c:
            ra = await a.reduce_channel("r", zipcomm.SUM)
            rb = await b.reduce_channel("r", zipcomm.SUM)
            await c.reduce_channel("r", zipcomm.SUM)  # joins, never contributes
            with pytest.raises(zipcomm.CollectiveTimeout) as info:
                await asyncio.gather(ra.allreduce(np.ones(3), timeout=0.5), rb.allreduce(np.ones(3), timeout=0.5))
            err = info.value
            assert err.channel == "r" and err.round == 0 and err.epoch >= 1
            assert err.missing, "the error must say who is missing"
            assert "channel='r'" in str(err) and "round=0" in str(err)


async def test_receive_timeout_is_typed() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a:
            bc = await a.broadcast_channel("b")
            with pytest.raises(zipcomm.CollectiveTimeout) as info:
                await bc.receive(timeout=0.2)
            assert info.value.channel == "b"


async def test_unsupported_payload_is_refused_at_the_sender() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a, zipcomm.connect(ctl.address) as b:
            ba = await a.broadcast_channel("b")
            bb = await b.broadcast_channel("b")
            with pytest.raises(zipcomm.UnsupportedPayload, match="set"):
                await ba.send({1, 2})
            with pytest.raises(TypeError):
                await ba.send(object())
            await ba.send([1, "two", b"three", np.arange(3)])
            got = await bb.receive(timeout=5)
            assert got[:3] == [1, "two", b"three"] and got[3].tolist() == [0, 1, 2]


async def _raw(address: str, payload: bytes, handshake: bool) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if handshake:
            hs = Handshake(is_client=True, secret=None)
            writer.write(hs.initial_bytes())
            while not hs.done:
                out = hs.receive(await reader.read(4096))
                if out:
                    writer.write(out)
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)  # b"" once the server closed us
    finally:
        writer.close()


@pytest.mark.parametrize(
    "payload, handshake",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),  # not our protocol at all
        (PREFIX.pack(b"ZIPC", 1, 0, 0, 0xFFFFFFFF, 2**64 - 1), True),  # oversize prefixes
        (PREFIX.pack(b"XXXX", 1, 0, 0, 2, 0) + b"\x80\x80", True),  # bad magic
        (PREFIX.pack(b"ZIPC", 9, 0, 0, 1, 0) + b"\x80", True),  # bad version
        (PREFIX.pack(b"ZIPC", 1, 0, 0, 1, 0) + b"\xc1", True),  # invalid msgpack
        (b"".join(encode_frame({"op": "no_such_op"})), True),  # unknown op
    ],
)
async def test_bad_input_closes_that_connection_only(payload: bytes, handshake: bool) -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as good:
            ch = await good.broadcast_channel("before")
            closed = await _raw(ctl.address, payload, handshake)
            assert len(closed) <= 64  # at most the handshake reply; then EOF
            # The controller still serves: a new member joins and the old session still works.
            async with zipcomm.connect(ctl.address) as other:
                peer = await other.broadcast_channel("before")
                await ch.send("still alive")
                assert await peer.receive(timeout=5) == "still alive"


async def test_caller_may_reuse_its_buffer_once_a_call_returns() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a, zipcomm.connect(ctl.address) as b:
            ba = await a.broadcast_channel("b")  # first to join: the root sends locally
            bb = await b.broadcast_channel("b")
            big = np.arange(4_000_000, dtype=np.int64)  # 32 MB: still on its way when send returns
            await ba.send(big)
            big[:] = -1
            got = await bb.receive(timeout=10)
            assert got[0] == 0 and got[-1] == 3_999_999 and not got.flags.writeable
            ra = await a.reduce_channel("r", zipcomm.SUM)
            rb = await b.reduce_channel("r", zipcomm.SUM)
            mine = np.ones(1_000_000)
            calls = [asyncio.ensure_future(ra.allreduce(np.ones(1_000_000), timeout=10)),
                     asyncio.ensure_future(rb.allreduce(mine, timeout=10))]
            await asyncio.sleep(0)  # one turn: both calls have started (and returned control)
            mine[:] = 100.0  # the contribution was taken when the call started
            results = await asyncio.gather(*calls)
            assert all(float(r[0]) == 2.0 and float(r[-1]) == 2.0 for r in results)


async def test_allreduce_alone_leaves_the_callers_array_alone() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a:
            rc = await a.reduce_channel("solo", zipcomm.SUM)
            x = np.ones(3)
            result = await rc.allreduce(x, timeout=5)
            x[:] = 5.0  # still the caller's: writable, and not the result it got back
            assert result.tolist() == [1.0, 1.0, 1.0]


async def test_a_lone_root_closes_without_waiting_out_its_deadline() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rt = await zipcomm.connect(ctl.address)
        rc = await rt.reduce_channel("r", zipcomm.SUM)
        await rc.reduce(np.ones(3))  # its round completes at once: nothing to wait for on close
        await asyncio.wait_for(rt.aclose(), 5.0)  # the graceful-leave wait is 10 s


async def test_a_root_leaving_right_after_a_round_does_not_overtake_its_result() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as receiver:
            leaver = await zipcomm.connect(ctl.address)
            seen: list[int] = []
            root = await leaver.reduce_channel("r", zipcomm.SUM)  # first to join: the root
            rc = await receiver.reduce_channel("r", zipcomm.SUM, handler=lambda result, n: seen.append(n))
            for _ in range(3):
                waiting = asyncio.ensure_future(rc.reduce(np.ones(5_000_000), timeout=20))
                await root.reduce(np.ones(5_000_000))
                assert float((await waiting)[0]) == 2.0
            last = asyncio.ensure_future(rc.reduce(np.ones(5_000_000), timeout=20))
            await root.reduce(np.ones(5_000_000))
            await leaver.aclose()  # the result (40 MB) is still on its way to the handler
            assert float((await last)[0]) == 2.0
            assert seen == [2, 2, 2, 2]


@pytest.mark.parametrize("seed", range(8))
async def test_members_join_while_others_loop_allreduce(seed: int) -> None:
    """The bench's set-up barrier: joined members loop an allreduce counting contributors
    while the others are still joining; every loop ends with the full count, none stalls."""
    import random

    rng = random.Random(seed)
    n = 8
    async with zipcomm.Controller("127.0.0.1:0", fanout=2) as ctl:
        runtimes = [await zipcomm.connect(ctl.address) for _ in range(n)]
        try:
            async def member(i: int) -> list[int]:
                await asyncio.sleep(rng.random() * 0.05 * i)  # staggered joins, not a synchronisation
                ch = await runtimes[i].reduce_channel("bar", reduce_f=zipcomm.SUM)
                counts = []
                while True:
                    got = await ch.allreduce(np.ones(1, dtype=np.int64), timeout=10)
                    counts.append(int(got[0]))
                    if counts[-1] == n:
                        return counts
            results = await asyncio.wait_for(asyncio.gather(*(member(i) for i in range(n))), 30)
            for counts in results:
                assert counts[-1] == n and all(1 <= c <= n for c in counts)
        finally:
            for rt in runtimes:
                await rt.aclose()
