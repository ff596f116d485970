#!/usr/bin/env python3
"""Controller join throughput (thesis §4.7.3, DESIGN §5): a real controller process, client processes.

Starts ``python -m zipcomm.controller --listen 127.0.0.1:0`` (as bench/_services.py does), then
``--clients`` client processes (multiprocessing, spawn) that speak the controller protocol with the
project's own frame, message and handshake code over a blocking socket. Each client pre-encodes its
requests, connects and says hello; all then start together behind a barrier and each keeps
``--window`` join requests in flight (pipelining: a new request goes out as each reply comes back).

  (a) channels  each client joins ``--joins`` uniquely named channels (8 x 20,000 = 160K channels)
  (b) one       each client makes ``--joins`` joins of ONE channel, each for a different member it
                hosts on its session (Join.member), so the channel ends with 8 x 20,000 = 160K members.
                The join rate is also measured in windows of ``--rate-window`` joins (all clients
                merged), to compare the rate near 1K members with the rate near 160K members.

Time runs from the barrier to the last reply; a client verifies and reports only once every client
has its last reply (its work would take CPU from the others' last joins). Every join is verified:
each reply is checked (in order, ok, the expected place in the tree); after the run (a)'s clients
look up each of their channels (one member, themselves the root) and (b)'s channel must report
exactly clients x joins members. The controller's memory per member is its VmRSS
(/proc/PID/status) after the joins minus before them (clients connected), divided by the members;
its CPU time per join comes from /proc/PID/stat (user + system, and the system part alone), the
clients' from their own process time. ``--reps`` repetitions (a fresh controller each), medians
printed, JSON saved with every run (per-client rates, all rate windows of (b), the load average
when each run began: other processes on the machine take CPU from the controller and its clients).
``--profile DIR`` adds one cProfile'd repetition per scenario; for a sampling profile attach
``py-spy record --native -p PID`` to the controller (its command line holds --ready-file
.../zipcomm-bench-ctl-...).

Goals (this 2-core machine): (a) >= 44,000 joins/s total; (b) >= 28,000 joins/s total and the rate at
160K members >= 0.8 x the rate at 1K members; <= 10 KiB of controller memory per member.
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._services import Controller  # noqa: E402
from zipcomm.protocol import messages as m  # noqa: E402
from zipcomm.protocol.frames import FrameDecoder, encode_frame  # noqa: E402
from zipcomm.protocol.handshake import Handshake, load_secret  # noqa: E402

GOAL_CHANNELS = 44_000  # joins/s total, scenario (a)
GOAL_ONE = 28_000  # joins/s total, scenario (b)
GOAL_FLAT = 0.8  # rate near the end >= this x rate near 1K members
GOAL_BYTES = 10 * 1024  # controller bytes per member
ONE_CHANNEL = "storm"
KIND, ROLE = "broadcast", "both"
PHASE_TIMEOUT = 600.0  # seconds any one phase may take before the run is declared failed
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- a blocking controller client ---------------------------------------------------------------

class ProtocolClient:
    """One controller session over a blocking socket: handshake, hello, pipelined requests."""

    def __init__(self, address: str, member: int, host: str, secret: bytes | None = None) -> None:
        addr, _, port = address.rpartition(":")
        self.member = member
        self.sock = socket.create_connection((addr, int(port)), timeout=PHASE_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hs = Handshake(is_client=True, secret=secret)
        self.sock.sendall(hs.initial_bytes())
        while not hs.done:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("the controller closed the connection during the handshake")
            reply = hs.receive(data)
            if reply:
                self.sock.sendall(reply)
        self.decoder = FrameDecoder()
        self.backlog = self.decoder.feed(hs.leftover) if hs.leftover else []
        self.send(m.Hello(member=member, address=f"127.0.0.1:{1024 + member % 60000}", host=host))
        welcome = self.next_message()
        if not isinstance(welcome, m.Welcome):
            raise ConnectionError(f"the controller answered {welcome.OP!r} to hello")

    def send(self, msg: m.Message) -> None:
        self.sock.sendall(encode(msg))

    def recv_frames(self) -> list:
        """The frames completed by one receive call (blocks until at least one byte arrives)."""
        if self.backlog:
            frames, self.backlog = self.backlog, []
            return frames
        n = self.sock.recv_into(self.decoder.get_buffer())
        if n == 0:
            raise ConnectionError("the controller closed the connection")
        return self.decoder.buffer_updated(n)

    def next_message(self) -> m.Message:
        while not self.backlog:
            self.backlog = self.recv_frames()
        frame = self.backlog.pop(0)
        return m.decode(frame)

    def request(self, msg: m.Message) -> m.Reply:
        """One request and its reply (pushes and pings in between are skipped)."""
        self.send(msg)
        while True:
            reply = self.next_message()
            if isinstance(reply, m.Reply):
                return reply

    def pipeline(self, requests: list[bytes], window: int, check, on_push=None) -> list[tuple[float, int]]:
        """Send ``requests`` (encoded frames, req ids 1..n in order) keeping ``window`` in flight.

        ``check(index, header)`` validates the reply to request ``index`` (it raises on a bad one);
        ``on_push(header)`` sees every other frame. Returns ``(time, replies so far)`` after every
        receive call that completed a reply."""
        n = len(requests)
        sent = min(window, n)
        self.sock.sendall(b"".join(requests[:sent]))
        answered = 0
        marks: list[tuple[float, int]] = []
        now = time.monotonic
        while answered < n:
            frames = self.recv_frames()
            before = answered
            for frame in frames:
                header = frame.header
                if header["op"] == "reply":
                    if header["req"] != answered + 1:
                        raise AssertionError(f"reply to request {header['req']} arrived when "
                                             f"{answered + 1} was next: replies out of order or lost")
                    check(answered, header)
                    answered += 1
                elif on_push is not None:
                    on_push(header)
            if answered != before:
                marks.append((now(), answered))
                more = min(n - sent, window - (sent - answered))
                if more > 0:
                    self.sock.sendall(b"".join(requests[sent:sent + more]))
                    sent += more
        return marks

    def keep_alive(self) -> None:
        """Idle: drop whatever arrived (pings, pushes) and ping (the controller drops silent sessions)."""
        self.sock.setblocking(False)
        try:
            while self.sock.recv(1 << 16):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self.sock.setblocking(True)
        self.send(m.Ping())

    def close(self) -> None:
        self.sock.close()


def encode(msg: m.Message) -> bytes:
    return b"".join(encode_frame(*msg.to_frame()))


def client_member(index: int) -> int:
    # Distinct per client and per run; bit 62 set like the runtime's ids. Hosted members
    # (scenario b) are member + 1 + i, so clients keep 2^32 ids apart.
    return (1 << 62) | ((os.getpid() & 0xFFFF) << 40) | ((index + 1) << 32)


# --- the client process ---------------------------------------------------------------------------

def client_main(index: int, cfg: dict, prepared, ready, go, finished, done, results) -> None:
    """One client: pre-encode, connect, barrier, pipelined joins, barrier, verify, report, idle until done."""
    try:
        report = _client_run(index, cfg, prepared, ready, go, finished, done, results)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        for barrier in (prepared, ready, go, finished):
            barrier.abort()
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})
        return
    del report


def _client_run(index: int, cfg: dict, prepared, ready, go, finished, done, results) -> dict:
    scenario, joins, window = cfg["scenario"], cfg["joins"], cfg["window"]
    me = client_member(index)
    if scenario == "channels":
        names = [f"c{index}-{i}" for i in range(joins)]
        requests = [encode(m.Join(req=i + 1, channel=names[i], kind=KIND, role=ROLE, epoch_hint=0))
                    for i in range(joins)]
    else:
        requests = [encode(m.Join(req=i + 1, channel=ONE_CHANNEL, kind=KIND, role=ROLE, epoch_hint=0,
                                  member=me + 1 + i)) for i in range(joins)]
    roots = 0
    pushes = 0

    def check(i: int, header: dict) -> None:
        nonlocal roots
        if not header.get("ok"):
            raise AssertionError(f"join {i + 1} refused: {header.get('error')!r} ({header.get('code')})")
        result = header["result"]
        if scenario == "channels":  # a fresh channel: the joiner is its root, alone
            if result["parent"] is not None or result["children"] or result["depth"] != 0:
                raise AssertionError(f"join {i + 1} of a new channel did not make a lone root: {result}")
        elif result["parent"] is None:
            roots += 1  # exactly one join of all clients' makes the root
        elif result["depth"] < 1 or result["children"]:
            raise AssertionError(f"join {i + 1} did not make a leaf: {result}")

    def on_push(header: dict) -> None:
        nonlocal pushes
        if header["op"] == "rewire":
            target = header.get("to")
            if target is None or not me < target <= me + joins:
                raise AssertionError(f"rewire for {target!r} is not for a member of this session")
            pushes += 1
        elif header["op"] != "ping":
            raise AssertionError(f"unexpected {header['op']!r} from the controller")

    prepared.wait(PHASE_TIMEOUT)  # everyone's requests are encoded: connect now, together
    client = ProtocolClient(cfg["address"], me, f"bench-host-{index}")
    ready.wait(PHASE_TIMEOUT)  # the parent reads the controller's memory here
    go.wait(PHASE_TIMEOUT)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    marks = client.pipeline(requests, window, check, on_push)
    t1 = marks[-1][0]
    cpu = time.process_time() - cpu0
    # Verifying and reporting take CPU: not before every client has its last reply, or a client that
    # finished first would slow the others' last joins down (the rate near the last member).
    finished.wait(PHASE_TIMEOUT)

    verified = 0
    if scenario == "channels":  # each channel exists with exactly this client as its only member
        lookups = [encode(m.LookupRoot(req=i + 1, channel=names[i])) for i in range(joins)]

        def check_lookup(i: int, header: dict) -> None:
            nonlocal verified
            result = header.get("result", {})
            if not header.get("ok") or result.get("members") != 1 or result["root"][0] != me:
                raise AssertionError(f"channel {names[i]!r} after the run: {header}")
            verified += 1

        # Request ids restart at 1: the controller echoes whatever the client sends.
        client.pipeline(lookups, window, check_lookup, on_push)
    results.put({"index": index, "member": me, "t0": t0, "t1": t1, "cpu": cpu, "joins": len(marks) and marks[-1][1],
                 "roots": roots, "pushes": pushes, "verified": verified, "marks": marks})
    while not done.wait(0.5):
        client.keep_alive()
    client.close()
    return {}


# --- the parent -----------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def arrival_curve(marks_per_client: list[list[tuple[float, int]]]):
    """All clients' replies merged in time: a function count -> when the count-th reply arrived
    (linear within one receive call, whose replies all arrived together)."""
    events = []
    for marks in marks_per_client:
        prev = 0
        for t, count in marks:
            events.append((t, count - prev))
            prev = count
    events.sort()
    times, totals, total = [], [], 0
    for t, k in events:
        total += k
        times.append(t)
        totals.append(total)

    def time_of(count: int) -> float:
        i = min(bisect.bisect_left(totals, count), len(totals) - 1)
        before_t = times[i - 1] if i else times[0]
        before_n = totals[i - 1] if i else 0
        span = totals[i] - before_n
        return before_t + (times[i] - before_t) * (count - before_n) / span if span else times[i]

    return time_of, total


def window_rates(marks_per_client: list[list[tuple[float, int]]], first: int, width: int) -> list[dict]:
    """The join rate over consecutive windows of ``width`` replies (all clients merged), from reply
    ``first`` on; each window is named by the member counts it spans."""
    time_of, total = arrival_curve(marks_per_client)
    rates = []
    for start in range(first, total - width + 1, width):
        secs = time_of(start + width) - time_of(start)
        rates.append({"from": start, "to": start + width,
                      "joins_per_s": width / secs if secs > 0 else float("inf")})
    return rates


def edge_rates(marks_per_client: list[list[tuple[float, int]]], first: int, width: int, count: int) -> dict:
    """The median rate of ``count`` windows right after member ``first`` and of the last ``count``
    windows (the rate 'near 1K members' and 'near the last member')."""
    time_of, total = arrival_curve(marks_per_client)
    count = max(1, min(count, (total - first) // (2 * width)))
    if count * width * 2 > total - first:
        raise ValueError(f"{total} joins are too few for rate windows of {width} from member {first}")

    def rate(a: int) -> float:
        secs = time_of(a + width) - time_of(a)
        return width / secs if secs > 0 else float("inf")

    starts = [first + i * width for i in range(count)]
    ends = [total - (i + 1) * width for i in range(count)][::-1]
    return {"start_range": [starts[0], starts[-1] + width], "end_range": [ends[0], total],
            "rate_near_start": statistics.median(rate(a) for a in starts),
            "rate_near_end": statistics.median(rate(a) for a in ends)}


class ProfiledController(Controller):
    """The controller CLI run under cProfile, writing its stats to ``pstats`` when it stops."""

    def __init__(self, workdir: Path, pstats: Path) -> None:
        super().__init__(workdir)
        self.pstats = pstats

    def argv(self, ready: Path) -> list[str]:
        argv = super().argv(ready)
        return [argv[0], "-m", "cProfile", "-o", str(self.pstats), *argv[1:]]


def print_profile(pstats_path: Path, top: int) -> None:
    import io
    import pstats
    text = io.StringIO()
    stats = pstats.Stats(str(pstats_path), stream=text)
    stats.sort_stats("tottime").print_stats(top)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("\n".join(["  " + line for line in lines[start - 2:] if line.strip()]))


def run_once(scenario: str, args: argparse.Namespace, workdir: Path, pstats: Path | None = None) -> dict:
    ctl = Controller(workdir) if pstats is None else ProfiledController(workdir, pstats)
    ctl.start()
    pid = ctl.proc.pid
    ctx = mp.get_context("spawn")
    n = args.clients
    prepared, ready, go = ctx.Barrier(n + 1), ctx.Barrier(n + 1), ctx.Barrier(n + 1)
    finished = ctx.Barrier(n)  # the clients' own: every one has its last reply
    done, results = ctx.Event(), ctx.Queue()
    cfg = {"scenario": scenario, "joins": args.joins, "window": args.window, "address": ctl.address}
    procs = [ctx.Process(target=client_main, args=(i, cfg, prepared, ready, go, finished, done, results),
                         daemon=True) for i in range(n)]
    try:
        for p in procs:
            p.start()
        load_before = float("nan")
        out: dict = {"scenario": scenario, "clients": n, "joins_per_client": args.joins, "window": args.window}
        try:
            prepared.wait(PHASE_TIMEOUT)
            ready.wait(PHASE_TIMEOUT)
            rss_before, cpu_before = rss_bytes(pid), cpu_seconds(pid)
            load_before = os.getloadavg()[0]
            go.wait(PHASE_TIMEOUT)
        except Exception:  # a client failed and broke the barrier: its report says why
            pass
        reports = [results.get(timeout=PHASE_TIMEOUT) for _ in procs]
        errors = [f"client {r['index']}: {r['error']}" for r in reports if "error" in r]
        if errors:
            raise RuntimeError("; ".join(errors))
        rss_after, cpu_after = rss_bytes(pid), cpu_seconds(pid)
        reports.sort(key=lambda r: r["index"])
        members = n * args.joins
        joined = sum(r["joins"] for r in reports)
        if joined != members:
            raise RuntimeError(f"{joined} joins answered, expected {members}")
        begin, end = min(r["t0"] for r in reports), max(r["t1"] for r in reports)
        if scenario == "channels":
            verified = sum(r["verified"] for r in reports)
            if verified != members:
                raise RuntimeError(f"{verified} of {members} channels verified after the run")
            on_controller = verified
        else:
            roots = sum(r["roots"] for r in reports)
            if roots != 1:
                raise RuntimeError(f"{roots} joins were told they are the root, expected exactly 1")
            probe = ProtocolClient(ctl.address, 1 << 61, "bench-probe")
            reply = probe.request(m.LookupRoot(req=1, channel=ONE_CHANNEL))
            probe.close()
            on_controller = reply.result.get("members") if reply.ok else None
            if on_controller != members:
                raise RuntimeError(f"the controller reports {on_controller} members of {ONE_CHANNEL!r}, "
                                   f"expected {members}")
        secs = end - begin
        per_client = [r["joins"] / (r["t1"] - r["t0"]) for r in reports]
        out.update(
            joins=joined, members_on_controller=on_controller, seconds=secs, joins_per_s=joined / secs,
            per_client_joins_per_s=per_client, per_client_median=statistics.median(per_client),
            pushes_received=sum(r["pushes"] for r in reports),
            controller_cpu_s=sum(cpu_after) - sum(cpu_before),
            controller_cpu_us_per_join=(sum(cpu_after) - sum(cpu_before)) / joined * 1e6,
            controller_sys_us_per_join=(cpu_after[1] - cpu_before[1]) / joined * 1e6,
            client_cpu_us_per_join=statistics.median(r["cpu"] / r["joins"] * 1e6 for r in reports),
            rss_before=rss_before, rss_after=rss_after, bytes_per_member=(rss_after - rss_before) / members,
        )
        if scenario == "one":
            marks = [r["marks"] for r in reports]
            out["window_rates"] = window_rates(marks, args.rate_from, args.rate_window)
            out.update(edge_rates(marks, args.rate_from, args.rate_window, args.edge_windows))
            out["end_over_start"] = out["rate_near_end"] / out["rate_near_start"]
        out["loadavg_1min"] = [load_before, os.getloadavg()[0]]
        return out
    finally:
        done.set()
        ctl.stop()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def span(r: list[int]) -> str:
    return f"{r[0] / 1000:g}K-{r[1] / 1000:g}K"


def print_table(summary: dict) -> None:
    rows = [("scenario", "joins/s total", "per client (median)", "secs", "ctl CPU us/join",
             "client CPU us/join", "ctl B/member", "goal")]
    for scenario, label, goal in (("channels", "(a) 8x20K channels", GOAL_CHANNELS),
                                  ("one", "(b) 1 channel, 160K members", GOAL_ONE)):
        s = summary.get(scenario)
        if s is None:
            continue
        ok = "met" if s["joins_per_s"] >= goal else "NOT met"
        rows.append((label.replace("8x20K", f"{s['clients']}x{s['joins_per_client'] // 1000}K"),
                     fmt_rate(s["joins_per_s"]), fmt_rate(s["per_client_median"]), f"{s['seconds']:.2f}",
                     f"{s['controller_cpu_us_per_join']:.1f}", f"{s['client_cpu_us_per_join']:.1f}",
                     f"{s['bytes_per_member']:,.0f}", f">= {goal:,}/s {ok}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    one = summary.get("one")
    if one is not None:
        ok = "met" if one["end_over_start"] >= GOAL_FLAT else "NOT met"
        print(f"(b) join rate with {span(one['start_range'])} members {fmt_rate(one['rate_near_start'])}/s, with "
              f"{span(one['end_range'])} members {fmt_rate(one['rate_near_end'])}/s: "
              f"ratio {one['end_over_start']:.2f} (goal >= {GOAL_FLAT}: {ok})")
    worst = max(s["bytes_per_member"] for s in summary.values())
    print(f"controller memory: {worst:,.0f} B per member at most (goal <= {GOAL_BYTES:,} B: "
          f"{'met' if worst <= GOAL_BYTES else 'NOT met'})")


MEDIAN_KEYS = ("joins_per_s", "per_client_median", "seconds", "controller_cpu_us_per_join",
               "controller_sys_us_per_join",
               "client_cpu_us_per_join", "bytes_per_member", "rate_near_start", "rate_near_end",
               "end_over_start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/controller.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="client processes (default %(default)s)")
    p.add_argument("--joins", type=int, default=20_000, help="joins per client (default %(default)s)")
    p.add_argument("--reps", type=int, default=5,
                   help="repetitions, each with a fresh controller; medians are reported (default %(default)s)")
    p.add_argument("--window", type=int, default=256,
                   help="join requests each client keeps in flight (default %(default)s; 1 = wait for "
                        "each reply)")
    p.add_argument("--scenarios", default="channels,one",
                   help="comma-separated: 'channels' (a) and/or 'one' (b) (default %(default)s)")
    p.add_argument("--rate-window", type=int, default=5000,
                   help="(b): joins per window when measuring the rate against the member count "
                        "(default %(default)s; keep it well above clients x --window, the joins in flight, "
                        "or a window sees the bursts of single receive calls)")
    p.add_argument("--rate-from", type=int, default=1000,
                   help="(b): the first window starts at this member count (default %(default)s)")
    p.add_argument("--edge-windows", type=int, default=3,
                   help="(b): windows at each end whose median is the rate 'near --rate-from members' and "
                        "'near the last member' (default %(default)s)")
    p.add_argument("--profile", type=Path, metavar="DIR", default=None,
                   help="run the controller under cProfile in one extra repetition of each scenario (not "
                        "counted in the medians), write DIR/controller-<scenario>.pstats and print the top "
                        "functions by own time")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file to write (default bench/results/controller-<timestamp>.json)")
    args = p.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or set(scenarios) - {"channels", "one"}:
        p.error("--scenarios takes 'channels' and/or 'one'")
    if args.clients < 1 or args.joins < 1 or args.reps < 1 or args.window < 1 or args.rate_window < 1:
        p.error("--clients, --joins, --reps, --window and --rate-window must be positive")
    if "one" in scenarios and args.clients * args.joins - args.rate_from < 2 * args.rate_window:
        p.error(f"(b) needs --clients x --joins >= --rate-from + 2 x --rate-window "
                f"({args.rate_from} + 2 x {args.rate_window}): lower --rate-from / --rate-window")
    if load_secret() is not None:
        p.error("unset ZIPCOMM_SECRET: the benchmark's controller listens on loopback without one")
    out_path = args.out or (Path(__file__).resolve().parent / "results"
                            / f"controller-{time.strftime('%Y%m%d-%H%M%S')}.json")

    runs: dict[str, list[dict]] = {s: [] for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="zipcomm-bench-ctl-") as tmp:
        for rep in range(args.reps):
            for scenario in scenarios:
                res = run_once(scenario, args, Path(tmp))
                runs[scenario].append(res)
                extra = ""
                if scenario == "one":
                    extra = (f", {span(res['start_range'])} members {fmt_rate(res['rate_near_start'])}/s vs "
                             f"{span(res['end_range'])} {fmt_rate(res['rate_near_end'])}/s "
                             f"(x{res['end_over_start']:.2f})")
                extra += f"; load {res['loadavg_1min'][0]:.1f}"
                print(f"rep {rep + 1} {scenario}: {res['joins']:,} joins in {res['seconds']:.2f} s = "
                      f"{fmt_rate(res['joins_per_s'])} joins/s, controller {res['controller_cpu_us_per_join']:.1f}"
                      f" us CPU/join ({res['controller_sys_us_per_join']:.1f} in the kernel), "
                      f"{res['bytes_per_member']:,.0f} B/member{extra}", flush=True)

        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for scenario in scenarios:
                pstats_path = args.profile / f"controller-{scenario}.pstats"
                res = run_once(scenario, args, Path(tmp), pstats_path)
                print(f"\nprofiled {scenario}: {fmt_rate(res['joins_per_s'])} joins/s under cProfile, "
                      f"controller {res['controller_cpu_us_per_join']:.1f} us CPU/join; {pstats_path}:")
                print_profile(pstats_path, 25)

    summary = {}
    for scenario, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in MEDIAN_KEYS if k in rs[0]}
        med.update(clients=args.clients, joins_per_client=args.joins, reps=len(rs))
        if scenario == "one":
            med.update(start_range=rs[0]["start_range"], end_range=rs[0]["end_range"])
        summary[scenario] = med
    print(f"\nmedians of {args.reps} rep(s), {args.clients} clients x {args.joins:,} joins, "
          f"window {args.window}:")
    print_table(summary)
    loads = [r["loadavg_1min"][0] for rs in runs.values() for r in rs]
    print(f"1-minute load average when the runs began: {min(loads):.1f} to {max(loads):.1f} "
          f"({os.cpu_count()} CPUs; other processes take CPU from the controller and its clients)")

    goals = {}
    if "channels" in summary:
        goals["channels_joins_per_s"] = summary["channels"]["joins_per_s"] >= GOAL_CHANNELS
    if "one" in summary:
        goals["one_joins_per_s"] = summary["one"]["joins_per_s"] >= GOAL_ONE
        goals["one_flat"] = summary["one"]["end_over_start"] >= GOAL_FLAT
    goals["bytes_per_member"] = max(s["bytes_per_member"] for s in summary.values()) <= GOAL_BYTES
    from bench._report import machine_info
    doc = {"benchmark": "controller", "argv": sys.argv[1:], "args": {k: str(v) for k, v in vars(args).items()},
           "goals": {"channels_joins_per_s": GOAL_CHANNELS, "one_joins_per_s": GOAL_ONE,
                     "one_end_over_start": GOAL_FLAT, "bytes_per_member": GOAL_BYTES},
           "met": goals, "summary": summary, "runs": runs, "machine": machine_info("uvloop (controller CLI)")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1))
    print(f"saved {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
