"""The direct-link shuffle's fast path (zipcomm/channels/shuffle.py): an array is partitioned
into a pooled buffer while the round's member list is asked for, the round is taken only once
the data is partitioned, a round's parts are assembled into a pooled buffer, and the root is
looked up once per epoch. Results stay exact: every item once, each sender's items in input
order, the senders' blocks in the member list's order (the same for every receiver)."""

from __future__ import annotations

import asyncio
import weakref

import numpy as np
import pytest

import zipcomm
from zipcomm.channels import shuffle as S
from zipcomm.protocol import messages as m

pytestmark = [pytest.mark.timeout(120)]

ROWS = 300_000  # 2.4 MB of int64: above POOLED_ARRAY_MIN, so the pooled buffers are used


def _inputs(k: int, rnd: int, rows: int = ROWS) -> np.ndarray:
    """Sender ``k``'s items: ``k`` in the top bits, the row number below (unique, traceable)."""
    low = np.random.default_rng(97 * rnd + k).permutation(rows).astype(np.int64)
    return (np.int64(k + 1) << 40) | low


def _blocks(out: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``out`` as its senders' blocks, in order: ``[(sender, items)]``; each sender once."""
    senders = (out >> 40) - 1
    cuts = np.flatnonzero(np.diff(senders)) + 1
    blocks = [(int(b[0] >> 40) - 1, b) for b in np.split(out, cuts) if len(b)]
    names = [k for k, _ in blocks]
    assert len(names) == len(set(names)), f"a sender's part is not one block: {names}"
    return blocks


def _check(inputs: list[np.ndarray], outs: list[np.ndarray], n: int) -> None:
    orders = set()
    seen = 0
    for out in outs:
        assert out.dtype == np.int64 and out.ndim == 1
        if not len(out):
            continue
        cls = int(out[0] % n)
        blocks = _blocks(out)
        for k, items in blocks:
            want = inputs[k][inputs[k] % n == cls]
            assert np.array_equal(items, want), f"sender {k}'s part to class {cls} is not its stable part"
        present = [k for k, _ in blocks]
        assert set(present) == {k for k, x in enumerate(inputs) if np.any(x % n == cls)}
        orders.add(tuple(present))
        seen += len(out)
    assert seen == sum(len(x) for x in inputs), "items lost or doubled"
    assert len(orders) == 1, f"receivers disagree on the senders' order: {orders}"


async def _round(chans, rnd: int, hash_function=lambda a, n: a % n):
    inputs = [_inputs(k, rnd) for k in range(len(chans))]
    outs = await asyncio.gather(*(ch.shuffle_send_receive(x, hash_function, timeout=30)
                                  for ch, x in zip(chans, inputs)))
    return inputs, outs


@pytest.mark.asyncio
async def test_rounds_are_exact_and_held_results_survive_buffer_reuse() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(4)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            held = []
            for rnd in range(6):
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 4)
                if rnd % 2 == 0:  # kept: later rounds must not reuse (overwrite) their buffers
                    held.append((rnd, [o.copy() for o in outs], outs))
                del outs
            for rnd, copies, outs in held:
                for copy, out in zip(copies, outs):
                    assert np.array_equal(copy, out), f"round {rnd}'s result changed under its holder"
        finally:
            for rt in rts:
                await rt.aclose()


@pytest.mark.asyncio
async def test_the_caller_may_reuse_its_array_at_once() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            for rnd in range(3):
                inputs = [_inputs(k, rnd) for k in range(3)]
                mine = [x.copy() for x in inputs]
                tasks = [asyncio.ensure_future(ch.shuffle_send_receive(x, lambda a, n: a % n, timeout=30))
                         for ch, x in zip(chans, mine)]
                await tasks[0]
                mine[0][:] = -1  # sender 0 is done: its buffer is its own again
                outs = await asyncio.gather(*tasks)
                _check(inputs, outs, 3)
        finally:
            for rt in rts:
                await rt.aclose()


@pytest.mark.parametrize("bad, error", [
    (lambda a, n: a % n + n, ValueError),  # an index outside [0, n)
    (lambda a, n: (a % n)[:-1], TypeError),  # not one index per row
    (lambda a, n: (a % n).astype(np.float64), TypeError),  # not integers
])
@pytest.mark.asyncio
@pytest.mark.parametrize("first_round", [True, False])
async def test_a_bad_hash_is_a_typed_error_and_a_retry_loses_nothing(first_round, bad, error) -> None:
    """The round is taken only once the data is partitioned: the failing call raises, and the
    same member's next call delivers its parts in that very round (the speculative partition
    of later rounds fails the same way)."""
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            rnd = 0
            if not first_round:
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 3)
                rnd += 1
            inputs = [_inputs(k, rnd) for k in range(3)]
            others = [asyncio.ensure_future(ch.shuffle_send_receive(x, lambda a, n: a % n, timeout=30))
                      for ch, x in zip(chans[1:], inputs[1:])]
            with pytest.raises(error):
                await chans[0].shuffle_send_receive(inputs[0], bad, timeout=30)
            assert not any(t.done() for t in others), "a round completed without one of its senders"
            mine = await chans[0].shuffle_send_receive(inputs[0], lambda a, n: a % n, timeout=30)
            outs = [mine, *await asyncio.gather(*others)]
            _check(inputs, outs, 3)
            inputs, outs = await _round(chans, rnd + 1)  # and the channel goes on
            _check(inputs, outs, 3)
        finally:
            for rt in rts:
                await rt.aclose()


@pytest.mark.asyncio
async def test_a_new_member_changes_the_receiver_count_between_rounds() -> None:
    """A partition made ahead of the list by the last round's receiver count is redone when
    the list names another number of receivers."""
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            for rnd in range(2):
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 3)
            rts.append(await zipcomm.connect(ctl.address))
            chans.append(await rts[-1].shuffle_channel("s"))
            for rnd in range(2, 5):
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 4)
        finally:
            for rt in rts:
                await rt.aclose()


@pytest.mark.asyncio
async def test_the_root_is_looked_up_once_per_epoch() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        lookups = [0] * len(rts)
        for i, rt in enumerate(rts):
            request = rt.request

            async def counting(cls, _i=i, _request=request, **fields):
                if cls is m.LookupRoot:
                    lookups[_i] += 1
                return await _request(cls, **fields)

            rt.request = counting
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            epochs = {ch.epoch for ch in chans}
            for rnd in range(5):
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 3)
            if {ch.epoch for ch in chans} == epochs:  # no re-wiring meanwhile
                assert all(n <= 1 for n in lookups), lookups
        finally:
            for rt in rts:
                await rt.aclose()


@pytest.mark.asyncio
async def test_small_and_list_data_take_the_plain_path() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            for rnd in range(2):
                inputs = [_inputs(k, rnd, rows=50) for k in range(3)]
                outs = await asyncio.gather(*(ch.shuffle_send_receive(x, lambda a, n: a % n, timeout=30)
                                              for ch, x in zip(chans, inputs)))
                _check(inputs, outs, 3)
                lists = [[int(v) for v in x] for x in inputs]
                outs = await asyncio.gather(*(ch.shuffle_send_receive(x, lambda v, n: v % n, timeout=30)
                                              for ch, x in zip(chans, lists)))
                assert sorted(v for out in outs for v in out) == sorted(v for x in lists for v in x)
                assert all(isinstance(out, list) for out in outs)
        finally:
            for rt in rts:
                await rt.aclose()


def _pooled_base(rt, out: np.ndarray) -> int | None:
    """The id of the pool buffer under ``out``, or None when ``out`` is not in one."""
    return next((id(b) for b in rt.buffers._bufs if out.base is b), None)


@pytest.mark.asyncio
async def test_outputs_the_application_keeps_go_back_to_the_system_not_the_pool() -> None:
    """A round's array comes from the pool while the application drops it before the next
    round (the same buffer serves every round); once it keeps one, the pool lets go of that
    buffer and the next rounds' arrays are plain ones, freed when the application drops them;
    once it drops them again, the pool serves again. Every round stays exact."""
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(3)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            bases = []
            for rnd in range(3):  # dropped at once: one pool buffer per member, reused
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 3)
                bases.append([_pooled_base(rt, out) for rt, out in zip(rts, outs)])
                del outs
            assert all(b is not None for b in bases[0]) and bases[0] == bases[1] == bases[2]

            inputs, kept = await _round(chans, 3)  # kept across the next rounds, as a sort does
            _check(inputs, kept, 3)
            assert [_pooled_base(rt, out) for rt, out in zip(rts, kept)] == bases[0]
            kept_copies = [out.copy() for out in kept]
            later = []
            for rnd in (4, 5):
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 3)
                later.append(outs)
                assert all(_pooled_base(rt, out) is None for rt, out in zip(rts, outs))
            # the pool no longer holds the kept buffers: they are the application's alone
            assert all(_pooled_base(rt, out) is None for rt, out in zip(rts, kept))
            assert all(np.array_equal(a, b) for a, b in zip(kept, kept_copies))
            ref = weakref.ref(kept[0].base)
            del kept, later, outs
            assert ref() is None  # freed with the application's last reference

            for rnd in (6, 7):  # dropped at once again: pooled again
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 3)
                if rnd == 7:
                    assert all(_pooled_base(rt, out) is not None for rt, out in zip(rts, outs))
                del outs
        finally:
            for rt in rts:
                await rt.aclose()


def test_concat_assembles_into_the_pool_only_what_it_can_hold_exactly() -> None:
    from zipcomm.buffers import BufferPool

    pool = BufferPool()
    big = [np.arange(200_000, dtype=np.int64), np.arange(5, dtype=np.int64)]
    out = S._concat(big, pool)
    assert np.array_equal(out, np.concatenate(big)) and out.base is not None  # a pool buffer
    mixed = [np.arange(200_000, dtype=np.int64), np.arange(3, dtype=np.int32)]
    assert np.concatenate(mixed).dtype == S._concat(mixed, pool).dtype  # promotion as before
    rows = [np.ones((100_000, 3)), np.zeros((0, 3))]
    assert S._concat(rows, pool).shape == (100_000, 3)
    assert S._concat([[1], np.array([2, 3])], pool) == [1, 2, 3]


@pytest.mark.asyncio
async def test_the_root_leaving_moves_the_known_root() -> None:
    """Members that know the root from an earlier round ask the new one once it left."""
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address) for _ in range(4)]
        try:
            chans = [await rt.shuffle_channel("s") for rt in rts]
            for rnd in range(2):
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 4)
            root = next(i for i, ch in enumerate(chans) if ch.is_root)
            await rts.pop(root).aclose()
            chans.pop(root)
            for rnd in range(2, 5):
                inputs, outs = await _round(chans, rnd)
                _check(inputs, outs, 3)
            assert sum(ch.is_root for ch in chans) == 1
        finally:
            for rt in rts:
                await rt.aclose()
