"""Several "hosts" on one machine, for multi-host tests: Linux network namespaces.

``NetnsLab(k)`` (root only, iproute2's ``ip``) creates ``k`` namespaces
``zc-<tag>-h<i>``, a bridge ``zc<tag>br`` in the root namespace and one veth
pair per namespace (root end ``zc<tag>h<i>`` on the bridge, namespace end
``zc<tag>p<i>``), on a free test subnet ``10.x.y.0/24``: the bridge (the hub,
where a controller in the root namespace listens) is ``10.x.y.1``, host ``i`` is
``10.x.y.(i+2)``. Nothing else on the machine is touched. The bytes on each
root-side veth are the bytes that crossed that host's link::

    with NetnsLab(3) as lab:                       # or: async with NetnsLab(3) as lab
        p = lab.popen(0, ["python", "-c", "..."])  # runs inside namespace 0
        with lab.measure() as traffic:
            ...
        traffic.into[1]                            # bytes that entered host 1

Teardown (also after a failure) kills the processes the lab started (their
process groups), then deletes the veths, the namespaces and the bridge.
``NetnsLab.sweep()`` removes what a crashed run left: only names of this
module's pattern whose lab owner (recorded in the bridge's alias) is dead.

``NetnsCluster(lab, per_host)`` is ``testing.cluster.Cluster`` across the lab:
a controller on the hub address (with a 0600 secret file: non-loopback), and
scripted members in each namespace, listening for peers on their namespace's
address. ``python -m zipcomm.testing.netns sweep`` cleans up by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .cluster import DEADLINE, Cluster, ControllerProcess, DaemonProcess, MemberProcess, wait_for_file

__all__ = [
    "NetnsUnavailable",
    "NetnsLab",
    "LinkBytes",
    "Traffic",
    "tree_copies",
    "NetnsMemberProcess",
    "NetnsCluster",
]

log = logging.getLogger(__name__)

_NS_RE = re.compile(r"^zc-([0-9a-f]{8})-h(\d+)$")
_LINK_RE = re.compile(r"^zc([0-9a-f]{8})(br|h\d+|p\d+)$")
_ALIAS_PREFIX = "zipcomm-netns-lab"
_SETTLE = 10.0  # seconds: links coming up, killed processes going away


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here; the message says why."""


# -- small helpers ------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return f"`{' '.join(exc.cmd)}` failed ({exc.returncode}): {(exc.stderr or '').strip()}"
    return f"{type(exc).__name__}: {exc}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells pid reuse apart), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _disable_ipv6_root(ifname: str) -> None:
    # Link-local addresses, DAD and router solicitations would add noise to the counters.
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1")


def _root_links() -> list[dict]:
    return json.loads(_ip("-j", "link", "show").stdout or "[]")


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix routed or assigned in the root namespace (default routes aside)."""
    used = []
    routes = _ip("-4", "route", "show", "table", "all").stdout.splitlines()
    addrs = _ip("-4", "-o", "addr", "show").stdout.splitlines()
    types = {"unicast", "local", "broadcast", "multicast", "anycast", "blackhole",
             "unreachable", "prohibit", "throw", "nat"}
    for line in routes:
        words = line.split()
        if words and words[0] in types:
            words = words[1:]
        if not words or words[0] == "default":
            continue
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(words[0], strict=False))
    for line in addrs:
        words = line.split()
        if "inet" in words:
            with contextlib.suppress(ValueError, IndexError):
                used.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    rng = random.SystemRandom()
    for _ in range(1000):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsUnavailable("no free 10.x.y.0/24 subnet: every candidate overlaps an existing route or address")


# -- byte counters ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkBytes:
    """Bytes through one host's link, from the host's point of view (Ethernet frames)."""

    into: int  # entered the host (transmitted by the root-side veth end)
    out: int  # left the host (received by the root-side veth end)


class Traffic:
    """Bytes per host link between ``start()`` and ``stop()`` (see :meth:`NetnsLab.measure`)."""

    def __init__(self, lab: NetnsLab) -> None:
        self.lab = lab
        self._before: list[LinkBytes] | None = None
        self._after: list[LinkBytes] | None = None

    def start(self) -> Traffic:
        self._before, self._after = self.lab.link_bytes(), None
        return self

    def stop(self) -> Traffic:
        self._after = self.lab.link_bytes()
        return self

    def _delta(self) -> list[LinkBytes]:
        if self._before is None:
            raise RuntimeError("traffic measurement not started")
        after = self._after if self._after is not None else self.lab.link_bytes()
        return [LinkBytes(a.into - b.into, a.out - b.out) for a, b in zip(after, self._before)]

    @property
    def into(self) -> list[int]:
        return [d.into for d in self._delta()]

    @property
    def out(self) -> list[int]:
        return [d.out for d in self._delta()]

    def check(self, size: int, into: Sequence[int], out: Sequence[int] | None = None, *,
              overhead: float = 0.10, slack: int = 1 << 20) -> list[str]:
        """Problems (empty when fine) comparing the bytes on each link with whole copies of
        a ``size``-byte payload: host ``h`` must have taken in at least ``into[h]`` copies
        and at most that much plus ``overhead`` (headers, acknowledgements of what it sent)
        plus ``slack`` bytes (control traffic); likewise ``out`` if given.

        Without a daemon ``into`` comes from :func:`tree_copies`; with one daemon per host a
        broadcast should take exactly one copy into every host but the sender's.
        """
        problems = []
        out_copies = list(out) if out is not None else None
        for h, got in enumerate(self._delta()):
            sent = out_copies[h] if out_copies is not None else 0
            checks = [("into", got.into, into[h])]
            if out_copies is not None:
                checks.append(("out", got.out, sent))
            for direction, value, copies in checks:
                low = copies * size
                high = low + int(overhead * (into[h] + sent) * size) + slack
                if not low <= value <= high:
                    problems.append(f"host {h} {direction}: {value} bytes, expected {copies} copies of "
                                    f"{size} B: [{low}, {high}]")
        return problems

    def __repr__(self) -> str:
        return f"Traffic(into={self.into}, out={self.out})"


def tree_copies(places: Sequence[dict], hosts: int, sender: int | None = None) -> tuple[list[int], list[int]]:
    """Copies of one broadcast item that cross each host link without a daemon: one per tree
    edge between hosts (plus sender -> root). ``places`` are :class:`NetnsCluster` places
    (``host_index``, ``parent_host_index``, ``root``); ``sender`` indexes ``places``.
    Returns ``(into, out)`` per host."""
    into, out = [0] * hosts, [0] * hosts
    for place in places:
        if place["root"] or place["parent_host_index"] is None:
            continue
        if place["parent_host_index"] != place["host_index"]:
            into[place["host_index"]] += 1
            out[place["parent_host_index"]] += 1
    if sender is not None:
        root = next(p for p in places if p["root"])
        if not places[sender]["root"] and places[sender]["host_index"] != root["host_index"]:
            into[root["host_index"]] += 1
            out[places[sender]["host_index"]] += 1
    return into, out


# -- the lab ------------------------------------------------------------------


class NetnsLab:
    """``k`` network namespaces on a private bridge; see the module docstring."""

    def __init__(self, hosts: int) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError("hosts must be between 1 and 250")
        self.hosts = hosts
        self.tag = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self._procs: list[Any] = []  # subprocess.Popen | asyncio.subprocess.Process
        self._created: list[tuple[str, str]] = []  # ("link" | "netns", name), creation order
        self._open = False

    # names and addresses

    @property
    def name(self) -> str:
        return f"zc-{self.tag}"

    @property
    def bridge(self) -> str:
        return f"zc{self.tag}br"

    def namespace(self, i: int) -> str:
        self._check_host(i)
        return f"zc-{self.tag}-h{i}"

    def host_link(self, i: int) -> str:
        """The root-side end of host ``i``'s veth (its counters are that host's traffic)."""
        self._check_host(i)
        return f"zc{self.tag}h{i}"

    def peer_link(self, i: int) -> str:
        """The namespace-side end of host ``i``'s veth (inside namespace ``i``)."""
        self._check_host(i)
        return f"zc{self.tag}p{i}"

    @property
    def hub_addr(self) -> str:
        """The root namespace's address on the bridge (where a controller listens)."""
        return str(self._subnet()[1])

    def host_addr(self, i: int) -> str:
        self._check_host(i)
        return str(self._subnet()[i + 2])

    def _subnet(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise RuntimeError("the lab is not open")
        return self.subnet

    def _check_host(self, i: int) -> None:
        if not 0 <= i < self.hosts:
            raise IndexError(f"host {i} not in 0..{self.hosts - 1}")

    # processes

    def exec_prefix(self, i: int) -> list[str]:
        """Prepend to an argv to run it inside namespace ``i`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """``subprocess.Popen`` inside namespace ``i``, in its own process group; killed at teardown."""
        self._require_open()
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen([*self.exec_prefix(i), *argv], **kw)
        self._procs.append(proc)
        return proc

    async def spawn(self, i: int, argv: Sequence[str], **kw: Any) -> asyncio.subprocess.Process:
        """``asyncio.create_subprocess_exec`` inside namespace ``i``; killed at teardown."""
        self._require_open()
        kw.setdefault("start_new_session", True)
        proc = await asyncio.create_subprocess_exec(*self.exec_prefix(i), *argv, **kw)
        self._procs.append(proc)
        return proc

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("the lab is not open")

    # counters

    def link_bytes(self) -> list[LinkBytes]:
        """Cumulative bytes per host link (read from the root-side veth ends)."""
        out = []
        for i in range(self.hosts):
            base = f"/sys/class/net/{self.host_link(i)}/statistics/"
            with open(base + "tx_bytes") as tx, open(base + "rx_bytes") as rx:
                out.append(LinkBytes(into=int(tx.read()), out=int(rx.read())))
        return out

    @contextlib.contextmanager
    def measure(self) -> Iterator[Traffic]:
        """``with lab.measure() as t: ...``; then ``t.into`` / ``t.out`` per host."""
        traffic = Traffic(self).start()
        try:
            yield traffic
        finally:
            traffic.stop()

    # lifecycle

    def __enter__(self) -> NetnsLab:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> NetnsLab:
        self.open()  # blocks the loop briefly; in this thread, an interruption still cleans up
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def open(self) -> None:
        if self._open:
            raise RuntimeError("the lab is already open")
        if os.geteuid() != 0:
            raise NetnsUnavailable(f"network namespaces need root (running as uid {os.geteuid()})")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` command (iproute2) is missing: apt-get install -y iproute2")
        try:
            self._create()
        except BaseException as exc:
            try:
                self.close()
            except Exception as cleanup:  # report both; the setup failure first
                log.error("netns lab %s: cleanup after a failed setup: %s", self.name, cleanup)
            if isinstance(exc, (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired)):
                raise NetnsUnavailable(f"cannot build the netns lab: {_describe(exc)}") from exc
            raise
        self._open = True

    def _create(self) -> None:
        taken = set(_netns_names()) | {link["ifname"] for link in _root_links()}
        while True:
            self.tag = secrets.token_hex(4)
            if not any(self.tag in name for name in taken):
                break
        self.subnet = _free_subnet()
        prefix = self.subnet.prefixlen
        # The bridge first and gone last: its alias says whose lab this is (see sweep()).
        _ip("link", "add", "name", self.bridge, "type", "bridge")
        self._created.append(("link", self.bridge))
        _ip("link", "set", "dev", self.bridge, "alias",
            f"{_ALIAS_PREFIX} pid={os.getpid()} start={_start_time(os.getpid())}")
        _disable_ipv6_root(self.bridge)
        _ip("addr", "add", f"{self.hub_addr}/{prefix}", "dev", self.bridge)
        _ip("link", "set", "dev", self.bridge, "up")
        for i in range(self.hosts):
            ns, root_end, ns_end = self.namespace(i), self.host_link(i), self.peer_link(i)
            _ip("netns", "add", ns)
            self._created.append(("netns", ns))
            subprocess.run([*self.exec_prefix(i), "sh", "-c",
                            "if [ -d /proc/sys/net/ipv6 ]; then echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
                            " echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; fi"],
                           check=True, capture_output=True, text=True, timeout=30)
            _ip("link", "add", root_end, "type", "veth", "peer", "name", ns_end, "netns", ns)
            self._created.append(("link", root_end))
            _disable_ipv6_root(root_end)
            _ip("link", "set", "dev", root_end, "master", self.bridge)
            _ip("link", "set", "dev", root_end, "up")
            _ip("-n", ns, "link", "set", "dev", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.host_addr(i)}/{prefix}", "dev", ns_end)
            _ip("-n", ns, "link", "set", "dev", ns_end, "up")
        self._wait_forwarding()

    def _wait_forwarding(self) -> None:
        """Until every root-side end is up and a forwarding bridge port (a predicate, under a deadline)."""
        give_up = time.monotonic() + _SETTLE
        waiting = [self.host_link(i) for i in range(self.hosts)]
        while waiting:
            still = []
            for link in waiting:
                try:
                    with open(f"/sys/class/net/{link}/operstate") as f:
                        up = f.read().strip() == "up"
                    with open(f"/sys/class/net/{link}/brport/state") as f:
                        up = up and f.read().strip() == "3"  # BR_STATE_FORWARDING
                except OSError:
                    up = False
                if not up:
                    still.append(link)
            waiting = still
            if waiting and time.monotonic() > give_up:
                raise NetnsUnavailable(f"links {waiting} did not come up within {_SETTLE:.0f} s")
            if waiting:
                time.sleep(0.01)

    def _kill_processes(self) -> None:
        for proc in self._procs:
            if proc.returncode is None and (not isinstance(proc, subprocess.Popen) or proc.poll() is None):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own group: start_new_session

    async def aclose(self) -> None:
        """Like :meth:`close`, reaping asyncio processes through the running loop."""
        self._kill_processes()
        for proc in self._procs:
            if isinstance(proc, asyncio.subprocess.Process):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), _SETTLE)
        self.close()

    def close(self) -> None:
        """Kill the lab's processes, delete everything it created; idempotent. Raises if something stays."""
        self._open = False
        self._kill_processes()
        give_up = time.monotonic() + _SETTLE
        for proc in self._procs:
            if isinstance(proc, subprocess.Popen):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, give_up - time.monotonic()))
            else:  # reaped by the event loop's child watcher: wait for the exit itself
                while not _gone_or_zombie(proc.pid) and time.monotonic() < give_up:
                    time.sleep(0.01)
        self._procs.clear()
        errors = []
        # veths (the namespace end goes with its root end), then namespaces, the bridge last
        links = [n for k, n in self._created if k == "link" and n != self.bridge]
        namespaces = [n for k, n in self._created if k == "netns"]
        bridge = [n for k, n in self._created if n == self.bridge]
        links_now, namespaces_now = {link["ifname"] for link in _root_links()}, set(_netns_names())
        for kind, name in [("link", n) for n in links] + [("netns", n) for n in namespaces] + [("link", n) for n in bridge]:
            try:
                if kind == "netns" and name in namespaces_now:
                    _ip("netns", "del", name)
                elif kind == "link" and name in links_now:
                    _ip("link", "del", "dev", name)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                errors.append(_describe(exc))
        self._created.clear()
        leftovers = _leftovers(self.tag) if self.tag else []
        if errors or leftovers:
            raise RuntimeError(f"netns lab {self.name} teardown: {'; '.join(errors)} left: {leftovers}")

    # crashed runs

    @staticmethod
    def sweep() -> list[str]:
        """Delete namespaces and links of this module's naming pattern whose lab owner is gone
        (a crashed run); a live lab (its bridge alias names a running process) is left alone.
        Returns what was removed. Processes still inside a removed namespace are not killed:
        they lose their interfaces and the name."""
        if os.geteuid() != 0:
            raise NetnsUnavailable(f"sweeping network namespaces needs root (running as uid {os.geteuid()})")
        if shutil.which("ip") is None:
            return []  # then nothing of ours can exist
        by_tag: dict[str, list[tuple[str, str]]] = {}
        alive: set[str] = set()
        for name in _netns_names():
            if m := _NS_RE.match(name):
                by_tag.setdefault(m.group(1), []).append(("netns", name))
        for link in _root_links():
            if m := _LINK_RE.match(link["ifname"]):
                by_tag.setdefault(m.group(1), []).append(("link", link["ifname"]))
                if m.group(2) == "br" and _owner_alive(link.get("ifalias", "")):
                    alive.add(m.group(1))
        removed = []
        for tag, objects in by_tag.items():
            if tag in alive:
                continue
            objects.sort(key=lambda o: 2 if o[1].endswith("br") else (1 if o[0] == "netns" else 0))
            for kind, name in objects:
                pids = _ip("netns", "pids", name, check=False).stdout.split() if kind == "netns" else []
                if pids:
                    log.warning("sweep: namespace %s still holds processes %s (not killed)", name, pids)
                result = (_ip("netns", "del", name, check=False) if kind == "netns"
                          else _ip("link", "del", "dev", name, check=False))
                if result.returncode == 0:
                    removed.append(name)
        return removed


def _owner_alive(alias: str) -> bool:
    fields = dict(w.split("=", 1) for w in alias.split()[1:] if "=" in w) if alias.startswith(_ALIAS_PREFIX) else {}
    try:
        pid, start = int(fields["pid"]), int(fields["start"])
    except (KeyError, ValueError):
        return False
    return _start_time(pid) == start


def _leftovers(tag: str) -> list[str]:
    """Names of a lab's objects still visible (``ip netns list``, ``ip link``)."""
    names = [n for n in _netns_names() if (m := _NS_RE.match(n)) and m.group(1) == tag]
    names += [link["ifname"] for link in _root_links()
              if (m := _LINK_RE.match(link["ifname"])) and m.group(1) == tag]
    return names


# -- zipcomm across the lab ---------------------------------------------------


class NetnsMemberProcess(MemberProcess):
    """A scripted member inside namespace ``host``, listening for peers on the namespace's address.

    Its ``where`` also reports ``host`` / ``host_index`` and ``parent_host`` /
    ``parent_host_index`` (the runtime's host id is the namespace name)."""

    def __init__(self, lab: NetnsLab, host: int, index: int, secret: str, env: dict | None = None) -> None:
        super().__init__(index, env)
        self.lab = lab
        self.host = host
        self.secret = secret

    async def start(self, controller: str) -> None:
        argv = [sys.executable, "-m", "zipcomm.testing.netns", "member",
                "--listen-host", self.lab.host_addr(self.host), "--host-id", self.lab.namespace(self.host),
                controller]
        log_fd = self._stderr()
        try:
            self.proc = await self.lab.spawn(
                self.host, argv, env={**os.environ, **(self.env or {}), "ZIPCOMM_SECRET": self.secret},
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_fd,
            )
        finally:
            if log_fd is not None:
                os.close(log_fd)
        line = await asyncio.wait_for(self.proc.stdout.readline(), DEADLINE)  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"member {self.index} in {self.lab.namespace(self.host)} exited before its hello "
                               f"(exit code {await self.proc.wait()})")
        self.member_id = json.loads(line)["result"]["member"]
        self._reader = asyncio.create_task(self._read())


class NetnsDaemonProcess(DaemonProcess):
    """The daemon of namespace ``host``: peers reach it on the namespace's address."""

    def __init__(self, lab: NetnsLab, host: int, workdir: str) -> None:
        super().__init__(host, workdir)
        self.lab = lab
        self.host_id = lab.namespace(host)
        self.secret_file = ""

    async def start(self, controller: str) -> None:
        ready = self.socket + ".ready"
        argv = [sys.executable, "-m", "zipcomm.daemon", "--controller", controller, "--socket", self.socket,
                "--host-id", self.host_id, "--listen-host", self.lab.host_addr(self.index),
                "--secret-file", self.secret_file, "--ready-file", ready, *self.extra]
        self.proc = await self.lab.spawn(self.index, argv, stdout=asyncio.subprocess.DEVNULL)
        await wait_for_file(ready, self.proc, f"daemon in {self.host_id}")


class NetnsCluster(Cluster):
    """``async with NetnsCluster(lab, per_host=3) as c``: a controller in the root namespace on
    ``lab.hub_addr`` (authenticated: a 0600 secret file for it, ``ZIPCOMM_SECRET`` for the
    members) and ``per_host`` members in each namespace; member ``h * per_host + j`` is the
    ``j``-th on host ``h``."""

    def __init__(self, lab: NetnsLab, per_host: int, *controller_args: str, daemons: bool = False) -> None:
        self.lab = lab
        self.per_host = per_host
        self.secret = secrets.token_hex(32)
        self.secret_file = ""  # written on entry, removed on exit
        self._tmp = tempfile.TemporaryDirectory(prefix="zipcomm-netns-")
        self.controller = ControllerProcess(*controller_args)
        # one daemon per host, listening for its peers on the host's address
        self.daemons = [NetnsDaemonProcess(lab, h, self._tmp.name) for h in range(lab.hosts)] if daemons else []
        self.members = [NetnsMemberProcess(lab, h, h * per_host + j, self.secret,
                                           self.daemons[h].env() if daemons else None)
                        for h in range(lab.hosts) for j in range(per_host)]

    async def __aenter__(self) -> NetnsCluster:
        try:
            self.secret_file = os.path.join(self._tmp.name, "secret")
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.secret)
            self.controller.extra[:0] = ["--secret-file", self.secret_file]
            address = await self.controller.start(f"{self.lab.hub_addr}:0")
            for daemon in self.daemons:
                daemon.secret_file = self.secret_file
                await daemon.start(address)
            await asyncio.gather(*(mm.start(address) for mm in self.members))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await super().__aexit__(*exc)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


# -- entry points -------------------------------------------------------------


def _member_main(args: argparse.Namespace) -> None:
    import zipcomm
    from zipcomm.testing.member import Member

    class NetnsMember(Member):
        async def run(self) -> None:
            # Member.run connects with zipcomm.connect(controller) and takes no Runtime
            # options; in this process only, hand it ours.
            plain = zipcomm.connect
            zipcomm.connect = lambda controller=None, **kw: plain(  # type: ignore[assignment]
                controller, listen_host=args.listen_host, host_id=args.host_id, **kw)
            try:
                await super().run()
            finally:
                zipcomm.connect = plain  # type: ignore[assignment]

        async def do_where(self, name: str) -> dict:
            place = await super().do_where(name)
            parent = getattr(self.handles[name], "parent", None)  # none: through the daemon
            place.update(host=self.rt.host_id, address=self.rt.address,
                         parent=parent[0] if parent else None, parent_host=parent[2] if parent else None)
            for key in ("host", "parent_host"):
                m = _NS_RE.match(place[key] or "")
                place[key + "_index"] = int(m.group(2)) if m else None
            return place

    if os.environ.get("ZIPCOMM_TEST_LOGDIR"):
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)d %(name)s %(message)s")
    asyncio.run(NetnsMember(args.controller).run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zipcomm.testing.netns")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sweep", help="remove namespaces and links left by crashed NetnsLab runs")
    mp = sub.add_parser("member", help="a zipcomm.testing.member that listens on --listen-host")
    mp.add_argument("--listen-host", required=True)
    mp.add_argument("--host-id", required=True)
    mp.add_argument("controller")
    args = p.parse_args(argv)
    if args.cmd == "sweep":
        for name in NetnsLab.sweep():
            print("removed", name)
        return 0
    _member_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
