"""A host daemon gives every range back once a round's result is delivered and dropped, while
the members stay connected (a stream's repair history keeps at most its share of the arena): a
daemon serving rounds for hours must not fill its arena."""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile

import numpy as np
import pytest

import zipcomm
from zipcomm.daemon import Daemon
from zipcomm.testing.wait import until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest.mark.parametrize("kind", ["reduce", "allreduce"])
async def test_the_arena_drains_after_every_round(kind: str) -> None:
    sock = os.path.join(tempfile.mkdtemp(prefix="zipcomm-test-"), "d.sock")
    got: list = []
    async with zipcomm.Controller("127.0.0.1:0") as ctl, Daemon(ctl.address, sock, shm_size=64 << 20) as dm:
        rts = [await zipcomm.connect(ctl.address, daemon=dm.socket_path) for _ in range(4)]
        try:
            handler = lambda v, n: got.append((float(v[0]), n))  # noqa: E731 (keeps no view)
            chans = [await rt.reduce_channel("r", zipcomm.SUM, handler=handler if i == 0 and kind == "reduce"
                                             else None) for i, rt in enumerate(rts)]
            for k in range(12):  # 12 rounds x 5 ranges of 8 MB would overflow 64 MB if any stayed
                ys = []
                for i, ch in enumerate(chans):
                    y = await ch.empty((1 << 20,), np.float64)
                    y[:] = i + k
                    ys.append(y)
                if kind == "reduce":
                    await asyncio.gather(*(ch.reduce(y, timeout=20) for ch, y in zip(chans, ys)))
                    assert got[-1] == (float(sum(i + k for i in range(4))), 4)
                else:
                    outs = await asyncio.gather(*(ch.allreduce(y, timeout=20) for ch, y in zip(chans, ys)))
                    assert all(float(o[0]) == sum(i + k for i in range(4)) for o in outs)
                    del outs
                del ys, y
                gc.collect()
                if kind == "reduce":
                    await until(lambda: dm.arena.used == 0, what=f"the arena to drain after round {k}")
                else:  # the stream's repair history keeps the last results, within its share
                    await until(lambda: dm.arena.used <= dm.history_bytes(),
                                what=f"the arena back to the history's share after round {k}")
            assert dm.history_bytes() == (64 << 20) // 8
            assert dm.stats["bytes_to_members_inline"] == 0  # never full: no fallback to the socket
        finally:
            for rt in rts:
                await rt.aclose()
