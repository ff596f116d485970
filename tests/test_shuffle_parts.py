"""``parts=True``: a shuffle round handed out as its senders' parts, not joined (no copy): over
direct links the received parts leave the runtime's pool (the application keeps them as long as
it likes, later rounds do not write over them) and this member's own part is its own; through a
host daemon the parts of this host's members stay read-only views of the shared memory, given
back when dropped. The parts are exact: ``parts[i]`` is sender ``senders[i]``'s items of this
member's class, in its input order."""

from __future__ import annotations

import asyncio
import os
import tempfile
import weakref

import numpy as np
import pytest

import zipcomm
from zipcomm.daemon import Daemon
from zipcomm.testing.wait import until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def _inputs(k: int, rnd: int, rows: int) -> np.ndarray:
    """Sender ``k``'s items: ``k`` in the top bits, a permutation of the row numbers below."""
    low = np.random.default_rng(31 * rnd + k).permutation(rows).astype(np.int64)
    return (np.int64(k + 1) << 40) | low


async def _round(chans, rnd: int, rows: int):
    inputs = [_inputs(k, rnd, rows) for k in range(len(chans))]
    got = await asyncio.gather(*(ch.shuffle_send_receive(x, lambda a, n: a % n, timeout=30,
                                                         with_senders=True, parts=True)
                                 for ch, x in zip(chans, inputs)))
    return inputs, got


def _check(inputs, got, ids: list[int]) -> None:
    """Every receiver: one part per sender, in ascending sender order, each sender's items of the
    receiver's class in input order; every item once over all receivers."""
    n = len(inputs)
    seen = 0
    classes = set()
    for parts, senders in got:
        assert isinstance(parts, list) and senders == sorted(ids) and len(parts) == len(senders)
        cls = next(int(p[0] % n) for p in parts if len(p))
        classes.add(cls)
        for part, sender in zip(parts, senders):
            k = ids.index(sender)
            assert part.dtype == np.int64 and part.ndim == 1
            assert np.array_equal(part, inputs[k][inputs[k] % n == cls]), (k, cls)
            seen += len(part)
    assert classes == set(range(n)) and seen == sum(len(x) for x in inputs)


def _pooled(rt, arr: np.ndarray) -> bool:
    return any(arr.base is b for b in rt.buffers._bufs)


async def test_direct_parts_are_the_applications_and_survive_later_rounds() -> None:
    rows = 3 * 1_150_000  # each part 9.2 MB, above POOLED_MIN: received into pooled buffers
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            ids = [rt.member_id for rt in rts]
            kept = []
            for rnd in range(2):  # every round kept, as a sort gathers them
                inputs, got = await _round(chans, rnd, rows)
                _check(inputs, got, ids)
                for rt, (parts, _senders) in zip(rts, got):
                    assert not any(_pooled(rt, p) for p in parts), "a handed-out part is still pooled"
                kept.append((inputs, got))
            # round 1 reused no buffer that round 0 handed out: both rounds still exact
            for inputs, got in kept:
                _check(inputs, got, ids)
            # the default result of the next round is the parts joined in the members' order
            inputs = [_inputs(k, 9, rows) for k in range(3)]
            joined = await asyncio.gather(*(ch.shuffle_send_receive(x, lambda a, n: a % n, timeout=30)
                                            for ch, x in zip(chans, inputs)))
            for out in joined:
                cls = int(out[0] % 3)
                assert np.array_equal(np.sort(out), np.sort(np.concatenate([x[x % 3 == cls] for x in inputs])))
            parts, senders = kept[0][1][0]  # the first member's parts of round 0
            received = weakref.ref(next(p for p, s in zip(parts, senders) if s != ids[0]).base)
            del kept, got, joined, parts
            assert received() is None, "a handed-out part outlived the application's references"
        finally:
            for rt in rts:
                await rt.aclose()


async def test_parts_through_the_daemon_are_shared_memory_views_given_back_when_dropped() -> None:
    rows = 1 << 20
    sock = os.path.join(tempfile.mkdtemp(prefix="zipcomm-test-"), "d.sock")
    async with zipcomm.Controller("127.0.0.1:0") as ctl, \
            Daemon(ctl.address, sock, shm_size=256 << 20, host_id="h1") as dm:
        rts = [await zipcomm.connect(ctl.address, daemon=dm.socket_path, host_id="h1") for _ in range(4)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            ids = [rt.member_id for rt in rts]
            kept = []
            for rnd in range(2):
                inputs, got = await _round(chans, rnd, rows)
                _check(inputs, got, ids)
                for rt, (parts, senders) in zip(rts, got):
                    others = [p for p, s in zip(parts, senders) if s != rt.member_id]
                    assert len(others) == 3 and not any(p.flags.writeable for p in others), \
                        "another member's part is not a read-only view of the arena"
                kept.append((inputs, got))
            used = dm.arena.used
            assert used >= 2 * 4 * rows * 8, f"the kept parts hold {used} bytes of the arena"
            for inputs, got in kept:  # the second round did not write over the first
                _check(inputs, got, ids)
            del kept, got, parts, others  # (the loops' names hold the last round's parts too)
            await until(lambda: dm.arena.used == 0, what="every range given back once the parts are dropped")
        finally:
            for rt in rts:
                await rt.aclose()


async def test_the_blocking_facade_passes_parts_through() -> None:
    """A member on the blocking facade (its own thread and loop) and two asyncio members."""
    from zipcomm import sync
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        sync.configure(ctl.address)
        rts = [await zipcomm.connect(ctl.address) for _ in range(2)]
        try:
            blocking = await asyncio.to_thread(sync.ShuffleChannel, "s")
            chans = [await rt.shuffle_channel("s") for rt in rts]
            inputs = [_inputs(k, 0, 1000) for k in range(3)]
            hf = lambda a, n: a % n  # noqa: E731
            got = await asyncio.gather(
                asyncio.to_thread(blocking.shuffle_send_receive, inputs[0], hf, 30, True, True),
                *(ch.shuffle_send_receive(x, hf, timeout=30, with_senders=True, parts=True)
                  for ch, x in zip(chans, inputs[1:])))
            ids = [sync._runtime().runtime.member_id] + [rt.member_id for rt in rts]
            _check(inputs, got, ids)
        finally:
            for rt in rts:
                await rt.aclose()
            await asyncio.to_thread(sync.shutdown)
            sync.configure()  # forget this test's controller address
