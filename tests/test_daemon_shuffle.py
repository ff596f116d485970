"""Shuffles through a host daemon: parts for members of the same host are handed over in the
daemon's shared memory (partitioned straight into the arena, no byte on a socket), parts for
other hosts go over direct links, and every range comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile

import numpy as np
import pytest

import zipcomm
from zipcomm.daemon import Daemon
from zipcomm.daemon import protocol as d
from zipcomm.testing.wait import until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def _sock() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="zipcomm-test-"), "d.sock")


def _inputs(k: int, rnd: int, rows: int = 40_000) -> np.ndarray:
    return np.random.default_rng(1000 * rnd + k).integers(0, 1 << 40, rows, dtype=np.int64)


@contextlib.asynccontextmanager
async def _host(members: int, shm_size: int, remote: int = 0):
    """A controller, a host daemon of host "h1" with an arena of ``shm_size`` bytes, ``members``
    runtimes through the daemon and ``remote`` runtimes of other hosts (no daemon); yields the
    daemon and the runtimes, and closes the runtimes at the end."""
    async with zipcomm.Controller("127.0.0.1:0") as ctl, \
            Daemon(ctl.address, _sock(), shm_size=shm_size, host_id="h1") as dm:
        rts = [await zipcomm.connect(ctl.address, daemon=dm.socket_path, host_id="h1") for _ in range(members)]
        rts += [await zipcomm.connect(ctl.address, host_id=f"other-{i}") for i in range(remote)]
        try:
            yield dm, rts
        finally:
            for rt in rts:
                await rt.aclose()


async def _round(chans, rnd: int, hash_function=lambda a, n: a % n):
    inputs = [_inputs(k, rnd) for k in range(len(chans))]
    outs = await asyncio.gather(*(ch.shuffle_send_receive(x, hash_function, timeout=30)
                                  for ch, x in zip(chans, inputs)))
    return inputs, outs


def _check(inputs, outs, n) -> None:
    everything = np.concatenate(inputs)
    classes = set()
    for out in outs:
        assert len(out), "every receiver gets items here"
        cls = int(out[0] % n)
        assert np.all(out % n == cls)
        want = np.concatenate([x[x % n == cls] for x in inputs])  # senders in order, stable
        assert np.array_equal(np.sort(out), np.sort(want))
        classes.add(cls)
    assert classes == set(range(n)) and sum(len(o) for o in outs) == len(everything)


async def test_local_parts_go_through_shared_memory_and_every_range_comes_back() -> None:
    async with _host(4, 64 << 20) as (dm, rts):
        chans = [await rt.shuffle_channel("s") for rt in rts]
        for rnd in range(3):
            before = dm.stats["bytes_to_members_shm"]
            inputs, outs = await _round(chans, rnd)
            _check(inputs, outs, 4)
            # three quarters of every member's bytes are for the three others: all in the arena
            moved = dm.stats["bytes_to_members_shm"] - before
            shipped = sum(int(np.count_nonzero(x % 4 != own) * 8)
                          for x, own in zip(inputs, [int(o[0] % 4) for o in outs]))
            assert moved == shipped, (moved, shipped)
            del outs
        await until(lambda: dm.arena.used == 0, what="every shuffle range given back")


async def test_members_of_another_host_get_their_parts_over_direct_links() -> None:
    async with _host(2, 64 << 20, remote=2) as (dm, rts):
        chans = [await rt.shuffle_channel("s") for rt in rts]
        inputs, outs = await _round(chans, 0)
        _check(inputs, outs, 4)
        assert dm.stats["bytes_to_members_shm"] > 0  # the two local members still share
        del outs
        await until(lambda: dm.arena.used == 0, what="every shuffle range given back")


async def test_a_full_arena_falls_back_to_direct_links() -> None:
    async with _host(3, 1 << 20) as (dm, rts):
        chans = [await rt.shuffle_channel("s") for rt in rts]
        big = [np.arange(k, 3 * 200_000, 3, dtype=np.int64) for k in range(3)]  # 1.6 MB each > arena
        outs = await asyncio.gather(*(ch.shuffle_send_receive(x, lambda a, n: a % n, timeout=30)
                                      for ch, x in zip(chans, big)))
        for out in outs:
            assert len(out) == 200_000 and len(set((out % 3).tolist())) == 1
        assert dm.stats["bytes_to_members_shm"] == 0


async def test_a_share_of_a_range_not_held_is_a_protocol_error() -> None:
    async with _host(2, 4 << 20) as (dm, (rt, other)):
        buf = await rt.daemon.empty((100_000,), np.int64)
        off = rt.daemon._own[buf.__array_interface__["data"][0]][0]
        # a part that does not fit the range: the session is closed, nothing handed out
        with pytest.raises(Exception) as ei:
            await rt.daemon.request(d.DShare, channel="s", round=0, offset=off, dtype="<i8",
                                    parts=[[other.member_id, 0, [10]], [other.member_id, 0, [200_000]]])
        assert type(ei.value).__name__ in ("DaemonLost", "ConnectionClosed"), ei.value
        assert dm.stats["bytes_to_members_shm"] == 0
        # another member asking to share a range it does not hold is refused the same way
        with pytest.raises(Exception):
            await other.daemon.request(d.DShare, channel="s", round=0, offset=off, dtype="<i8",
                                       parts=[[rt.member_id, 0, [10]]])
        del buf
        await until(lambda: dm.arena.used == 0, what="the closed sessions' ranges given back")


async def test_with_senders_names_the_members_whose_parts_a_result_holds() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rts[0].shuffle_channel("s"), await rts[1].shuffle_channel("s"),
                     await rts[2].shuffle_channel("s", role=zipcomm.RECEIVER)]
            x = [np.arange(k, 3000, 3, dtype=np.int64) for k in range(2)]
            outs = await asyncio.gather(
                chans[0].shuffle_send_receive(x[0], lambda a, n: a % n, timeout=30, with_senders=True),
                chans[1].shuffle_send_receive(x[1], lambda a, n: a % n, timeout=30, with_senders=True),
                chans[2].shuffle_receive(timeout=30, with_senders=True))
            senders = sorted(rt.member_id for rt in rts[:2])  # the RECEIVER sends nothing
            assert [s for _, s in outs] == [senders] * 3
            everything = np.sort(np.concatenate([data for data, _ in outs]))
            assert np.array_equal(everything, np.sort(np.concatenate(x)))
            plain = await asyncio.gather(chans[0].shuffle_send_receive(x[0], lambda a, n: a % n, timeout=30),
                                         chans[1].shuffle_send_receive(x[1], lambda a, n: a % n, timeout=30),
                                         chans[2].shuffle_receive(timeout=30))
            assert all(isinstance(p, np.ndarray) for p in plain)  # without the flag: the data alone
        finally:
            for rt in rts:
                await rt.aclose()
