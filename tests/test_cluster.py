"""Multi-process behaviour: real processes, a real controller, real sockets."""

from __future__ import annotations

import asyncio
import signal

import pytest

from zipcomm.testing.cluster import Cluster
from zipcomm.testing.wait import until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(180)]

# Every test of the channel semantics runs twice: members linked directly, and members
# behind 3 host daemons (loopback, one host id each) that form the channel trees.
with_daemons = pytest.mark.parametrize("daemons", [0, 3], ids=["direct", "daemons"])


@with_daemons
async def test_broadcast_order_late_joiner_and_early_sends(daemons: int) -> None:
    async with Cluster(8, daemons=daemons) as c:
        first, late = c.members[:7], c.members[7]
        for mm in first:
            await mm.call("join", kind="broadcast", name="b")
        sender = first[3]
        await sender.call("send", name="b", values=list(range(1, 11)))
        await late.call("join", kind="broadcast", name="b")
        await sender.call("send", name="b", values=list(range(11, 31)))
        # Nobody called receive() before the sends: nothing may be lost.
        got = await asyncio.gather(*(mm.call("receive", name="b", count=30) for mm in first if mm is not sender))
        for seq in got:
            assert seq == list(range(1, 31))
        assert await late.call("receive", name="b", count=20) == list(range(11, 31))
        # A different sender: all members see its items too, in one order.
        await first[0].call("send", name="b", values=[100, 101])
        for mm in c.members[1:]:
            if mm is not first[0]:
                assert await mm.call("receive", name="b", count=2) == [100, 101]


@with_daemons
async def test_allreduce_exact_with_8_processes(daemons: int) -> None:
    async with Cluster(8, daemons=daemons) as c:
        places = await c.join_all("reduce", "r")
        ids = [p["member"] for p in places]
        results = await asyncio.gather(
            *(mm.call("allreduce", name="r", index=i, width=8, rounds=3) for i, mm in enumerate(c.members))
        )
        for per_member in results:
            for rnd in per_member:
                assert rnd["vector"] == [1] * 8
                assert sorted(rnd["contributors"]) == sorted(ids)


@with_daemons
async def test_shuffle_with_8_processes(daemons: int) -> None:
    async with Cluster(8, daemons=daemons) as c:
        places = await c.join_all("shuffle", "s")
        order = sorted(p["member"] for p in places)
        results = await asyncio.gather(
            *(mm.call("shuffle", name="s", start=i * 1000, count=500) for i, mm in enumerate(c.members))
        )
        everything = sorted(x for i in range(8) for x in range(i * 1000, i * 1000 + 500))
        received = sorted(x for res in results for x in res[0])
        assert received == everything
        for place, res in zip(places, results):
            position = order.index(place["member"])
            assert all(x % 8 == position for x in res[0])


async def _result(call: asyncio.Future):
    """The result of a command started with start_call, or a failure that says why."""
    reply = await call
    assert reply["ok"], f"{reply['error']}: {reply['message']}"
    return reply["result"]


async def _after(first: asyncio.Future, member, cmd: str, **args):
    """A member's next command only once its previous one is answered: two calls
    running at once in one member would share its queue and its rounds."""
    await asyncio.wait_for(asyncio.shield(first), 60)
    return await member.call(cmd, **args)


def _interior(places: list[dict]) -> int:
    """A member with children (an interior tree node); behind daemons, where the
    daemons form the tree, a member in the middle of the list."""
    if places[0]["daemon"] is not None:
        return len(places) // 2
    return next(i for i, p in enumerate(places) if p["children"] and not p["root"])


@with_daemons
async def test_sigkill_interior_mid_broadcast(daemons: int) -> None:
    async with Cluster(9, daemons=daemons) as c:
        await c.join_all("broadcast", "b")
        places = await c.places("b")
        victim = _interior(places)
        sender = next(i for i, p in enumerate(places) if i != victim and p["root"] is False)
        survivors = [mm for i, mm in enumerate(c.members) if i not in (victim, sender)]
        sending = c.members[sender].start_call("send", name="b", values=list(range(1, 201)), size=2000)
        firsts = [mm.start_call("receive", name="b", count=20) for mm in survivors]
        await asyncio.wait_for(firsts[0], 30)
        c.members[victim].kill(signal.SIGKILL)
        assert (await asyncio.wait_for(sending, 60))["ok"]
        rest = await asyncio.gather(*(_after(head, mm, "receive", name="b", count=180, timeout=60)
                                      for mm, head in zip(survivors, firsts)))
        for mm, head, tail in zip(survivors, firsts, rest):
            seq = await _result(head) + tail
            assert seq == list(range(1, 201)), f"member {mm.index} (victim {victim}): got {seq}"



@with_daemons
async def test_sigkill_interior_mid_reduce_is_exact(daemons: int) -> None:
    async with Cluster(9, daemons=daemons) as c:
        await c.join_all("reduce", "r")
        places = await c.places("r")
        ids = [p["member"] for p in places]
        victim = _interior(places)
        survivors = [i for i in range(9) if i != victim]
        firsts = [c.members[i].start_call("allreduce", name="r", index=i, width=9, rounds=5) for i in range(9)]
        await asyncio.wait_for(firsts[survivors[0]], 30)
        c.members[victim].kill(signal.SIGKILL)
        rest = await asyncio.gather(
            *(_after(firsts[i], c.members[i], "allreduce", name="r", index=i, width=9, rounds=10, timeout=60)
              for i in survivors)
        )
        per_member = [await _result(firsts[i]) + more for i, more in zip(survivors, rest)]
        for rounds in zip(*per_member):
            assert all(r == rounds[0] for r in rounds), "members disagree on a round's result"
            vector, contributors = rounds[0]["vector"], rounds[0]["contributors"]
            counted = {ids[i] for i, v in enumerate(vector) if v == 1}
            assert set(vector) <= {0, 1}, f"double count: {vector}"
            assert counted == set(contributors), "result does not match the contributors it reports"
            assert {ids[i] for i in survivors} <= counted, "a live contributor was dropped"


@with_daemons
async def test_sigkill_interior_mid_shuffle(daemons: int) -> None:
    async with Cluster(9, daemons=daemons) as c:
        await c.join_all("shuffle", "s")
        places = await c.places("s")
        victim = _interior(places)
        survivors = [i for i in range(9) if i != victim]
        firsts = [c.members[i].start_call("shuffle", name="s", start=i * 1000, count=300) for i in range(9)]
        await asyncio.wait_for(firsts[survivors[0]], 30)
        c.members[victim].kill(signal.SIGKILL)
        rest = await asyncio.gather(
            *(_after(firsts[i], c.members[i], "shuffle", name="s", start=i * 1000, count=300, rounds=3,
                     timeout=60)
              for i in survivors)
        )
        # Round 0 was under way at the kill: each survivor gets exactly the items of its
        # residue from every surviving sender, and the victim's part whole or not at all.
        order = sorted(p["member"] for p in places)
        for i in survivors:
            got = set((await _result(firsts[i]))[0])
            position = order.index(places[i]["member"])
            from_survivors = {x for j in survivors for x in range(j * 1000, j * 1000 + 300) if x % 9 == position}
            from_victim = {x for x in range(victim * 1000, victim * 1000 + 300) if x % 9 == position}
            assert got - from_victim == from_survivors
            assert got & from_victim in (set(), from_victim), "the dead sender's part arrived in pieces"
        for r in range(3):
            got = [res[r] for res in rest]
            flat = [x for g in got for x in g]
            assert len(flat) == len(set(flat)), "an item was delivered twice"
            base = r * 1_000_000  # the member numbers rounds per call
            expected = {base + i * 1000 + k for i in survivors for k in range(300)}
            assert set(flat) <= expected, "foreign items received"
            missing = expected - set(flat)
            # A list fetched before the controller saw the death still names the victim:
            # then exactly its residue class (mod 9) is lost with it, and nothing else.
            if missing:
                residues = {x % 9 for x in missing}
                assert len(residues) == 1, f"items lost from several receivers: {sorted(residues)}"
                assert missing == {x for x in expected if x % 9 in residues}


@with_daemons
async def test_controller_kill9_and_restart(daemons: int) -> None:
    async with Cluster(6, daemons=daemons) as c:
        for kind, name in (("broadcast", "b"), ("reduce", "r"), ("shuffle", "s")):
            await c.join_all(kind, name)
        before = await c.places("b")
        before_s = max(p["epoch"] for p in await c.places("s"))
        await c.controller.kill()
        await c.controller.restart()
        await c.members[2].call("send", name="b", values=[7, 8, 9], timeout=60)
        for i, mm in enumerate(c.members):
            if i != 2:
                assert await mm.call("receive", name="b", count=3, timeout=60) == [7, 8, 9]
        if not daemons:  # (behind daemons, the epochs are the daemons' own)
            after = await c.places("b")
            assert min(p["epoch"] for p in after) > max(p["epoch"] for p in before), "no new epoch"
        results = await asyncio.gather(
            *(mm.call("allreduce", name="r", index=i, width=6, timeout=60) for i, mm in enumerate(c.members))
        )
        assert all(res[0]["vector"] == [1] * 6 for res in results)
        # A shuffle round's members are the controller's list when the round starts: wait
        # until every member has re-announced the shuffle channel (behind daemons nothing
        # above needed the members' own sessions back, so some may still be reconnecting).
        async def reannounced() -> bool:
            return min(p["epoch"] for p in await c.places("s")) > before_s

        await until(reannounced, "members to re-announce the shuffle channel", limit=60, step=0.05)
        shuffled = await asyncio.gather(
            *(mm.call("shuffle", name="s", start=i * 100, count=50, timeout=60) for i, mm in enumerate(c.members))
        )
        assert sorted(x for res in shuffled for x in res[0]) == sorted(
            x for i in range(6) for x in range(i * 100, i * 100 + 50)
        )


async def test_sigkill_root_mid_broadcast_and_mid_reduce() -> None:
    async with Cluster(7) as c:
        await c.join_all("broadcast", "b")
        await c.join_all("reduce", "r")
        places = await c.places("b")
        root = next(i for i, p in enumerate(places) if p["root"])
        sender = next(i for i in range(7) if i != root)
        survivors = [i for i in range(7) if i != root]
        receivers = [i for i in survivors if i != sender]
        ids = [p["member"] for p in await c.places("r")]
        sending = c.members[sender].start_call("send", name="b", values=list(range(1, 101)), size=500)
        firsts = [c.members[i].start_call("receive", name="b", count=10) for i in receivers]
        reducing = [c.members[i].start_call("allreduce", name="r", index=i, width=7, rounds=3) for i in range(7)]
        await asyncio.wait_for(firsts[0], 30)
        c.members[root].kill(signal.SIGKILL)
        assert (await asyncio.wait_for(sending, 60))["ok"]
        rest = await asyncio.gather(*(_after(head, c.members[i], "receive", name="b", count=90, timeout=60)
                                      for i, head in zip(receivers, firsts)))
        for i, head, tail in zip(receivers, firsts, rest):
            assert await _result(head) + tail == list(range(1, 101)), f"member {i}"
        more = await asyncio.gather(*(_after(reducing[i], c.members[i], "allreduce", name="r", index=i, width=7,
                                             rounds=3, timeout=60) for i in survivors))
        per_member = [await _result(reducing[i]) + extra for i, extra in zip(survivors, more)]
        for rounds in zip(*per_member):
            assert all(r == rounds[0] for r in rounds), "members disagree on a round's result"
            vector, contributors = rounds[0]["vector"], rounds[0]["contributors"]
            assert set(vector) <= {0, 1}, f"double count: {vector}"
            assert {ids[i] for i, v in enumerate(vector) if v == 1} == set(contributors)
            assert {ids[i] for i in survivors} <= set(contributors), "a live contributor was dropped"
