"""Several hosts on one machine: network namespaces (root only — CI runs as root, so a
missing privilege or a missing ``ip`` fails here loudly; nothing is skipped)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from zipcomm.testing import netns
from zipcomm.testing.netns import NetnsCluster, NetnsLab, NetnsUnavailable, tree_copies

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HOSTS, PER_HOST = 3, 3
ELEMENTS = 1_250_000  # int64: a 10 MB broadcast
SIZE = ELEMENTS * 8


def visible(lab: NetnsLab) -> list[str]:
    """The lab's objects that ``ip netns list`` and ``ip link`` still show."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    names += [line.split()[1].rstrip(":").split("@")[0] for line in links.splitlines() if line.strip()]
    return [name for name in names if lab.tag in name]


@pytest.fixture(scope="module", autouse=True)
def _sweep_crashed_runs() -> None:
    NetnsLab.sweep()


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable, match="need root"):
        with NetnsLab(1):
            pass


def test_teardown_after_a_failure_kills_its_processes_and_removes_everything() -> None:
    with pytest.raises(ZeroDivisionError):
        with NetnsLab(2) as lab:
            assert len(visible(lab)) == 2 + 1 + 2  # namespaces, bridge, root-side veths
            inside = lab.popen(1, ["ip", "-4", "-o", "addr", "show"], stdout=subprocess.PIPE, text=True)
            out, _ = inside.communicate(timeout=30)
            assert f"{lab.host_addr(1)}/24" in out and lab.hub_addr not in out
            sleeper = lab.popen(0, ["sleep", "600"])
            1 / 0
    assert sleeper.returncode == -signal.SIGKILL
    assert visible(lab) == []


def test_sweep_removes_a_crashed_lab_and_spares_a_live_one() -> None:
    with subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from zipcomm.testing.netns import NetnsLab; lab = NetnsLab(2); lab.open(); "
         "print(lab.tag, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as crashed:
        try:
            tag = crashed.stdout.readline().strip()
            assert tag, f"the lab in the child did not open (exit code {crashed.poll()})"
        finally:
            crashed.kill()  # SIGKILL: no teardown
            crashed.wait(30)
    with NetnsLab(1) as live:
        removed = NetnsLab.sweep()
        assert {f"zc-{tag}-h0", f"zc-{tag}-h1", f"zc{tag}h0", f"zc{tag}h1", f"zc{tag}br"} <= set(removed)
        assert not [name for name in removed if live.tag in name]
        assert len(visible(live)) == 3  # untouched
    assert visible(live) == []


@pytest.mark.asyncio
async def test_broadcast_and_allreduce_across_three_hosts() -> None:
    async with NetnsLab(HOSTS) as lab:
        async with NetnsCluster(lab, PER_HOST) as c:
            assert c.controller.address.startswith(lab.hub_addr + ":")
            # Join host by host in turn, so tree edges cross the links in both directions.
            order = [c.members[h * PER_HOST + j] for j in range(PER_HOST) for h in range(HOSTS)]
            for mm in order:
                await mm.call("join", kind="broadcast", name="b")
            places = await c.places("b")  # parents are final once everyone joined
            for mm, place in zip(c.members, places):  # each listens on its own host's address
                assert place["address"].startswith(lab.host_addr(mm.host) + ":")
                assert place["host_index"] == mm.host
            root = next(i for i, p in enumerate(places) if p["root"])
            # the sender: not the root, on another host (its item crosses to the root first)
            sender = next(i for i, mm in enumerate(c.members) if mm.host != c.members[root].host)
            others = [mm for i, mm in enumerate(c.members) if i != sender]
            with lab.measure() as traffic:
                await c.members[sender].call("send", name="b", values=[7], size=ELEMENTS, timeout=60)
                got = await asyncio.gather(*(mm.call("receive", name="b", count=1, timeout=60) for mm in others))
            assert got == [[7]] * len(others)  # and each member checked every element
            into, out = tree_copies(places, HOSTS, sender)
            print(f"broadcast of {SIZE} B, per host link: {traffic}; tree copies into {into} out {out}")
            # Every host but the sender's takes the item in at least once (with a daemon: exactly
            # once); without one, each tree edge between hosts carries its own copy.
            assert all(into[h] >= 1 for h in range(HOSTS) if h != c.members[sender].host)
            assert sum(into) >= sum(1 for mm in c.members if mm.host != c.members[root].host)
            assert traffic.check(SIZE, into, out) == [], f"{traffic}, expected copies into {into} out {out}"

            reduce_places = await c.join_all("reduce", "r")
            ids = sorted(p["member"] for p in reduce_places)
            n = len(c.members)
            results = await asyncio.gather(
                *(mm.call("allreduce", name="r", index=i, width=n, rounds=3, timeout=60)
                  for i, mm in enumerate(c.members)))
            for per_member in results:
                for rnd in per_member:
                    assert rnd["vector"] == [1] * n
                    assert sorted(rnd["contributors"]) == ids
        processes = [mm.proc for mm in c.members]
    assert all(p is not None and p.returncode is not None for p in processes)
    assert visible(lab) == []


@pytest.mark.asyncio
async def test_with_a_daemon_per_host_data_crosses_each_host_link_once() -> None:
    """3 hosts x 3 members, one daemon per host: a broadcast crosses each host link once
    ((hosts - 1) x size in all, not members x size), an allreduce sends one partial per
    host up and one result per host down; results equal the direct run's."""
    async with NetnsLab(HOSTS) as lab:
        async with NetnsCluster(lab, PER_HOST, daemons=True) as c:
            await c.join_all("broadcast", "b")  # member 0 first: host 0's daemon is the root
            places = await c.places("b")
            assert all(p["daemon"] is not None for p in places), "every member goes through its daemon"
            assert len({p["daemon"] for p in places}) == HOSTS
            sender = c.members[1]  # on host 0, the root's host
            others = [mm for mm in c.members if mm is not sender]
            with lab.measure() as traffic:
                await sender.call("send", name="b", values=[7], size=ELEMENTS, timeout=60)
                got = await asyncio.gather(*(mm.call("receive", name="b", count=1, timeout=60) for mm in others))
            assert got == [[7]] * len(others)
            print(f"broadcast of {SIZE} B with daemons, per host link: {traffic}")
            assert traffic.check(SIZE, [0, 1, 1], [2, 0, 0]) == [], traffic

            reduce_places = await c.join_all("reduce", "r")
            ids = sorted(p["member"] for p in reduce_places)
            n = len(c.members)
            with lab.measure() as traffic:
                results = await asyncio.gather(
                    *(mm.call("allreduce", name="r", index=i, width=n, pad=ELEMENTS - n, rounds=1, timeout=60)
                      for i, mm in enumerate(c.members)))
            print(f"allreduce of {SIZE} B with daemons, per host link: {traffic}")
            # one partial up from each of hosts 1 and 2, one result down to each
            assert traffic.check(SIZE, [2, 1, 1], [2, 1, 1]) == [], traffic
            for per_member in results:
                assert per_member[0]["vector"] == [1] * n and per_member[0]["pad_zero"]
                assert sorted(per_member[0]["contributors"]) == ids
