"""Chaos harness: scenarios that break a live cluster while it works, and the
invariant checks that must hold afterwards.

``run_scenario(name, seed)`` starts a controller (fast heartbeats), optional host
daemons and a few scripted members, runs a workload (a numbered broadcast stream,
rounds of allreduce over one-hot vectors, shuffles) while a killer applies one
death mode to seeded targets, then checks:

* broadcast: every member that stayed alive (and in the channel) received every
  item of the completed stream exactly once, in order; late joiners a gap-free
  suffix; nobody a duplicate or an out-of-order item;
* reduce: every round's vector counts exactly the contributors it reports, each
  once; members alive for the whole run are never dropped; those members agree;
* shuffle: every live sender's items reach their receiver exactly once;
* membership converges (controller list == live members, one consistent tree)
  within 2 x heartbeat timeout + 1 s after the last fault (the time is measured);
* no leaked processes, shared-memory segments or file descriptors.

Every failure names the scenario and the seed, and the command that replays it:
``python bench/chaos.py --scenario NAME --seed S``.

Death modes: SIGKILL, SIGTERM, SIGSTOP+SIGCONT, ``sys.exit`` (a member command
that raises ``SystemExit`` in the member: the interpreter unwinds, closing its
runtime on the way), graceful leave, controller kill -9 + restart, daemon
SIGKILL, 50 % correlated SIGKILL, a join storm and a flapping member.

The members run this module (``python -m zipcomm.testing.chaos --member ADDR``):
the scripted member of :mod:`zipcomm.testing.member` plus commands that return
partial results instead of failing (``collect``, ``rounds``), ask the controller
for a channel's members (``members``) and exit the interpreter (``sysexit``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import sys
import time
from typing import Any, Callable

import numpy as np

from .cluster import DEADLINE, Cluster, MemberProcess
from .member import Member

HEARTBEAT = 0.2
HEARTBEAT_TIMEOUT = 1.0
CONVERGENCE_BOUND = 2 * HEARTBEAT_TIMEOUT + 1.0
CONTROLLER_ARGS = ("--heartbeat", str(HEARTBEAT), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--fanout", "2")


# -- the member side ---------------------------------------------------------------


class ChaosMember(Member):
    async def do_collect(self, name: str, last: int, idle: float = 5.0) -> dict:
        """Receive until the item ``last`` arrives or nothing arrives for ``idle`` s."""
        got: list[int] = []
        try:
            while not got or got[-1] != last:
                arr = await self.handles[name].receive(timeout=idle)
                if not (arr == arr[0]).all():
                    return {"got": got, "error": "corrupted broadcast payload"}
                got.append(int(arr[0]))
        except Exception as exc:
            return {"got": got, "error": f"{type(exc).__name__}: {exc}"}
        return {"got": got, "error": None}

    async def do_rounds(self, name: str, index: int, width: int, rounds: int, timeout: float = 10.0,
                        pause: float = 0.0) -> dict:
        out: list[dict] = []
        try:
            for _ in range(rounds):
                vec = np.zeros(width, dtype=np.int64)
                vec[index] = 1
                value, contributors = await self.handles[name].allreduce(vec, timeout=timeout,
                                                                         with_contributors=True)
                out.append({"vector": value.tolist(), "contributors": sorted(contributors)})
                if pause:
                    await asyncio.sleep(pause)  # pacing of the workload, not synchronization
        except Exception as exc:
            return {"results": out, "error": f"{type(exc).__name__}: {exc}"}
        return {"results": out, "error": None}

    async def do_members(self, name: str) -> list[int]:
        from ..protocol import messages as m

        assert self.rt is not None
        info = await asyncio.wait_for(self.rt.request(m.ListMembers, channel=name), 2.0)
        return sorted(w[0] for w in info["members"])

    async def do_sysexit(self, code: int = 0) -> None:
        raise SystemExit(code)

    async def do_rejoin(self, kind: str, name: str) -> dict:
        return await self.do_join(kind, name)


def member_main(controller: str) -> None:
    if os.environ.get("ZIPCOMM_TEST_LOGDIR"):  # a post-mortem log per member (see MemberProcess)
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)d %(name)s %(message)s")
    asyncio.run(ChaosMember(controller).run())


class ChaosMemberProcess(MemberProcess):
    async def start(self, controller: str) -> None:
        log_fd = self._stderr()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "zipcomm.testing.chaos", "--member", controller,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_fd if log_fd is not None else asyncio.subprocess.DEVNULL,
                env=dict(os.environ, **self.env) if self.env else None,
            )
        finally:
            if log_fd is not None:
                os.close(log_fd)
        hello = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), DEADLINE))  # type: ignore[union-attr]
        self.member_id = hello["result"]["member"]
        self._reader = asyncio.create_task(self._read())

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class ChaosCluster(Cluster):
    def __init__(self, n: int, *controller_args: str, daemons: int = 0, started: int | None = None,
                 env: dict | None = None) -> None:
        super().__init__(n, *controller_args, daemons=daemons)
        self.members = [ChaosMemberProcess(mm.index, {**(mm.env or {}), **(env or {})} or None)
                        for mm in self.members]
        self.started = n if started is None else started


# -- scenarios ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    fault: str  # kill, term, stop, sysexit, leave, controller, daemon, correlated, join_storm, flap
    target: str = "interior"  # leaf, interior, root, any
    workload: tuple[str, ...] = ("b",)  # b: broadcast stream, r: allreduce rounds, s: shuffle
    n: int = 5
    daemons: int = 0
    doc: str = ""
    sizes: tuple[int, ...] = (1, 64, 2000)  # int64 elements per broadcast (one is drawn per run)
    env: tuple[tuple[str, str], ...] = ()  # for the members


# 16,000-byte broadcasts as 1,024-byte parts
_PARTS = (("ZIPCOMM_CHUNK_BYTES", "1024"),)
# every reduce piece combined as it arrives (as 1 MiB and larger ones are)
_FOLD = (("ZIPCOMM_FOLD_BYTES", "8"),)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("bcast_kill_leaf", "kill", "leaf", ("b",), doc="SIGKILL a leaf mid-broadcast"),
    Scenario("bcast_kill_interior", "kill", "interior", ("b",), doc="SIGKILL an interior member mid-broadcast"),
    Scenario("bcast_kill_root", "kill", "root", ("b",), doc="SIGKILL the root mid-broadcast"),
    Scenario("bcast_term_interior", "term", "interior", ("b",), doc="SIGTERM an interior member mid-broadcast"),
    Scenario("bcast_stop_cont", "stop", "interior", ("b",),
             doc="SIGSTOP an interior member (0.3-1.6 s, i.e. below or above the heartbeat timeout), SIGCONT"),
    Scenario("bcast_sysexit", "sysexit", "interior", ("b",), n=6, doc="an interior member calls sys.exit mid-broadcast"),
    Scenario("bcast_leave_root", "leave", "root", ("b",), n=6, doc="the root leaves gracefully mid-broadcast"),
    Scenario("bcast_leave_interior", "leave", "interior", ("b",),
             doc="an interior member leaves gracefully mid-broadcast"),
    Scenario("reduce_kill_leaf", "kill", "leaf", ("r",), doc="SIGKILL a leaf mid-allreduce"),
    Scenario("reduce_kill_interior", "kill", "interior", ("r",), doc="SIGKILL an interior member mid-allreduce"),
    Scenario("reduce_kill_root", "kill", "root", ("r",), n=6, doc="SIGKILL the root mid-allreduce"),
    Scenario("reduce_stop_cont", "stop", "interior", ("r",), doc="SIGSTOP then SIGCONT an interior member mid-allreduce"),
    Scenario("reduce_sysexit", "sysexit", "leaf", ("r",), n=6, doc="a leaf calls sys.exit mid-allreduce"),
    Scenario("reduce_leave", "leave", "interior", ("r",), n=6, doc="an interior member leaves gracefully mid-allreduce"),
    Scenario("reduce_fold_kill_interior", "kill", "interior", ("r",), env=_FOLD,
             doc="SIGKILL an interior member mid-allreduce, pieces combined as they arrive"),
    Scenario("reduce_fold_kill_root", "kill", "root", ("r",), n=6, env=_FOLD,
             doc="SIGKILL the root mid-allreduce, pieces combined as they arrive"),
    Scenario("bcast_parts_kill_root", "kill", "root", ("b",), sizes=(2000,), env=_PARTS,
             doc="SIGKILL the root mid-broadcast of items sent as parts (relayed from a sender that is "
                 "not the root)"),
    Scenario("bcast_parts_kill_interior", "kill", "interior", ("b",), sizes=(2000,), env=_PARTS,
             doc="SIGKILL an interior member mid-broadcast of items sent as parts"),
    Scenario("mixed_kill_interior", "kill", "interior", ("b", "r"),
             doc="SIGKILL an interior member during a broadcast stream and allreduce rounds at once"),
    Scenario("shuffle_kill", "kill", "any", ("s",), doc="SIGKILL a member, then shuffles among the survivors"),
    Scenario("controller_restart_bcast", "controller", "-", ("b",),
             doc="controller kill -9 and restart on its address mid-broadcast"),
    Scenario("controller_restart", "controller", "-", ("b", "r"),
             doc="controller kill -9 and restart on its address mid-broadcast and mid-allreduce"),
    Scenario("daemon_kill", "daemon", "-", ("b",), n=4, daemons=2,
             doc="SIGKILL a host daemon (not the first) mid-broadcast: its members fall back to direct links"),
    Scenario("daemon_kill_parts", "daemon", "-", ("b",), n=4, daemons=2, sizes=(2000,), env=_PARTS,
             doc="SIGKILL a host daemon mid-broadcast of large items: its members fall back to direct "
                 "links (a sender among them then sends parts, which the other daemon assembles)"),
    Scenario("daemon_kill_reduce", "daemon", "-", ("r",), n=4, daemons=2,
             doc="SIGKILL a host daemon (not the first) mid-allreduce: its members re-send the rounds without "
                 "a result directly"),
    Scenario("correlated_half", "correlated", "any", ("b", "r"),
             doc="SIGKILL 50 % of the members at once mid-broadcast and mid-allreduce"),
    Scenario("join_storm", "join_storm", "-", ("b",), n=8,
             doc="4 members join at once while a broadcast stream runs"),
    Scenario("flapping_member", "flap", "leaf", ("b",),
             doc="a member leaves and rejoins the channel repeatedly while a broadcast stream runs"),
]}


# -- results -----------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    scenario: str
    seed: int
    ok: bool = True
    failures: list[str] = dataclasses.field(default_factory=list)
    convergence: float | None = None  # seconds from the last fault to a converged membership
    ops: int = 0  # broadcast items delivered + reduce rounds completed + shuffle items delivered
    duration: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def replay(self) -> str:
        return f"python bench/chaos.py --scenario {self.scenario} --seed {self.seed}"

    def fail(self, msg: str) -> None:
        self.ok = False
        self.failures.append(msg)

    def report(self) -> str:
        head = f"scenario {self.scenario} seed {self.seed}: {'pass' if self.ok else 'FAIL'}"
        lines = [head, *(f"  - {f}" for f in self.failures), *(f"  note: {n}" for n in self.notes),
                 f"  replay: {self.replay()}"]
        return "\n".join(lines)


class _Ctx:
    def __init__(self, sc: Scenario, seed: int, c: ChaosCluster, res: Result) -> None:
        self.sc, self.seed, self.c, self.res = sc, seed, c, res
        self.rng = random.Random(f"{sc.name}/{seed}")
        self.loop = asyncio.get_running_loop()
        self.last_fault = self.loop.time()
        self.dead: set[int] = set()  # cluster indexes whose process is gone
        self.disturbed: set[int] = set()  # faulted but possibly alive (stopped, left, flapping)
        self.segments: set[str] = set()

    def fault_now(self) -> None:
        self.last_fault = self.loop.time()

    def note_segments(self) -> None:
        for dm in self.c.daemons:
            try:
                with open(dm.socket + ".segments") as f:
                    self.segments.update(json.load(f).get("segments", []))
            except (OSError, ValueError):
                pass


def _children_of_harness_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _procs_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(int(pid))
    return found


async def _poll(pred: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll an async predicate under a deadline; return its last truthy value or None."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        try:
            value = await pred()
        except Exception:
            value = None
        if value:
            return value
        if loop.time() > give_up:
            return None
        await asyncio.sleep(step)  # polling a predicate under a deadline


# -- the run -----------------------------------------------------------------------


async def run_scenario_async(name: str, seed: int, *, verbose: bool = False) -> Result:
    sc = SCENARIOS[name]
    res = Result(name, seed)
    t0 = time.monotonic()
    fds_before = _children_of_harness_fds()
    address = ""
    ctx: _Ctx | None = None
    try:
        started = sc.n - 4 if sc.fault == "join_storm" else sc.n
        c = ChaosCluster(sc.n, *CONTROLLER_ARGS, daemons=sc.daemons, started=started, env=dict(sc.env))
        async with c:
            address = c.controller.address
            ctx = _Ctx(sc, seed, c, res)
            try:
                await asyncio.wait_for(_scenario(ctx), 60)
            except TimeoutError:
                res.fail("scenario hung: no progress within 60 s")
            ctx.note_segments()
            for mm in c.members:  # a stopped member must be able to exit
                if mm.alive:
                    mm.kill(signal.SIGCONT)
    except Exception as exc:
        res.fail(f"harness error: {type(exc).__name__}: {exc}")
    # -- leaks ----------------------------------------------------------------
    if address:
        left = await _poll(lambda: _async_value(not _procs_mentioning(address)), 5.0)
        if not left:
            res.fail(f"leaked processes: {_procs_mentioning(address)}")
    if ctx is not None:
        stale = sorted(s for s in ctx.segments if os.path.exists(os.path.join("/dev/shm", s)))
        if stale:
            res.fail(f"leaked shared-memory segments: {stale}")
    import gc

    gc.collect()
    fds_after = _children_of_harness_fds()
    if fds_after > fds_before:
        res.fail(f"leaked file descriptors in the harness: {fds_before} -> {fds_after}")
    res.duration = time.monotonic() - t0
    if verbose:
        print(res.report())
    return res


async def _async_value(v: Any) -> Any:
    return v


def run_scenario(name: str, seed: int, *, verbose: bool = False) -> Result:
    """Run one scenario with one seed in a fresh cluster (blocking)."""
    return asyncio.run(run_scenario_async(name, seed, verbose=verbose))


def _pick(ctx: _Ctx, places: list[dict], target: str, exclude: set[int] = frozenset()) -> int:
    cands: list[int]
    idx = [i for i in range(ctx.c.started) if i not in exclude]
    direct = places[0].get("daemon") is None
    if target == "root":
        cands = [i for i in idx if places[i]["root"]]
    elif target == "interior" and direct:
        cands = [i for i in idx if places[i]["children"] and not places[i]["root"]]
    elif target == "leaf" and direct:
        cands = [i for i in idx if not places[i]["children"] and not places[i]["root"]]
    else:
        cands = idx
    if not cands:
        raise RuntimeError(f"no {target} member in the tree: {places}")
    return ctx.rng.choice(cands)


async def _scenario(ctx: _Ctx) -> None:
    sc, c, rng, res = ctx.sc, ctx.c, ctx.rng, ctx.res
    members = c.members
    active = list(range(c.started))
    channels = {"b": ("broadcast", "b"), "r": ("reduce", "r"), "s": ("shuffle", "s")}
    for w in sc.workload:
        for i in active:
            await members[i].call("join", kind=channels[w][0], name=channels[w][1])
    main = "b" if "b" in sc.workload else sc.workload[0]
    places = await asyncio.gather(*(members[i].call("where", name=channels[main][1]) for i in active))
    ctx.note_segments()

    # -- victims ----------------------------------------------------------------
    victims: list[int] = []
    if sc.fault in ("kill", "term", "stop", "sysexit", "leave", "flap"):
        victims = [_pick(ctx, places, sc.target)]
    elif sc.fault == "correlated":
        victims = rng.sample(active, len(active) // 2)
    sender = None
    if "b" in sc.workload:
        cands = [i for i in active if i not in victims]
        sender = rng.choice(cands)
    stay = [i for i in active if i not in victims]  # alive and undisturbed for the whole run

    # -- workload ---------------------------------------------------------------
    mid_end = rng.randint(60, 120)
    total = mid_end + 5  # the tail is sent after the fault and the convergence
    first = 10
    size = rng.choice(list(sc.sizes))
    collects: dict[int, asyncio.Future] = {}
    rounds_calls: dict[int, asyncio.Future] = {}
    n_rounds = rng.randint(6, 10)
    width = len(members)
    if "b" in sc.workload:
        for i in active:
            if i != sender:
                idle = 1.5 if i in victims else 8.0
                collects[i] = members[i].start_call("collect", name="b", last=total, idle=idle)
        await members[sender].call("send", name="b", values=list(range(1, first + 1)), size=size)
        sending = members[sender].start_call("send", name="b", values=list(range(first + 1, mid_end + 1)),
                                             size=size, timeout=15)
    if "r" in sc.workload:
        for i in active:
            t = 3.0 if i in victims else 10.0
            rounds_calls[i] = members[i].start_call("rounds", name="r", index=i, width=width, rounds=n_rounds,
                                                    timeout=t, pause=0.02)
    await asyncio.sleep(rng.uniform(0.02, 0.25))  # let the workload get under way before the fault

    # -- the fault ---------------------------------------------------------------
    joiners: list[int] = []
    if sc.fault in ("kill", "term", "correlated"):
        sig = signal.SIGTERM if sc.fault == "term" else signal.SIGKILL
        for v in victims:
            members[v].kill(sig)
            ctx.dead.add(v)
        ctx.fault_now()
    elif sc.fault == "stop":
        v = victims[0]
        members[v].kill(signal.SIGSTOP)
        ctx.fault_now()
        await asyncio.sleep(rng.uniform(0.3, 1.6))  # the pause is the fault
        members[v].kill(signal.SIGCONT)
        ctx.disturbed.add(v)
        ctx.fault_now()
    elif sc.fault == "sysexit":
        v = victims[0]
        members[v].start_call("sysexit", code=3)
        ctx.dead.add(v)
        try:
            await asyncio.wait_for(members[v].proc.wait(), 5)
        except TimeoutError:
            res.fail(f"member {v} called sys.exit(3) but had not exited 5 s later (hang in its shutdown): "
                     "killed it")
            members[v].kill(signal.SIGKILL)
            await asyncio.wait_for(members[v].proc.wait(), 10)
        ctx.fault_now()
        if members[v].proc.returncode not in (3, -signal.SIGKILL):
            res.fail(f"member {v} called sys.exit(3) but exited with {members[v].proc.returncode}")
    elif sc.fault == "leave":
        v = victims[0]
        ctx.disturbed.add(v)
        for w in sc.workload:
            t_leave = ctx.loop.time()
            reply = await asyncio.wait_for(members[v].start_call("leave", name=channels[w][1]), 15)
            if not reply["ok"]:
                res.fail(f"graceful leave failed: {reply['error']}: {reply['message']}")
            took = ctx.loop.time() - t_leave
            res.notes.append(f"leave of {channels[w][1]!r} took {took:.2f} s")
        ctx.fault_now()
    elif sc.fault == "controller":
        await c.controller.kill()
        ctx.fault_now()
        await asyncio.sleep(rng.uniform(0.0, 0.5))  # the outage
        await c.controller.restart()
        ctx.fault_now()
    elif sc.fault == "daemon":
        k = rng.randrange(1, len(c.daemons))
        dm = c.daemons[k]
        ctx.note_segments()
        dm.kill(signal.SIGKILL)
        await asyncio.wait_for(dm.proc.wait(), 10)
        ctx.fault_now()
        res.notes.append(f"killed daemon {k}")
    elif sc.fault == "join_storm":
        joiners = list(range(c.started, len(members)))
        replies = await asyncio.gather(*(members[j].start_call("join", kind="broadcast", name="b")
                                         for j in joiners))
        for j, reply in zip(joiners, replies):
            if not reply["ok"]:
                res.fail(f"joiner {j} failed to join: {reply['error']}: {reply['message']}")
            else:
                collects[j] = members[j].start_call("collect", name="b", last=total, idle=8.0)
        ctx.fault_now()
    elif sc.fault == "flap":
        v = victims[0]
        ctx.disturbed.add(v)
        for _ in range(rng.randint(2, 4)):
            reply = await asyncio.wait_for(members[v].start_call("leave", name="b"), 15)
            if not reply["ok"]:
                res.fail(f"flapping member's leave failed: {reply['error']}: {reply['message']}")
            ctx.fault_now()
            await asyncio.sleep(rng.uniform(0.02, 0.15))  # out of the channel for a while
            reply = await asyncio.wait_for(members[v].start_call("join", kind="broadcast", name="b"), 15)
            if not reply["ok"]:
                res.fail(f"flapping member's rejoin failed: {reply['error']}: {reply['message']}")
            ctx.fault_now()
            await asyncio.sleep(rng.uniform(0.02, 0.15))

    # -- convergence -------------------------------------------------------------
    for v in victims:
        if v in ctx.dead:
            await asyncio.wait_for(members[v].proc.wait(), 15)
    await _check_convergence(ctx, channels, victims, joiners)

    # -- wait for the workload and check it -------------------------------------
    if "b" in sc.workload:
        send_reply = await asyncio.wait_for(sending, 30)
        res.notes.append(f"the sender's stream completed {ctx.loop.time() - ctx.last_fault:.2f} s after the last fault")
        if not send_reply["ok"]:
            res.fail(f"the sender (member {sender}) failed: {send_reply['error']}: {send_reply['message']}")
        else:
            send_reply = await asyncio.wait_for(members[sender].start_call(
                "send", name="b", values=list(range(mid_end + 1, total + 1)), size=size, timeout=10), 30)
            if not send_reply["ok"]:
                res.fail(f"the sender (member {sender}) failed after convergence: {send_reply['error']}: "
                         f"{send_reply['message']}")
        expected = list(range(1, total + 1))
        for i, fut in collects.items():
            try:
                reply = await asyncio.wait_for(fut, 30)
            except RuntimeError:  # the member process is gone
                continue
            if not reply["ok"]:
                res.fail(f"member {i}: collect failed: {reply['message']}")
                continue
            got, err = reply["result"]["got"], reply["result"]["error"]
            if err and i in stay and members[i].alive:  # late, or lost? look once more
                more = await members[i].start_call("collect", name="b", last=total, idle=3.0)
                if more["ok"] and more["result"]["got"]:
                    late = more["result"]["got"]
                    res.fail(f"member {i}: broadcast stalled for more than 8 s: items {late[0]}..{late[-1]} "
                             "arrived only later")
                    got = got + late
            res.ops += len(got)
            if len(got) != len(set(got)):
                res.fail(f"member {i}: duplicated broadcast items: {_dups(got)}")
            if got != sorted(got):
                res.fail(f"member {i}: broadcast items out of order: {got}")
            if i in stay and i != sender and send_reply["ok"]:
                if got != expected:
                    res.fail(f"member {i} (alive throughout) lost broadcast items: missing "
                             f"{sorted(set(expected) - set(got))}, error {err}, got {len(got)}/{total}")
            if i in joiners and got and got != list(range(got[0], total + 1)):
                res.fail(f"late joiner {i}: items not a gap-free suffix of the stream: {got}")
    if "r" in sc.workload:
        await _check_reduce(ctx, rounds_calls, stay)
    if "s" in sc.workload:
        await _check_shuffle(ctx, [i for i in active if i not in ctx.dead])


def _dups(seq: list[int]) -> list[int]:
    seen, dups = set(), []
    for x in seq:
        if x in seen:
            dups.append(x)
        seen.add(x)
    return dups


async def _check_convergence(ctx: _Ctx, channels: dict, victims: list[int], joiners: list[int]) -> None:
    c, sc, res = ctx.c, ctx.sc, ctx.res
    live = [mm for mm in c.members[:c.started] + [c.members[j] for j in joiners]
            if mm.alive and mm.index not in ctx.dead]
    in_channel = [mm for mm in live if not (sc.fault == "leave" and mm.index in victims)]
    observer = next(mm for mm in in_channel if mm.index not in victims)
    live_daemons = [d for d in c.daemons if d.proc is not None and d.proc.returncode is None]
    last_state: dict = {}

    async def converged() -> bool:
        for w in sc.workload:
            name = channels[w][1]
            listed = await observer.call("members", name=name, timeout=2)
            places = await asyncio.gather(*(mm.call("where", name=name, timeout=2) for mm in in_channel))
            last_state[name] = {"controller": listed, "places": places}
            if not c.daemons or w == "s":
                want = sorted(mm.member_id for mm in in_channel)
                if listed != want:
                    return False
                roots = [p for p in places if p["root"]]
                if len(roots) != 1 or sum(p["children"] for p in places) != len(places) - 1:
                    return False
            else:
                fallen = {mm.member_id for mm, p in zip(in_channel, places) if p["fallen_back"]}
                if not fallen <= set(listed) or len(listed) != len(fallen) + len(live_daemons):
                    return False
                if any(mm.member_id in listed for mm in c.members if mm.index in ctx.dead):
                    return False
        return True

    ok = await _poll(converged, CONVERGENCE_BOUND + 5.0, step=0.05)
    elapsed = ctx.loop.time() - ctx.last_fault
    res.convergence = round(elapsed, 3)
    if not ok:
        res.fail(f"membership did not converge within {CONVERGENCE_BOUND + 5.0:.1f} s of the last fault: "
                 f"{last_state}")
    elif elapsed > CONVERGENCE_BOUND:
        res.fail(f"membership converged only {elapsed:.2f} s after the last fault "
                 f"(bound 2 x heartbeat timeout + 1 s = {CONVERGENCE_BOUND:.1f} s)")


async def _check_reduce(ctx: _Ctx, calls: dict[int, asyncio.Future], stay: list[int]) -> None:
    res, c = ctx.res, ctx.c
    ids = {mm.index: mm.member_id for mm in c.members}
    per_member: dict[int, list[dict]] = {}
    for i, fut in calls.items():
        try:
            reply = await asyncio.wait_for(fut, 40)
        except RuntimeError:
            continue
        if not reply["ok"]:
            res.fail(f"member {i}: rounds failed: {reply['message']}")
            continue
        out = reply["result"]
        per_member[i] = out["results"]
        if i in stay and out["error"]:
            res.fail(f"member {i} (alive throughout) failed a reduce round after "
                     f"{len(out['results'])} rounds: {out['error']}")
        for k, rnd in enumerate(out["results"]):
            vector, contributors = rnd["vector"], set(rnd["contributors"])
            if not set(vector) <= {0, 1}:
                res.fail(f"member {i} round {k}: double count: {vector}")
            counted = {ids[j] for j, v in enumerate(vector) if v == 1}
            if counted != contributors:
                res.fail(f"member {i} round {k}: result counts {sorted(counted)} but reports {sorted(contributors)}")
            missing = {ids[j] for j in stay} - contributors
            if missing:
                res.fail(f"member {i} round {k}: live contributors dropped: {sorted(missing)}")
    stayers = [per_member[i] for i in stay if i in per_member]
    if stayers:
        res.ops += min(len(s) for s in stayers)
        for k, rounds in enumerate(zip(*stayers)):
            if any(r != rounds[0] for r in rounds):
                res.fail(f"round {k}: members alive throughout disagree on the result")
                break


async def _check_shuffle(ctx: _Ctx, live: list[int]) -> None:
    """Shuffle rounds among the members left alive (after convergence): exact."""
    res, c = ctx.res, ctx.c
    order = sorted(c.members[i].member_id for i in live)
    n = len(order)
    count = 200
    results = await asyncio.gather(*(c.members[i].start_call("shuffle", name="s", start=i * 1000, count=count,
                                                              rounds=2, timeout=10) for i in live))
    for r in range(2):
        expected = {r * 1_000_000 + i * 1000 + k for i in live for k in range(count)}
        seen: list[int] = []
        for i, reply in zip(live, results):
            if not reply["ok"]:
                if r == 0:
                    res.fail(f"member {i}: shuffle failed: {reply['error']}: {reply['message']}")
                continue
            got = reply["result"][r]
            pos = order.index(c.members[i].member_id)
            wrong = [x for x in got if x % n != pos]
            if wrong:
                res.fail(f"shuffle round {r}: member {i} received items of another receiver: {wrong[:5]}")
            seen.extend(got)
        if len(seen) != len(set(seen)):
            res.fail(f"shuffle round {r}: items delivered twice: {_dups(seen)[:10]}")
        if set(seen) != expected:
            res.fail(f"shuffle round {r}: items lost {sorted(expected - set(seen))[:10]}, "
                     f"foreign {sorted(set(seen) - expected)[:10]}")
        res.ops += len(seen)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--member":
        member_main(sys.argv[2])
    else:
        print("usage: python -m zipcomm.testing.chaos --member HOST:PORT  (the chaos member process);"
              " scenarios run from bench/chaos.py", file=sys.stderr)
        sys.exit(2)
