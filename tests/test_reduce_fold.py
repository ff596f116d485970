"""Large reduce pieces are combined as they arrive (``ReduceChannel._fold``), and the rounds come
out exactly as when every piece is combined at the end."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

import zipcomm
from zipcomm.channels import reduce as reduce_mod
from zipcomm.channels.reduce import ReduceChannel
from zipcomm.errors import CollectiveTimeout

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


@contextlib.asynccontextmanager
async def reduce_members(n: int, **kwargs):
    """``n`` runtimes on a fan-out 2 controller (interior members exist from 4 on), each in
    reduce channel "r"; the first one in is the root."""
    async with zipcomm.Controller("127.0.0.1:0", fanout=2) as ctl:
        async with contextlib.AsyncExitStack() as stack:
            rts = [await stack.enter_async_context(zipcomm.connect(ctl.address)) for _ in range(n)]
            yield [await rt.reduce_channel("r", **kwargs) for rt in rts]


@pytest.fixture
def folds(monkeypatch):
    """Every first piece folded on arrival, by member id."""
    seen: dict[int, int] = {}
    real = ReduceChannel._fold

    def spy(self, sender, rnd, piece):
        before = len(rnd.folded)
        real(self, sender, rnd, piece)
        if len(rnd.folded) > before:
            seen[self.me] = seen.get(self.me, 0) + 1

    monkeypatch.setattr(ReduceChannel, "_fold", spy)
    return seen


async def test_large_allreduce_rounds_fold_pieces_on_arrival_and_stay_exact(folds) -> None:
    async with reduce_members(7, reduce_f=zipcomm.SUM) as chs:
        n = 300_000  # 2.4 MB of float64 per member: above the folding threshold
        for rnd in range(3):
            xs = [np.full(n, float(i + 1 + 10 * rnd)) + np.arange(n) for i in range(len(chs))]
            got = await asyncio.gather(*[c.allreduce(x, timeout=20, with_contributors=True)
                                         for c, x in zip(chs, xs)])
            want = np.sum(xs, axis=0)
            for value, contributors in got:
                assert np.array_equal(value, want)
                assert sorted(contributors) == sorted(c.me for c in chs)
        # the root and the interior members folded their children's pieces (3 rounds each)
        interior = [c for c in chs if c.children]
        assert len(interior) >= 3
        for c in interior:
            assert folds.get(c.me, 0) == 3 * len(c.children), (c.me, folds)


async def test_plain_reduce_to_a_handler_folds_and_counts_every_contributor(folds) -> None:
    results = []
    async with zipcomm.Controller("127.0.0.1:0", fanout=2) as ctl:
        async with contextlib.AsyncExitStack() as stack:
            rts = [await stack.enter_async_context(zipcomm.connect(ctl.address)) for _ in range(5)]
            root = await rts[0].reduce_channel("r", reduce_f=zipcomm.SUM,
                                               handler=lambda value, k: results.append((value.copy(), k)))
            others = [await rt.reduce_channel("r", reduce_f=zipcomm.SUM) for rt in rts[1:]]
            x = np.arange(200_000, dtype=np.int64)  # 1.6 MB
            await asyncio.gather(root.reduce(x, timeout=20), *[c.reduce(x * (i + 2), timeout=20)
                                                                 for i, c in enumerate(others)])
            assert len(results) == 1
            value, k = results[0]
            assert k == 5 and np.array_equal(value, x * (1 + 2 + 3 + 4 + 5))
            assert folds.get(root.me, 0) == len(root.children) == 2


async def test_small_pieces_and_mismatched_ones_are_left_for_the_end(folds, monkeypatch) -> None:
    async with reduce_members(4, reduce_f=zipcomm.SUM) as chs:
        got = await asyncio.gather(*[c.allreduce(np.arange(10) + i, timeout=20) for i, c in enumerate(chs)])
        for value in got:
            assert value.tolist() == (np.arange(10) * 4 + 6).tolist()
        assert not folds  # below the threshold: combined at the end, as always

        # pieces that cannot be combined (shapes differ) are not folded: the round fails at the end
        # as it did before, and every member's call ends by its deadline with a typed error
        monkeypatch.setattr(reduce_mod, "FOLD_MIN", 8)
        shapes = [(10,), (10,), (5,), (10,)]
        outcomes = await asyncio.gather(*[c.allreduce(np.ones(s), timeout=3) for c, s in zip(chs, shapes)],
                                        return_exceptions=True)
        assert all(isinstance(o, CollectiveTimeout) for o in outcomes), outcomes
