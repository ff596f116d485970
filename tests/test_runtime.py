"""In-process runtime behaviour: deadlines, typed errors, hostile connections."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import zipcomm
from zipcomm.buffers import BufferPool
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


# A member process that calls sys.exit mid-work: asyncio.run cancels every task (the
# runtime's session loop and peer readers too) and the application's clean-up then
# closes the runtime; the blocking facade closes it from its atexit hook.
_EXIT_ASYNC = """
import asyncio, sys, numpy as np, zipcomm

async def main():
    rt = await zipcomm.connect(sys.argv[1])
    bc = await rt.broadcast_channel("b")
    rc = await rt.reduce_channel("r", zipcomm.SUM)
    pending = asyncio.ensure_future(rc.allreduce(np.ones(3), timeout=60))  # a round under way

    async def exit_on_cue():
        await bc.receive(timeout=60)
        raise SystemExit(3)

    cue = asyncio.ensure_future(exit_on_cue())
    try:
        print("joined", flush=True)
        await asyncio.gather(pending, cue)
    finally:
        await rt.aclose()

asyncio.run(main())
"""

_EXIT_SYNC = """
import sys, threading, numpy as np, zipcomm, zipcomm.sync
zipcomm.sync.configure(sys.argv[1])
bc = zipcomm.BroadcastChannel("b")
rc = zipcomm.ReduceChannel("r", zipcomm.SUM)
threading.Thread(target=lambda: rc.allreduce(np.ones(3), timeout=60), daemon=True).start()
print("joined", flush=True)
bc.receive(timeout=60)
sys.exit(3)
"""


@pytest.mark.parametrize("api", ["asyncio", "blocking"])
async def test_a_member_calling_sys_exit_mid_round_exits_promptly(api: str) -> None:
    import sys
    import time

    code = _EXIT_ASYNC if api == "asyncio" else _EXIT_SYNC
    async with zipcomm.Controller("127.0.0.1:0", heartbeat=0.2, heartbeat_timeout=1.0) as ctl:
        async with zipcomm.connect(ctl.address) as a, zipcomm.connect(ctl.address) as b:
            ba = await a.broadcast_channel("b")
            ra = await a.reduce_channel("r", zipcomm.SUM)  # the root of both trees
            rb = await b.reduce_channel("r", zipcomm.SUM)
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, ctl.address,
                                                        stdout=asyncio.subprocess.PIPE)
            try:
                assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"joined"
                await ba.send(np.zeros(1))  # the cue: it calls sys.exit(3) with its round under way
                t0 = time.monotonic()
                assert await asyncio.wait_for(proc.wait(), 5.0) == 3
                assert time.monotonic() - t0 < 5.0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            # Its round completes with or without it (fully in or fully out); the next
            # ones without it.
            for expect in ({2, 3}, {2}):
                got = await asyncio.gather(ra.allreduce(np.ones(3), timeout=10, with_contributors=True),
                                           rb.allreduce(np.ones(3), timeout=10, with_contributors=True))
                (va, ca), (vb, cb) = got
                assert ca == cb and len(ca) in expect and va.tolist() == [float(len(ca))] * 3


@pytest.mark.parametrize("seed", range(3))
async def test_allreduce_across_a_controller_restart_drops_no_live_contributor(seed: int) -> None:
    """The controller is killed (-9) mid-allreduce and restarted without its state: the
    first member to re-announce the channel is the new root, alone at first. The
    rounds under way and the next ones still count every live member exactly once,
    and none hangs."""
    import random

    from zipcomm.testing.cluster import ControllerProcess
    from zipcomm.testing.wait import until

    rng = random.Random(seed)
    n, rounds = 5, 12
    ctl = ControllerProcess("--heartbeat", "0.2", "--heartbeat-timeout", "1.0", "--fanout", "2")
    runtimes: list = []
    try:
        address = await ctl.start()
        runtimes = [await zipcomm.connect(address) for _ in range(n)]
        channels = [await rt.reduce_channel("r", zipcomm.SUM) for rt in runtimes]
        ids = sorted(rt.member_id for rt in runtimes)
        done = [0] * n

        async def member(i: int) -> list:
            out = []
            for _ in range(rounds):
                vec = np.zeros(n, dtype=np.int64)
                vec[i] = 1
                value, contributors = await channels[i].allreduce(vec, timeout=20, with_contributors=True)
                out.append((value.tolist(), sorted(contributors)))
                done[i] += 1
            return out

        work = asyncio.ensure_future(asyncio.gather(*(member(i) for i in range(n))))
        try:
            await until(lambda: max(done) >= rng.randint(1, 4), "a few rounds", limit=20)
            await ctl.kill()
            await ctl.restart()
            results = await asyncio.wait_for(asyncio.shield(work), 40)
        finally:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        for i, out in enumerate(results):
            for k, (vector, contributors) in enumerate(out):
                assert contributors == ids, f"member {i} round {k}: counted {len(contributors)} of {n}"
                assert vector == [1] * n, f"member {i} round {k}: {vector}"
    finally:
        for rt in runtimes:
            await rt.aclose()
        await ctl.stop()


class _StubRuntime:
    """Just enough runtime for one channel core driven message by message."""

    def __init__(self, member: int) -> None:
        self.member_id = member
        self.address = f"127.0.0.1:{member}"
        self.heartbeat_timeout = 1.0
        self.sent: list = []
        self.tasks: set = set()
        self.buffers = BufferPool()

    def send_to(self, member: int, address: str, msg) -> None:
        self.sent.append((member, msg))

    def _spawn(self, coro, name: str):
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def drain_to(self, member: int) -> None:
        pass


async def test_a_childs_first_piece_that_overtakes_our_rewiring_still_counts() -> None:
    """Member A is X's child; X's parent (the root) dies and the controller makes A the
    root with X as its child. X learns first: its link and its first piece of the round
    reach A while A still takes X for its parent. The piece must count as X's first
    piece once A's re-wiring lands; taken as a stranger's, the round waited for X for
    ever (chaos scenario reduce_kill_root)."""
    from zipcomm.channels.reduce import ReduceChannel
    from zipcomm.protocol import messages as msg

    A, X, Y, DEAD = 0x41, 0x58, 0x59, 0x44
    wire = lambda member: [member, f"127.0.0.1:{member}", "h", "member"]  # noqa: E731
    rt = _StubRuntime(A)
    ch = ReduceChannel(rt, "r", reduce_f=zipcomm.SUM)
    ch.on_rewire(msg.Rewire(channel="r", epoch=6, parent=wire(X), children=[], depth=2, term=1))
    await ch.on_peer(X, msg.LinkAck(channel="r", epoch=6, last_key=[0, 0], next_round=0, list_round=-1))
    assert ch.joined.is_set()
    _, mine = ch.start_round(np.array([1, 0, 0]), allreduce=True)
    assert any(isinstance(x, msg.Piece) and to == X for to, x in rt.sent), "A's piece went up to X"
    # Epoch 7 reaches X first: X links to A and sends its own first piece of round 0.
    await ch.on_peer(X, msg.Link(channel="r", epoch=7, member=X, last_key=[0, 0], sent_up_to=-1))
    await ch.on_peer(X, msg.SyncDone(channel="r"))
    await ch.on_peer(X, msg.Piece(channel="r", round=0, contributors=[X], allreduce=True, fn="sum",
                                  data=np.array([0, 1, 0])))
    # Then A's own re-wiring: the root of a new term, children X and Y.
    ch.on_rewire(msg.Rewire(channel="r", epoch=7, parent=None, children=[wire(X), wire(Y)], depth=0, term=7,
                            removed=DEAD))
    assert any(isinstance(x, msg.LinkAck) and to == X for to, x in rt.sent)
    await ch.on_peer(X, msg.UpDone(channel="r"))
    await ch.on_peer(Y, msg.Link(channel="r", epoch=7, member=Y, last_key=[0, 0], sent_up_to=-1))
    await ch.on_peer(Y, msg.UpDone(channel="r"))
    await ch.on_peer(Y, msg.SyncDone(channel="r"))
    await ch.on_peer(Y, msg.Piece(channel="r", round=0, contributors=[Y], allreduce=True, fn="sum",
                                  data=np.array([0, 0, 1])))
    value, contributors = await asyncio.wait_for(mine, 5)
    assert sorted(contributors) == [A, X, Y] and value.tolist() == [1, 1, 1]
    await asyncio.gather(*rt.tasks)


async def test_a_broadcast_stream_goes_on_at_once_after_the_root_leaves() -> None:
    """The root leaves gracefully while another member streams broadcasts through it:
    what the leaving root was handed and dropped is re-sent to the new root as soon as
    its term shows up (in a re-wiring or in the stream), not after the re-submission
    deadline (10 s; chaos scenario bcast_leave_root stalled ~9.5 s)."""
    import time

    from zipcomm.channels.broadcast import RESUBMIT_AFTER

    async with zipcomm.Controller("127.0.0.1:0", fanout=2, heartbeat=0.2, heartbeat_timeout=1.0) as ctl:
        root_rt = await zipcomm.connect(ctl.address)
        async with zipcomm.connect(ctl.address) as s, zipcomm.connect(ctl.address) as r:
            root = await root_rt.broadcast_channel("b", queue_size=1024)  # first to join: the root
            sender = await s.broadcast_channel("b", queue_size=1024)
            receiver = await r.broadcast_channel("b", queue_size=1024)
            slowest = 0.0

            async def stream() -> None:
                nonlocal slowest
                for k in range(200):
                    t0 = time.monotonic()
                    await sender.send(k, timeout=30)
                    slowest = max(slowest, time.monotonic() - t0)

            sending = asyncio.ensure_future(stream())
            try:
                assert await root.receive(timeout=10) == 0  # the stream is under way through the root
                await root.aclose()  # leaves the channel mid-stream; its process (and links) stay
                await asyncio.wait_for(sending, 30)
            finally:
                sending.cancel()
                await root_rt.aclose()
            got = [await receiver.receive(timeout=10) for _ in range(200)]
            assert got == list(range(200))
            assert slowest < RESUBMIT_AFTER / 2, f"a send waited {slowest:.1f} s for the new root"


async def test_a_round_waits_for_the_members_of_a_host_daemon_that_died() -> None:
    """The root's child is a host daemon standing for two local members. The daemon dies
    mid-round and the controller removes it from the tree: its members are alive and
    re-join directly, re-sending their contributions. The round must wait for them (a
    bounded grace), not complete at once without them (chaos scenario daemon_kill_reduce)."""
    from zipcomm.channels.reduce import ReduceChannel
    from zipcomm.protocol import messages as msg

    ROOT, DAEMON, L1, L2 = 0x52, 0x44, 0x31, 0x32
    wire = lambda member: [member, f"127.0.0.1:{member}", "h", "member"]  # noqa: E731
    rt = _StubRuntime(ROOT)
    rt.heartbeat_timeout = 30.0  # the grace: longer than this test
    ch = ReduceChannel(rt, "r", reduce_f=zipcomm.SUM)
    ch.on_rewire(msg.Rewire(channel="r", epoch=1, parent=None, children=[], depth=0, term=1))
    ch.on_rewire(msg.Rewire(channel="r", epoch=2, parent=None, children=[wire(DAEMON)], depth=0, term=1))
    for m_ in (msg.Link(channel="r", epoch=2, member=DAEMON, last_key=[0, 0], sent_up_to=-1, fresh=True),
               msg.UpDone(channel="r"), msg.SyncDone(channel="r")):
        await ch.on_peer(DAEMON, m_)

    def piece(r: int, ids: list, late: bool = False):
        return msg.Piece(channel="r", round=r, contributors=ids, allreduce=True, fn="sum", late=late,
                         data=np.array([len(ids)]))

    _, first = ch.start_round(np.array([1]), allreduce=True)
    await ch.on_peer(DAEMON, piece(0, [L1, L2]))
    assert (await asyncio.wait_for(first, 5))[1] == [L1, L2, ROOT]
    _, second = ch.start_round(np.array([1]), allreduce=True)
    # The daemon dies before its piece of round 1 came: the controller removes it.
    ch.on_rewire(msg.Rewire(channel="r", epoch=3, parent=None, children=[], depth=0, term=1, removed=DAEMON))
    ch.on_controller(msg.Gone(channel="r", epoch=3, member=DAEMON))
    await asyncio.sleep(0)  # (one turn of the loop: nothing may complete the round now)
    assert not second.done(), "the round completed without the daemon's live members"
    # Its members re-join directly, each re-sending its contribution as a late piece.
    for epoch, local in ((4, L1), (5, L2)):
        joined = [wire(L1)] if local == L1 else [wire(L1), wire(L2)]
        ch.on_rewire(msg.Rewire(channel="r", epoch=epoch, parent=None, children=joined, depth=0, term=1))
        for m_ in (msg.Link(channel="r", epoch=4, member=local, last_key=[1, 1], sent_up_to=1),
                   piece(1, [local], late=True), msg.SyncDone(channel="r")):
            await ch.on_peer(local, m_)
        await ch.on_peer(local, msg.UpDone(channel="r"))
    value, contributors = await asyncio.wait_for(second, 5)
    assert sorted(contributors) == [L1, L2, ROOT] and value.tolist() == [3]
    await asyncio.gather(*rt.tasks)
    ch._end_holds()
