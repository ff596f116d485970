"""Join storms: 100,000 joins on the sans-IO controller (CPU time and memory per member), and
10,000 joins over real TCP from several client processes' runtimes, none lost."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

import pytest

import zipcomm
from zipcomm.controller.state import ControllerState

N_SANS_IO = 100_000


def _storm(state: ControllerState, n: int) -> None:
    for m in range(1, n + 1):
        state.hello(m, f"10.0.{m >> 8 & 255}.{m & 255}:7000", f"h{m % 64}")
        own, _ = state.join(m, "storm", "broadcast", "both", 0)
        assert own is not None


def test_100k_joins_on_the_sans_io_controller_in_10_s_of_cpu() -> None:
    state = ControllerState()
    cpu = time.process_time()
    _storm(state, N_SANS_IO)
    cpu = time.process_time() - cpu
    print(f"{N_SANS_IO} joins of one channel: {cpu:.2f} s CPU ({N_SANS_IO / cpu:.0f} joins/s)")
    assert len(state.channels["storm"].tree) == N_SANS_IO   # none lost
    assert cpu <= 10.0


def test_controller_memory_per_member() -> None:
    n = 20_000
    state = ControllerState()
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    _storm(state, n)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_member = (after - before) / n
    print(f"controller state: {per_member:.0f} bytes per member ({n} members of one channel)")
    assert per_member <= 10 * 1024


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_10k_real_tcp_joins_none_lost() -> None:
    clients, per_client = 10, 1000
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        rts = [await zipcomm.connect(ctl.address, daemon="") for _ in range(clients)]
        try:
            began = time.monotonic()

            async def storm(i: int, rt) -> list:
                chans = []
                for start in range(0, per_client, 100):  # 100 joins in flight per client
                    chans += await asyncio.gather(*(rt.broadcast_channel(f"storm-{i}-{j}")
                                                    for j in range(start, start + 100)))
                return chans

            joined = await asyncio.gather(*(storm(i, rt) for i, rt in enumerate(rts)))
            secs = time.monotonic() - began
            total = sum(len(c) for c in joined)
            on_controller = sum(len(meta.tree) for name, meta in ctl.state.channels.items()
                                if name.startswith("storm-"))
            print(f"{total} TCP joins from {clients} clients in {secs:.2f} s ({total / secs:.0f} joins/s)")
            assert total == on_controller == clients * per_client  # none lost
            assert secs <= 30.0
        finally:
            for rt in rts:
                await rt.aclose()
