"""The controller answers pipelined requests in order, a bad frame in a batch costs only its own
session, a session may host several members (Join.member, pushes with ``to``), and
bench/controller.py runs end to end.

These clients speak the controller protocol byte by byte (the project's sans-IO handshake and
frame codec over an asyncio stream), so a test can put many requests, or a broken frame, in one
write."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

import zipcomm
from zipcomm.errors import MembershipError
from zipcomm.protocol import messages as m
from zipcomm.protocol.frames import FrameDecoder, encode_frame
from zipcomm.protocol.handshake import Handshake
from zipcomm.testing.wait import until

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


def frame_bytes(msg: m.Message) -> bytes:
    return b"".join(encode_frame(*msg.to_frame()))


def joins(names: list[str], first_req: int = 1, members: list[int] | None = None) -> bytes:
    return b"".join(
        frame_bytes(m.Join(req=first_req + i, channel=name, kind="broadcast", role="both", epoch_hint=0,
                           member=None if members is None else members[i]))
        for i, name in enumerate(names))


class RawSession:
    """A controller session over an asyncio stream; ``write`` sends raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, member: int) -> None:
        self.reader, self.writer, self.member = reader, writer, member
        self.decoder = FrameDecoder()
        self.frames: collections.deque = collections.deque()

    @classmethod
    async def open(cls, address: str, member: int, peer_address: str = "127.0.0.1:9") -> RawSession:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        hs = Handshake(is_client=True, secret=None)
        writer.write(hs.initial_bytes())
        while not hs.done:
            data = await reader.read(4096)
            assert data, "the controller closed the connection during the handshake"
            reply = hs.receive(data)
            if reply:
                writer.write(reply)
        session = cls(reader, writer, member)
        session.frames.extend(session.decoder.feed(hs.leftover) if hs.leftover else [])
        session.write(frame_bytes(m.Hello(member=member, address=peer_address, host="test-host")))
        assert isinstance(await session.next_message(), m.Welcome)
        return session

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def next_message(self, timeout: float = 20.0) -> m.Message:
        """The next frame from the controller; EOFError once it closed the connection."""
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not data:
                raise EOFError
            self.frames.extend(self.decoder.feed(data))
        return m.decode(self.frames.popleft())

    async def replies(self, n: int, pushes: list | None = None) -> list[m.Reply]:
        out = []
        while len(out) < n:
            msg = await self.next_message()
            if isinstance(msg, m.Reply):
                out.append(msg)
            elif pushes is not None:
                pushes.append(msg)
        return out

    async def request(self, msg: m.Message) -> m.Reply:
        self.write(frame_bytes(msg))
        return (await self.replies(1))[0]

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


@pytest.mark.asyncio
async def test_pipelined_joins_are_all_answered_in_order() -> None:
    n = 2000
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        a = await RawSession.open(ctl.address, 1)
        b = await RawSession.open(ctl.address, 2)
        # Every join of each session in one write: nobody waits for a reply before the next.
        a.write(joins([f"a-{i}" for i in range(n)]))
        b.write(joins([f"b-{i}" for i in range(n)]))
        got_a, got_b = await asyncio.gather(a.replies(n), b.replies(n))
        for got in (got_a, got_b):
            assert [r.req for r in got] == list(range(1, n + 1))
            assert all(r.ok and r.result["parent"] is None and r.result["depth"] == 0 for r in got)
        assert sum(name.startswith(("a-", "b-")) for name in ctl.state.channels) == 2 * n
        reply = await a.request(m.LookupRoot(req=n + 1, channel="b-7"))
        assert reply.ok and reply.result["members"] == 1 and reply.result["root"][0] == 2
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("bad", ["garbage", "not-a-controller-op"])
@pytest.mark.asyncio
async def test_a_bad_frame_in_a_pipelined_batch_closes_only_its_connection(bad: str) -> None:
    before, after = 100, 100
    poison = b"XXXX" + bytes(60) if bad == "garbage" else frame_bytes(m.UpDone(channel="x"))
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        a = await RawSession.open(ctl.address, 1)
        b = await RawSession.open(ctl.address, 2)
        a.write(joins([f"a-{i}" for i in range(before)]) + poison
                + joins([f"a-late-{i}" for i in range(after)], first_req=before + 1))
        b.write(joins([f"b-{i}" for i in range(500)]))
        answered = []
        with pytest.raises(EOFError):
            while True:
                msg = await a.next_message()
                assert isinstance(msg, m.Reply)
                answered.append(msg.req)
        # Whatever was answered before the bad frame is an in-order prefix; nothing after it is.
        assert answered == list(range(1, len(answered) + 1)) and len(answered) <= before
        await a.aclose()
        assert [r.req for r in await b.replies(500)] == list(range(1, 501))
        # The broken session is gone with its channels; the other one goes on.
        assert not any(name.startswith("a-") for name in ctl.state.channels)
        assert sum(name.startswith("b-") for name in ctl.state.channels) == 500
        reply = await b.request(m.Join(req=501, channel="b-after", kind="broadcast", role="both", epoch_hint=0))
        assert reply.ok
        await b.aclose()


@pytest.mark.asyncio
async def test_a_session_hosts_members_of_one_channel_and_gets_their_pushes() -> None:
    per_session = 300
    async with zipcomm.Controller("127.0.0.1:0", fanout=4) as ctl:
        a = await RawSession.open(ctl.address, 1 << 40)
        b = await RawSession.open(ctl.address, 2 << 40)
        hosted = {a: [(1 << 40) + 1 + i for i in range(per_session)],
                  b: [(2 << 40) + 1 + i for i in range(per_session)]}
        pushes: dict[RawSession, list] = {a: [], b: []}
        for s in (a, b):
            s.write(joins(["storm"] * per_session, members=hosted[s]))
        replies = {s: await s.replies(per_session, pushes[s]) for s in (a, b)}
        for s in (a, b):
            assert all(r.ok for r in replies[s]), [r.error for r in replies[s] if not r.ok][:3]
        assert sum(r.result["parent"] is None for s in (a, b) for r in replies[s]) == 1
        tree = ctl.state.channels["storm"].tree
        tree.check_invariants()
        assert len(tree) == 2 * per_session and set(tree) == set(hosted[a]) | set(hosted[b])
        # Each join but the first re-wires its new parent: one push to the session hosting the
        # parent, naming it in ``to``.
        expected = 2 * per_session - 1
        while len(pushes[a]) + len(pushes[b]) < expected:
            waiting = [asyncio.ensure_future(s.next_message()) for s in (a, b)]
            done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:  # no frame is lost: the read it was waiting in is cancelled whole
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for s, task in zip((a, b), waiting):
                if task in done:
                    pushes[s].append(task.result())
        for s in (a, b):
            assert all(isinstance(p, m.Rewire) and p.channel == "storm" and p.to in hosted[s] for p in pushes[s])
        # The controller's view of a hosted member: the session's address, the member's own id.
        reply = await a.request(m.LookupRoot(req=10_000, channel="storm"))
        assert reply.result["members"] == 2 * per_session
        assert reply.result["root"][1] == "127.0.0.1:9"

        # Another session's member cannot be used; a hosted member leaves and its id is freed.
        reply = await a.request(m.Join(req=10_001, channel="other", kind="broadcast", role="both",
                                       epoch_hint=0, member=hosted[b][0]))
        assert not reply.ok and "another session" in reply.error
        leaver = hosted[a][-1]
        reply = await a.request(m.Leave(req=10_002, channel="storm", member=leaver))
        assert reply.ok and leaver not in tree and leaver not in ctl._owner
        reply = await a.request(m.Leave(req=10_003, channel="storm", member=leaver))
        assert not reply.ok

        # The session's end takes every member it hosted out of the tree.
        await a.aclose()
        await until(lambda: len(tree) == per_session, "the hosted members to leave the tree", limit=10.0,
                    step=0.05)
        assert set(tree) == set(hosted[b])
        tree.check_invariants()
        await b.aclose()


@pytest.mark.asyncio
async def test_a_session_may_host_a_bounded_number_of_members() -> None:
    async with zipcomm.Controller("127.0.0.1:0", max_hosted_members=3) as ctl:
        a = await RawSession.open(ctl.address, 1)
        a.write(joins(["c"] * 4, members=[11, 12, 13, 14]))
        got = await a.replies(4)
        assert [r.ok for r in got] == [True, True, True, False]
        assert "at most 3" in got[3].error and 14 not in ctl._owner
        # The session's own member needs no slot.
        assert (await a.request(m.Join(req=5, channel="c", kind="broadcast", role="both", epoch_hint=0))).ok
        await a.aclose()


@pytest.mark.asyncio
async def test_a_reply_too_large_to_send_is_refused_and_the_session_goes_on() -> None:
    long_address = "127.0.0.1:9#" + "x" * 20_000  # every member on the wire repeats it
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        a = await RawSession.open(ctl.address, 1, peer_address=long_address)
        a.write(joins(["big"] * 60, members=list(range(100, 160))))
        assert all(r.ok for r in await a.replies(60, []))
        reply = await a.request(m.ListMembers(req=61, channel="big"))
        assert not reply.ok and "not sendable" in reply.error
        reply = await a.request(m.LookupRoot(req=62, channel="big"))
        assert reply.ok and reply.result["members"] == 60
        await a.aclose()


@pytest.mark.asyncio
async def test_runtime_joins_still_work_next_to_a_hosting_session() -> None:
    """An ordinary runtime (which never sets Join.member) shares a channel with hosted members."""
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        a = await RawSession.open(ctl.address, 1)
        a.write(joins(["mixed"] * 5, members=[11, 12, 13, 14, 15]))
        assert all(r.ok for r in await a.replies(5, []))
        async with zipcomm.connect(ctl.address, daemon="") as rt:
            ch = await rt.broadcast_channel("mixed")
            assert rt.member_id in ctl.state.channels["mixed"].tree
            await ch.aclose()
        with pytest.raises(MembershipError):
            ctl.state.leave(rt.member_id, "mixed")  # it left on close
        await a.aclose()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_controller_runs(tmp_path: Path) -> None:
    """bench/controller.py runs end to end (a test checks that the benchmark runs, not how fast)."""
    out = tmp_path / "controller.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "controller.py"), "--clients", "2", "--joins", "600",
         "--reps", "1", "--rate-window", "100", "--edge-windows", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())
    for scenario in ("channels", "one"):
        run = data["runs"][scenario][0]
        assert run["joins"] == run["members_on_controller"] == 1200, run
        assert run["joins_per_s"] > 0 and run["bytes_per_member"] > 0, run
    assert data["summary"]["one"]["rate_near_start"] > 0
    assert "joins/s total" in proc.stdout
