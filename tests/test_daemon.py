"""The host daemon: zero-copy local delivery, fallback when it dies, segment hygiene,
access control. Real daemon and member processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import zipcomm
from zipcomm.daemon import Daemon
from zipcomm.shm import segment_exists
from zipcomm.testing.cluster import DEADLINE, Cluster, DaemonProcess
from zipcomm.testing.wait import until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(240)]

MB = 1_000_000


async def test_100mb_broadcast_to_8_local_members_is_zero_copy() -> None:
    async with Cluster(9, daemons=1, ) as c:
        await c.join_all("broadcast", "b")
        sender, receivers = c.members[0], c.members[1:]
        checks = [mm.start_call("receive_check", name="b", timeout=120) for mm in receivers]
        await sender.call("send", name="b", values=[42], size=100 * MB // 8, timeout=120)
        for mm, call in zip(receivers, checks):
            reply = await asyncio.wait_for(call, 120)
            assert reply["ok"], reply
            got = reply["result"]
            assert got["first"] == 42 and got["all_same"] and got["nbytes"] == 100 * MB
            assert got["readonly"], f"member {mm.index} got a writable array"
            assert got["in_arena"], f"member {mm.index}: the array's bytes are not in the daemon's segment"
        assert len({(await mm.call("where", name="b"))["daemon"] for mm in c.members}) == 1


async def test_allreduce_and_handler_reduce_through_one_daemon() -> None:
    got: list = []
    async with zipcomm.Controller("127.0.0.1:0") as ctl, Daemon(ctl.address, _sock(), shm_size=64 << 20) as dm:
        rts = [await zipcomm.connect(ctl.address, daemon=dm.socket_path) for _ in range(4)]
        try:
            chans = [await rt.reduce_channel("r", zipcomm.SUM, handler=(lambda v, n: got.append((v.copy(), n)))
                                             if i == 0 else None) for i, rt in enumerate(rts)]
            assert all(type(ch).__name__ == "LocalReduce" for ch in chans)
            for k in range(3):
                values = [np.full(50_000, i + k, dtype=np.float64) for i in range(4)]
                out = await asyncio.gather(*(ch.allreduce(v, timeout=20, with_contributors=True)
                                             for ch, v in zip(chans, values)))
                for value, contributors in out:
                    assert np.array_equal(value, sum(values)) and sorted(contributors) == sorted(
                        rt.member_id for rt in rts)
                    assert not value.flags.writeable
            # thesis figure 4.2b: members contribute, one member's handler gets the sum
            await asyncio.gather(chans[0].reduce(timeout=20), *(ch.reduce(np.ones(10), timeout=20) for ch in chans[1:]))
            assert len(got) == 1 and np.array_equal(got[0][0], np.full(10, 3.0)) and got[0][1] == 3
            assert dm.stats["bytes_to_members_shm"] > 0
        finally:
            for rt in rts:
                await rt.aclose()
        # every range handed out came back once the members were gone
        assert dm.arena is not None
        await _until(lambda: dm.arena.used == 0)


async def test_arrays_from_empty_move_without_any_copy_and_the_arena_drains() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl, Daemon(ctl.address, _sock(), shm_size=64 << 20) as dm:
        rts = [await zipcomm.connect(ctl.address, daemon=dm.socket_path) for _ in range(4)]
        try:
            bcs = [await rt.broadcast_channel("b") for rt in rts]
            x = await bcs[0].empty(1 << 20, np.int64)
            x[:] = np.arange(1 << 20)
            await bcs[0].send(x)
            assert not x.flags.writeable, "a sent array is shared: it must turn read-only"
            for bc in bcs[1:]:
                got = await bc.receive(timeout=10)
                assert np.array_equal(got, np.arange(1 << 20))
                # the very bytes the sender wrote: same offset in the segment
                assert (got.__array_interface__["data"][0] - bc.client.attachment.address
                        == x.__array_interface__["data"][0] - bcs[0].client.attachment.address)
            rcs = [await rt.reduce_channel("r", zipcomm.SUM) for rt in rts]
            for k in range(3):
                vals = []
                for i, rc in enumerate(rcs):
                    v = await rc.empty((256, 512), np.float64)
                    v[:] = i + k
                    vals.append(v)
                out = await asyncio.gather(*(rc.allreduce(v, timeout=10) for rc, v in zip(rcs, vals)))
                assert all(np.all(r == 6 + 4 * k) and r.shape == (256, 512) for r in out)
                assert all(np.all(v == i + k) for i, v in enumerate(vals)), "inputs are never overwritten"
            assert dm.stats["copies_into_arena"] == 0, dm.stats
            del x, got, vals, out, v
        finally:
            for rt in rts:
                await rt.aclose()
        await _until(lambda: dm.arena.used == 0)


async def test_sigkill_of_a_daemon_mid_run_members_fall_back_exactly() -> None:
    async with Cluster(6, daemons=2) as c:
        await c.join_all("broadcast", "b")  # member 0 first: daemon 0 is the root of both trees
        places = await c.join_all("reduce", "r")
        ids = [p["member"] for p in places]
        sender = c.members[1]  # behind daemon 1, which survives
        receivers = [mm for mm in c.members if mm is not sender]
        sending = sender.start_call("send", name="b", values=list(range(1, 201)), size=20_000, timeout=90)
        heads = [mm.start_call("receive", name="b", count=20, timeout=60) for mm in receivers]
        reducing = [mm.start_call("allreduce", name="r", index=i, width=6, rounds=4, timeout=60)
                    for i, mm in enumerate(c.members)]
        await asyncio.wait_for(heads[0], 60)
        c.daemons[0].kill(signal.SIGKILL)
        assert (await asyncio.wait_for(sending, 90))["ok"]
        tails = await asyncio.gather(*(_after(h, mm, "receive", name="b", count=180, timeout=90)
                                       for mm, h in zip(receivers, heads)))
        for mm, head, tail in zip(receivers, heads, tails):
            assert await _result(head) + tail == list(range(1, 201)), f"member {mm.index}"
        more = await asyncio.gather(*(_after(reducing[i], mm, "allreduce", name="r", index=i, width=6, rounds=3,
                                             timeout=90) for i, mm in enumerate(c.members)))
        per_member = [await _result(reducing[i]) + extra for i, extra in enumerate(more)]
        for k, rounds in enumerate(zip(*per_member)):
            assert all(r == rounds[0] for r in rounds), f"round {k}: members disagree"
            vector, contributors = rounds[0]["vector"], rounds[0]["contributors"]
            assert set(vector) <= {0, 1}, f"round {k}: double count {vector}"
            assert {ids[i] for i, v in enumerate(vector) if v} == set(contributors), f"round {k}"
        assert set(per_member[0][-1]["contributors"]) == set(ids), "after the fallback everyone counts"
        fallen = [await mm.call("where", name="b") for mm in c.members[::2]]  # daemon 0's members
        assert all(p["fallen_back"] for p in fallen)


async def test_segments_of_a_killed_daemon_are_swept_by_the_next_one(tmp_path) -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        first = DaemonProcess(0, str(tmp_path), shm_size="8M")
        await first.start(ctl.address)
        names = _ledger_names(first.socket + ".segments")
        assert len(names) == 1 and segment_exists(names[0])
        first.kill(signal.SIGKILL)
        await first.proc.wait()
        assert segment_exists(names[0]), "SIGKILL cannot unlink: the segment is left behind"
        second = DaemonProcess(0, str(tmp_path), shm_size="8M")
        await second.start(ctl.address)
        try:
            assert not segment_exists(names[0]), "the next daemon must sweep its predecessor's segment"
            now = _ledger_names(second.socket + ".segments")
            assert len(now) == 1 and now != names and segment_exists(now[0])
        finally:
            await second.stop()
        assert not segment_exists(now[0]), "a daemon that stops removes its segment"


async def test_member_without_the_secret_gets_no_session_and_socket_is_private(tmp_path, monkeypatch) -> None:
    secret = os.urandom(32)
    async with zipcomm.Controller("127.0.0.1:0", secret=secret) as ctl, \
            Daemon(ctl.address, str(tmp_path / "d.sock"), shm_size=8 << 20, secret=secret) as dm:
        assert os.stat(dm.socket_path).st_mode & 0o777 == 0o600
        ok = await zipcomm.connect(ctl.address, secret=secret, daemon=dm.socket_path)
        try:
            assert ok.daemon is not None and ok.daemon.attachment.name == dm.arena.name
        finally:
            await ok.aclose()
        from zipcomm.daemon.client import DaemonClient
        from zipcomm.runtime import Runtime

        intruder = Runtime(ctl.address, secret=os.urandom(32))
        with pytest.raises((zipcomm.AuthenticationError, zipcomm.ConnectionClosed)):
            await DaemonClient.open(intruder, dm.socket_path)
        assert all(s.member != intruder.member_id for s in dm.sessions)


async def test_full_dev_shm_daemon_runs_without_arena_and_members_go_direct(tmp_path) -> None:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        sock = str(tmp_path / "d.sock")
        script = (f"mount -t tmpfs -o size=1M tmpfs /dev/shm && exec {sys.executable} -m zipcomm.daemon "
                  f"--controller {ctl.address} --socket {sock} --shm-size 64M --ready-file {sock}.ready")
        proc = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await _until(lambda: os.path.exists(sock + ".ready") or proc.returncode is not None)
            assert proc.returncode is None, (await proc.stderr.read()).decode()
            a = await zipcomm.connect(ctl.address, daemon=sock)
            b = await zipcomm.connect(ctl.address, daemon=sock)
            try:
                assert a.daemon is None and b.daemon is None, "no arena there: members must go direct"
                ba, bb = await a.broadcast_channel("b"), await b.broadcast_channel("b")
                await ba.send(np.arange(1 << 20))
                assert np.array_equal(await bb.receive(timeout=10), np.arange(1 << 20))
            finally:
                await a.aclose()
                await b.aclose()
        finally:
            proc.terminate()
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"no arena" in out, out


# -- helpers ---------------------------------------------------------------------------------

def _ledger_names(path: str) -> list[str]:
    with open(path) as f:
        return json.load(f)["segments"]


def _sock() -> str:
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="zipcomm-test-"), "d.sock")


async def _until(predicate, timeout: float = DEADLINE) -> None:
    """Poll a predicate under a deadline (never a bare sleep): the shared helper."""
    await until(predicate, what="the condition", limit=timeout, step=0.01)


async def _result(call: asyncio.Future):
    reply = await call
    assert reply["ok"], f"{reply['error']}: {reply['message']}"
    return reply["result"]


async def _after(first: asyncio.Future, member, cmd: str, **args):
    await asyncio.wait_for(asyncio.shield(first), 90)
    return await member.call(cmd, **args)


async def test_a_member_sending_a_bad_range_loses_its_session_only() -> None:
    from zipcomm.daemon import protocol as d
    from zipcomm.daemon.client import DaemonClient
    from zipcomm.runtime import Runtime

    async with zipcomm.Controller("127.0.0.1:0") as ctl, Daemon(ctl.address, _sock(), shm_size=8 << 20) as dm:
        good = [await zipcomm.connect(ctl.address, daemon=dm.socket_path) for _ in range(2)]
        bad_rt = Runtime(ctl.address)
        bad = await DaemonClient.open(bad_rt, dm.socket_path)
        try:
            chans = [await rt.broadcast_channel("b") for rt in good]
            await bad.request(d.DJoin, channel="b", kind="broadcast")
            # a range it was never given: refused, and only its session is closed
            bad.send(d.DSend(channel="b", msg_id=1, shm=[0, 1 << 20, "<i8", [1 << 17]]))
            await asyncio.wait_for(bad.task, 10)
            assert bad.lost
            assert all(s.member != bad_rt.member_id for s in dm.sessions)
            await chans[0].send(np.arange(1 << 17))
            assert np.array_equal(await chans[1].receive(timeout=10), np.arange(1 << 17))
        finally:
            await bad.aclose()
            for rt in good:
                await rt.aclose()
