"""Join storms: 100,000 joins on the sans-IO controller (CPU time, memory and garbage-collector
load per member), 10,000 joins over real TCP from several runtimes, and 20,000 pipelined joins
over real TCP from raw sessions, none lost. bench/controller.py measures the throughput."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

import pytest

import zipcomm
from zipcomm.controller.state import ControllerState
from zipcomm.protocol import messages as m
from zipcomm.transport.connection import open_connection

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


def _tracked_per_join(state: ControllerState, n: int, join) -> float:
    gc.collect()
    before = len(gc.get_objects())
    for i in range(n):
        join(i)
    gc.collect()  # tuples of atoms leave the collector's lists here
    return (len(gc.get_objects()) - before) / n


def test_garbage_collector_load_per_channel_and_per_member() -> None:
    """Every container the state keeps per member is walked again by each full collection (they
    come at every 25 % of heap growth): that was most of a join's CPU time at 160K channels."""
    state = ControllerState()
    state.hello(1, "10.0.0.1:7000", "h")
    per_channel = _tracked_per_join(state, 10_000, lambda i: state.join(1, f"c-{i}", "broadcast", "both", 0))
    assert per_channel <= 2.05, per_channel  # the channel record and its tree, no more

    state = ControllerState()
    for member in range(1, 10_001):
        state.hello(member, "10.0.0.1:7000", "h")
    per_member = _tracked_per_join(state, 10_000, lambda i: state.join(i + 1, "one", "broadcast", "both", 0))
    assert per_member <= 1.05, per_member  # its children list


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_20k_pipelined_tcp_joins_none_lost() -> None:
    """Sessions send all their joins without waiting; each reply arrives, in order, once."""
    sessions, per_session = 4, 5000
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        conns = []
        for i in range(sessions):
            conn = await open_connection(ctl.address)
            conn.send(*m.Hello(member=i + 1, address="127.0.0.1:9", host="h").to_frame())
            assert isinstance(m.decode(await conn.recv()), m.Welcome)
            conns.append(conn)
        began = time.monotonic()

        async def storm(i: int, conn) -> int:
            for k in range(per_session):
                conn.send(*m.Join(req=k + 1, channel=f"p-{i}-{k}", kind="broadcast", role="both",
                                  epoch_hint=0).to_frame())
            for k in range(per_session):
                reply = m.decode(await conn.recv())
                assert isinstance(reply, m.Reply) and reply.req == k + 1 and reply.ok, reply
            return per_session

        total = sum(await asyncio.gather(*(storm(i, c) for i, c in enumerate(conns))))
        secs = time.monotonic() - began
        on_controller = sum(len(meta.tree) for name, meta in ctl.state.channels.items() if name.startswith("p-"))
        print(f"{total} pipelined TCP joins from {sessions} sessions in {secs:.2f} s ({total / secs:.0f} joins/s)")
        assert total == on_controller == sessions * per_session
        for conn in conns:
            await conn.aclose()


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
