"""Large items travel as parts: pipelined through the tree, received in place, from reused buffers;
peers of one network namespace talk over a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import numpy as np
import pytest

import zipcomm
from zipcomm import runtime as runtime_mod
from zipcomm.buffers import BufferPool
from zipcomm.channels import core, parts
from zipcomm.protocol import messages as m
from zipcomm.testing.wait import until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

CHUNK = 64 * 1024


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(parts, "CHUNK_BYTES", CHUNK)


@contextlib.asynccontextmanager
async def broadcast_members(n: int):
    """``n`` runtimes on a fan-out 2 controller, each in broadcast channel "big" (the first is its root)."""
    async with zipcomm.Controller("127.0.0.1:0", fanout=2) as ctl:
        async with contextlib.AsyncExitStack() as stack:
            rts = [await stack.enter_async_context(zipcomm.connect(ctl.address)) for _ in range(n)]
            yield [await rt.broadcast_channel("big") for rt in rts]


async def test_a_large_broadcast_arrives_whole_from_parts_received_in_place(small_parts) -> None:
    async with broadcast_members(5) as chs:
        rts = [ch.rt for ch in chs]
        rng = np.random.default_rng(1)
        for sender in (0, 3, 0):  # the root, then a member deeper in the tree
            x = rng.standard_normal((301, 517))  # 1.2 MB: 19 parts, the last one short
            others = [c for i, c in enumerate(chs) if i != sender]
            got = await asyncio.gather(chs[sender].send(x), *[c.receive(timeout=20) for c in others])
            for y in got[1:]:
                assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x)
                assert not y.flags.writeable
        for i, (rt, ch) in enumerate(zip(rts, chs)):
            held = [item for item in ch.history if item.kind == "p"]
            assert len(held) == 3 * 19, f"member {i}: {len(held)} parts in its history"
            if i:
                # received straight into the whole array: it is a view of a pooled buffer
                assert any(np.shares_memory(y, buf) for buf in rt.buffers._bufs for y in [got[-1]]) or \
                    any(np.shares_memory(item.data, buf) for buf in rt.buffers._bufs for item in held)


async def test_parts_go_in_place_and_the_pool_serves_the_next_item(small_parts) -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a, zipcomm.connect(ctl.address) as b:
            ba = await a.broadcast_channel("b")
            bb = await b.broadcast_channel("b")
            placed = []
            place = bb.place_part
            bb.place_part = lambda header, descriptors: placed.append(place(header, descriptors)) or placed[-1]
            x = np.arange(40_000, dtype=np.int64)  # 320 KB: 5 parts
            await ba.send(x)
            first = await bb.receive(timeout=10)
            assert np.array_equal(first, x)
            assert len(placed) == 5 and all(p is not None for p in placed), "every part is received in place"
            address = first.__array_interface__["data"][0]
            del first
            placed.clear()
            bb.history.items.clear()  # nothing refers to the buffer any more
            await ba.send(x + 1)
            second = await bb.receive(timeout=10)
            assert np.array_equal(second, x + 1)
            assert second.__array_interface__["data"][0] == address, "the free buffer is reused"


async def test_the_pool_reuses_a_buffer_only_once_nothing_else_holds_it() -> None:
    pool = BufferPool(max_bytes=3 * 1000)
    a = pool.take(1000)
    a_addr = a.__array_interface__["data"][0]
    b = pool.take(1000)
    assert not np.shares_memory(a, b), "a held buffer is not handed out again"
    del a
    c = pool.take(900)  # a free buffer of up to twice the size serves
    assert c.__array_interface__["data"][0] == a_addr and c.nbytes == 900
    d = pool.take(1000)
    e = pool.take(1000)  # beyond max_bytes with every pooled buffer held: a plain allocation
    assert e.nbytes == 1000 and not any(np.shares_memory(e, x) for x in (b, c, d))
    assert pool._bytes <= pool.max_bytes
    del b, c, d, e
    big = pool.take(2500)  # room is made by dropping free buffers
    assert big.nbytes == 2500 and pool._bytes <= pool.max_bytes


async def test_parts_that_do_not_continue_are_dropped_and_a_republished_item_counts_once(caplog) -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a:
            ch = await a.broadcast_channel("b")
            ch.last_key = (1, 0)
            x = np.arange(3000, dtype=np.int32)
            flat = x.view(np.uint8)
            chunks = [flat[i:i + 4000] for i in range(0, flat.nbytes, 4000)]
            first = {"k": "b", "m": {"origin": 7, "msg_id": 1}, "i": 0, "n": 3, "dt": x.dtype.str, "sh": [3000]}

            def part(term, n, prev, i, meta=None):
                return m.Item(channel="b", key=[term, n], prev=list(prev), kind="p",
                              meta=meta or (first if i == 0 else {"i": i, "n": 3}), data=chunks[i].copy())

            # term 1: two parts, then the root fails; term 2 re-publishes the item whole
            await ch._on_item(None, part(1, 1, (1, 0), 0))
            await ch._on_item(None, part(1, 2, (1, 1), 1))
            assert ch._queue.empty()
            await ch._on_item(None, part(2, 1, (1, 2), 0))
            await ch._on_item(None, part(2, 2, (2, 1), 1))
            await ch._on_item(None, part(2, 3, (2, 2), 2))
            got = ch._queue.get_nowait()
            assert np.array_equal(got, x) and ch._queue.empty() and ch.last_msg[7] == 1
            # a part out of order, or a malformed first part: dropped, logged, nothing delivered
            with caplog.at_level(logging.ERROR, logger="zipcomm.channels"):
                await ch._on_item(None, part(2, 4, (2, 3), 1))
                bad = dict(first, dt="O", m={"origin": 7, "msg_id": 2})
                await ch._on_item(None, part(2, 5, (2, 4), 0, bad))
                await ch._on_item(None, part(2, 6, (2, 5), 1))
                await ch._on_item(None, part(2, 7, (2, 6), 2))
            assert ch._queue.empty()
            assert "malformed first part" in caplog.text
            # parts whose sizes do not add up to the announced shape
            with caplog.at_level(logging.ERROR, logger="zipcomm.channels"):
                short = dict(first, sh=[2000], m={"origin": 7, "msg_id": 3})
                await ch._on_item(None, part(2, 8, (2, 7), 0, short))
                await ch._on_item(None, part(2, 9, (2, 8), 1))
                await ch._on_item(None, part(2, 10, (2, 9), 2))
            assert ch._queue.empty() and "do not add up" in caplog.text
            assert ch.last_key == (2, 10)


async def test_an_item_standing_for_parts_replaces_the_first_parts_held() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a:
            ch = await a.broadcast_channel("b")
            ch.last_key = (1, 0)
            x = np.arange(1000, dtype=np.int64)
            flat = x.view(np.uint8)
            first = {"k": "b", "m": {"origin": 9, "msg_id": 1}, "i": 0, "n": 2, "dt": x.dtype.str, "sh": [1000]}
            await ch._on_item(None, m.Item(channel="b", key=[1, 1], prev=[1, 0], kind="p", meta=first,
                                           data=flat[:4000].copy()))
            # as a host daemon's member serves it: one item from before the first part to the last
            whole = m.Item(channel="b", key=[1, 2], prev=[1, 0], kind="b", meta={"origin": 9, "msg_id": 1}, data=x)
            await ch._on_item(None, whole)
            assert np.array_equal(ch._queue.get_nowait(), x) and ch._queue.empty()
            assert ch.last_key == (1, 2)


async def _peer_link_families() -> list:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a, zipcomm.connect(ctl.address) as b:
            ba = await a.broadcast_channel("b")
            bb = await b.broadcast_channel("b")
            await bb.send(np.arange(3))
            assert (await ba.receive(timeout=5)).tolist() == [0, 1, 2]
            return [link.conn._transport.get_extra_info("socket").family for link in b._peers.values()]


async def test_peers_of_one_namespace_use_a_unix_socket_when_turned_on(monkeypatch) -> None:
    families = _peer_link_families
    assert await families() == [socket.AF_INET]  # the default
    monkeypatch.setattr(runtime_mod, "LOCAL_PEERS", True)
    assert await families() == [socket.AF_UNIX]


async def test_peers_use_the_unix_socket_on_uvloop_as_well(monkeypatch) -> None:
    """uvloop (the loop zipcomm's entry points pick) cannot connect to an abstract socket name
    by itself: the socket is connected by zipcomm, not silently replaced by TCP."""
    import uvloop

    monkeypatch.setattr(runtime_mod, "LOCAL_PEERS", True)
    assert await asyncio.to_thread(uvloop.run, _peer_link_families()) == [socket.AF_UNIX]


async def test_two_members_broadcasting_large_items_at_once_through_a_remote_root(small_parts) -> None:
    """Each sender's parts are relayed by the root as they arrive; a second sender's parts, coming
    in meanwhile, are gathered whole and follow: every member gets both items, whole, in one
    order."""
    async with broadcast_members(4) as chs:
        assert chs[0].is_root
        x = np.arange(200_000, dtype=np.float64)  # 1.6 MB: 25 parts
        y = -np.arange(150_000, dtype=np.int32).reshape(1000, 150)
        sends = [chs[1].send(x), chs[2].send(y)]
        got = await asyncio.gather(*sends, *[chs[i].receive(timeout=20) for i in (0, 3)],
                                   *[chs[i].receive(timeout=20) for i in (0, 3)])
        orders = []
        for member, first, second in ((0, got[2], got[4]), (3, got[3], got[5])):
            order = [a.dtype.str for a in (first, second)]
            orders.append(order)
            for a in (first, second):
                want = x if a.dtype == x.dtype else y
                assert a.shape == want.shape and np.array_equal(a, want), f"member {member}"
        assert orders[0] == orders[1], "one order for every member"
        # each sender also receives the other's item
        assert np.array_equal(await chs[1].receive(timeout=20), y)
        assert np.array_equal(await chs[2].receive(timeout=20), x)
        assert chs[0]._relay is None and not chs[0].holding and not chs[0]._gathers


async def test_a_relay_whose_sender_stops_is_abandoned_and_the_stream_goes_on(small_parts, monkeypatch) -> None:
    from zipcomm.channels import broadcast

    monkeypatch.setattr(broadcast, "RELAY_IDLE", 0.2)
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a, zipcomm.connect(ctl.address) as b:
            ba = await a.broadcast_channel("b")
            bb = await b.broadcast_channel("b")
            assert ba.is_root
            x = np.arange(50_000, dtype=np.int64)
            parts = bb._parts_of(m.Submit(channel="b", origin=b.member_id, msg_id=99, data=x))
            assert len(parts) > 2
            for part in parts[:2]:  # the sender stops after two parts
                b.send_to(a.member_id, a.address, part)
            await b.drain_to(a.member_id)
            await until(lambda: ba._relay is not None and ba._relay.next_i == 2, "the root relays the parts", 10)
            assert ba.holding
            # meanwhile the root's own broadcast waits behind the relayed item, then goes out
            await asyncio.wait_for(ba.send(np.arange(3)), 5)
            assert (await bb.receive(timeout=5)).tolist() == [0, 1, 2]
            assert ba._relay is None and not ba.holding
            # the abandoned item never reaches anyone
            with pytest.raises(zipcomm.CollectiveTimeout):
                await bb.receive(timeout=0.3)


async def test_a_part_announcing_an_array_beyond_the_frame_limit_is_refused(caplog) -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        async with zipcomm.connect(ctl.address) as a:
            ch = await a.broadcast_channel("b")
            huge = {"k": "b", "m": {"origin": 1, "msg_id": 1}, "i": 0, "n": 2, "dt": "<f8", "sh": [1 << 40]}
            with caplog.at_level(logging.ERROR, logger="zipcomm.channels"):
                await ch._on_item(None, m.Item(channel="b", key=[1, 1], prev=[0, 0], kind="p", meta=huge,
                                               data=np.zeros(8, np.uint8)))
                # and as a submitted part at the root: nothing is allocated for it
                ch._sequence(m.Submit(channel="b", origin=5, msg_id=1, part=[0, 2, "<f8", [1 << 40]],
                                      data=np.zeros(8, np.uint8)))
            assert "malformed first part" in caplog.text and "malformed part submitted" in caplog.text
            assert ch._queue.empty() and not ch._gathers and ch._relay is None


async def test_the_history_counts_whole_items_not_parts(monkeypatch) -> None:
    monkeypatch.setattr(core, "HISTORY_ITEMS", 3)
    history = core.History(max_bytes=1 << 30)
    key = iter(range(1, 1000))
    for msg in range(5):  # five items of 4 parts each
        for i in range(4):
            meta = {"k": "b", "m": {}, "i": 0, "n": 4, "dt": "|u1", "sh": [40]} if i == 0 else {"i": i, "n": 4}
            history.append(m.Item(channel="c", key=[1, next(key)], prev=[1, 0], kind="p", meta=meta,
                                  data=np.zeros(10, np.uint8)))
    kept = [item for item in history if item.kind == "p" and item.meta["i"] == 0]
    assert len(kept) == 3 and history.count == 3
    # the parts of the three last items, and the later parts of the one before (a child that has its
    # first parts can still complete it); they go with the next eviction
    assert len(history) == 3 * 4 + 3
    assert [item.meta["i"] for item in list(history)[:4]] == [1, 2, 3, 0]
