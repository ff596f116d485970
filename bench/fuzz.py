"""Long frame-fuzzing run against every zipcomm endpoint (controller, member peer port, host daemon
socket, parameter-server shard).

    python bench/fuzz.py --frames 1000000 --seconds 300 [--seed N] [--concurrency 32]

The endpoints run in a child process (``python -m zipcomm.testing.fuzz serve``) with the monitor
installed in *their* event loop, so the stall figure is the servers' own: the fuzzer's CPU time,
in this process, is never counted as a server stall. Health probes (a member joining a channel,
a PS ``pull``, legit handshakes on the member port and the daemon socket) run from this process
during the run and once after it.

Prints frames, frames/s, uncaught exceptions, max event-loop stall and RSS growth (per endpoint
where it is per endpoint: the four servers share one process, so stalls, exceptions and RSS are
for that process), and exits 1 if an invariant fails: fewer than --frames frames, any uncaught
exception (loop exception handler or an ERROR record of the zipcomm/cirrus loggers), a stall over
--max-stall-ms, RSS growth over --max-rss-mib, or a failed health probe. Every failure line names
the seed that replays the frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from zipcomm.testing.fuzz import run_fuzz  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1_000_000, help="frames to send in all (default 1000000)")
    p.add_argument("--seconds", type=float, default=300.0, help="time limit of the run (default 300)")
    p.add_argument("--seed", type=int, default=None, help="seed of the generators (default: from the clock)")
    p.add_argument("--concurrency", type=int, default=32, help="connections open at once (default 32)")
    p.add_argument("--health-interval", type=float, default=0.5, help="seconds between health probes (default 0.5)")
    p.add_argument("--max-stall-ms", type=float, default=100.0, help="stall limit in ms (default 100)")
    p.add_argument("--max-rss-mib", type=float, default=64.0, help="RSS growth limit in MiB (default 64)")
    p.add_argument("--allow-protocol-error-logs", action="store_true",
                   help="do not count ERROR records whose exception is a zipcomm ProtocolError "
                        "(a peer's bad frame logged with a traceback) as uncaught exceptions")
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON here")
    return p.parse_args(argv)


async def _run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zipcomm.testing.fuzz", "serve", cwd=str(ROOT), env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        eps = json.loads(line)["endpoints"]
        print(f"seed={seed} endpoints: {eps} (servers in pid {proc.pid})", flush=True)

        def progress(r) -> None:
            print(f"  {r.seconds:6.1f}s {r.frames:9d} frames {r.frames_per_second:8.0f}/s", flush=True)

        result = await run_fuzz(eps, seed=seed, frames=args.frames, seconds=args.seconds,
                                concurrency=args.concurrency, health_interval=args.health_interval,
                                progress=progress)
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
        report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
    finally:
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    s = result.summary()
    proto = sum(n for sig, n in report["signatures"].items() if sig.startswith("protocol-error-logged"))
    uncaught = report["uncaught"] - (proto if args.allow_protocol_error_logs else 0)
    print(f"\nseed={seed}: {s['frames']} frames in {s['seconds']} s = {s['frames_per_s']} frames/s")
    print(f"{'endpoint':<12}{'frames':>10}{'MiB':>8}{'conns':>8}{'closed by server':>18}{'stuck':>7}"
          f"{'health ok/fail':>16}{'worst probe s':>15}")
    for kind, e in s["endpoints"].items():
        h = s["health_during"]
        print(f"{kind:<12}{e['frames']:>10}{e['bytes'] / 2**20:>8.1f}{e['connections']:>8}{e['closed_by_server']:>18}"
              f"{e['stuck']:>7}{h['passed'].get(kind, 0):>9}/{h['failed'].get(kind, 0):<6}"
              f"{h['worst_s'].get(kind, 0):>15}")
    print(f"servers' process: uncaught exceptions {report['uncaught']} "
          f"({proto} of them protocol errors logged with a traceback), "
          f"protocol-error warnings {report['protocol_warnings']}, "
          f"max event-loop stall {report['max_stall'] * 1e3:.1f} ms (loop thread CPU in it "
          f"{report['max_stall_cpu'] * 1e3:.1f} ms; {report['stalls_over_100ms']} over 100 ms), "
          f"RSS {report['rss_before'] / 2**20:.1f} -> {report['rss_after'] / 2**20:.1f} MiB "
          f"(growth {report['rss_growth'] / 2**20:.1f} MiB)")
    for kind, e in s["endpoints"].items():
        for sample in e["stuck_samples"]:
            print(f"  stuck connection on {kind}: {sample}")
    for sig, n in sorted(report["signatures"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:7d} x {sig}")
    shown = set()
    for f in report["failures"]:
        if f["signature"] not in shown and not f["signature"].startswith("protocol-error-logged"):
            shown.add(f["signature"])
            print(f"--- first {f['signature']} (seed={seed}):\n{f['message']}\n{f['traceback']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": s, "servers": report}, indent=1, default=str))

    failures = []
    if result.frames < args.frames:
        failures.append(f"only {result.frames} frames in {args.seconds} s (wanted {args.frames})")
    if uncaught:
        failures.append(f"{uncaught} uncaught exceptions in the servers")
    if report["max_stall"] * 1e3 > args.max_stall_ms:
        failures.append(f"max event-loop stall {report['max_stall'] * 1e3:.1f} ms > {args.max_stall_ms} ms")
    if report["rss_growth"] > args.max_rss_mib * 2**20:
        failures.append(f"RSS grew {report['rss_growth'] / 2**20:.1f} MiB > {args.max_rss_mib} MiB")
    if sum(s["health_during"]["failed"].values()) or not s["health_after_ok"]:
        failures.append(f"health probes failed: {s['health_during']['errors']} after-ok={s['health_after_ok']}")
    for f in failures:
        print(f"FAIL (seed={seed}): {f}")
    if not failures:
        print(f"OK (seed={seed})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_run(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
