"""Arrays from a channel's ``empty()`` on the direct links: a large one is handed over without a
copy when it is sent or contributed (zipcomm keeps that very array, the caller can no longer
write to it), as through a host daemon; any other array is copied first, so the caller may reuse
its buffer at once. Results stay exact either way."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import zipcomm
from zipcomm.buffers import POOLED_MIN, BufferPool, snapshot

pytestmark = [pytest.mark.timeout(120)]

ITEMS = POOLED_MIN // 8 + 1000  # int64 items: above the hand-over size


def test_only_a_large_empty_array_not_handed_over_yet_is_kept_as_it_is() -> None:
    pool = BufferPool()
    arr = pool.empty((ITEMS,), np.int64)
    arr[:] = 7
    assert arr.flags.writeable
    view = arr[:-1]
    assert snapshot(view, pool) is not view  # a view of it: copied
    assert snapshot(arr, pool) is arr  # handed over: no copy
    assert not arr.flags.writeable and int(arr.sum()) == 7 * ITEMS
    with pytest.raises(ValueError):
        arr[0] = 1
    again = snapshot(arr, pool)  # handed over once only: next time it is copied
    assert again is not arr and np.array_equal(again, arr)

    plain = np.full(ITEMS, 3, np.int64)
    copy = snapshot(plain, pool)
    assert copy is not plain and plain.flags.writeable and np.array_equal(copy, plain)

    small = pool.empty((10,), np.int64)  # below the hand-over size: an ordinary array
    small[:] = 1
    assert snapshot(small, pool) is not small and small.flags.writeable

    assert pool.empty((0, 3), np.float32).shape == (0, 3)
    assert pool.empty(ITEMS, "f8").shape == (ITEMS,)
    with pytest.raises(ValueError):
        pool.empty((-1,), np.int64)  # refused as numpy refuses it


@pytest.mark.asyncio
async def test_reduce_and_allreduce_take_empty_arrays_without_a_copy_and_stay_exact() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(4)]
        try:
            got = []
            root = await rts[0].reduce_channel("r", reduce_f=zipcomm.SUM,
                                               handler=lambda v, k: got.append((np.array(v), k)))
            chans = [root] + [await rt.reduce_channel("r", reduce_f=zipcomm.SUM) for rt in rts[1:]]
            alls = [await rt.reduce_channel("a", reduce_f=zipcomm.SUM) for rt in rts]
            base = np.arange(ITEMS, dtype=np.int64)
            for rnd in range(3):
                ins = []
                for k, ch in enumerate(chans):
                    y = await ch.empty(base.shape, base.dtype)
                    y[:] = base + (10 * k + rnd)
                    ins.append(y)
                await asyncio.gather(*(ch.reduce(y, timeout=30) for ch, y in zip(chans, ins)))
                want = 4 * base + sum(10 * k + rnd for k in range(4))
                assert len(got) == rnd + 1 and got[-1][1] == 4 and np.array_equal(got[-1][0], want)
                for k, y in enumerate(ins):  # zipcomm's now: read-only, and never combined into
                    assert not y.flags.writeable
                    assert np.array_equal(y, base + (10 * k + rnd))

                ins = []
                for k, ch in enumerate(alls):
                    y = await ch.empty(base.shape, base.dtype)
                    y[:] = base * (k + 1)
                    ins.append(y)
                outs = await asyncio.gather(*(ch.allreduce(y, timeout=30) for ch, y in zip(alls, ins)))
                for out in outs:
                    assert np.array_equal(out, 10 * base)
                assert all(np.array_equal(y, base * (k + 1)) for k, y in enumerate(ins))

        finally:
            for rt in rts:
                await rt.aclose()


@pytest.mark.asyncio
async def test_a_broadcast_of_an_empty_array_reaches_everyone_without_a_copy() -> None:
    """The root keeps what it broadcasts (its stream's history): an empty() array as it is,
    read-only from then on. Another member's send() returns once the root has the item, and
    keeps nothing: its array stays writable."""
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rt.broadcast_channel("b") for rt in rts]
            for rnd in range(3):
                for sender in (0, 2):  # the root, and a member that sends through the root
                    y = await chans[sender].empty((ITEMS,), np.int64)
                    y[:] = np.arange(ITEMS) * (rnd + 1) + sender
                    want = y.copy()
                    await chans[sender].send(y)
                    assert y.flags.writeable == (sender != 0) and np.array_equal(y, want)
                    for k, ch in enumerate(chans):
                        if k != sender:
                            assert np.array_equal(await ch.receive(timeout=30), want)
        finally:
            for rt in rts:
                await rt.aclose()


@pytest.mark.asyncio
async def test_a_channel_whose_daemon_is_gone_hands_empty_arrays_over_on_its_direct_links(tmp_path) -> None:
    from zipcomm.daemon import Daemon
    from zipcomm.testing.wait import until

    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        dm = await Daemon(ctl.address, str(tmp_path / "d.sock"), shm_size=64 << 20).start()
        rts = []
        daemon_up = True
        try:
            rts = [await zipcomm.connect(ctl.address, daemon=dm.socket_path) for _ in range(3)]
            chans = [await rt.reduce_channel("r", reduce_f=zipcomm.SUM) for rt in rts]
            daemon_up = False
            await dm.aclose()  # the daemon goes away: its members re-join over direct links
            await until(lambda: all(ch.client.lost for ch in chans), what="the daemon's loss seen",
                        limit=30, step=0.01)
            base = np.arange(ITEMS, dtype=np.int64)
            ins = []
            for k, ch in enumerate(chans):
                y = await ch.empty(base.shape, base.dtype)
                assert y.flags.writeable
                y[:] = base + k
                ins.append(y)
            outs = await asyncio.gather(*(ch.allreduce(y, timeout=30) for ch, y in zip(chans, ins)))
            for out in outs:
                assert np.array_equal(out, 3 * base + 3)
            assert all(ch.direct is not None for ch in chans)
            for k, y in enumerate(ins):  # handed over as they are: read-only, unchanged
                assert not y.flags.writeable and np.array_equal(y, base + k)
        finally:
            for rt in rts:
                await rt.aclose()
            if daemon_up:
                await dm.aclose()
