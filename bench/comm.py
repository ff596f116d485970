#!/usr/bin/env python3
"""Benchmark zipcomm's collectives against the same API implemented over Redis.

The Redis baseline is the one of the thesis (section 4.7): senders SET keys in one Redis server,
receivers poll GET until the keys are there (see bench/redis_backend.py).  This script starts its
own redis-server (and, for zipcomm, a controller), then for every cell (backend, op, size, n)
spawns n worker processes (bench/_worker.py) that run one verified warm-up round and --reps
verified timed rounds.  A round starts when the root (broadcast) or the first sender (reduce,
allreduce, shuffle) leaves the barrier that precedes it, and ends when the last rank has its
result; all times are time.perf_counter() (CLOCK_MONOTONIC, comparable across processes).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._report import machine_info, ratio, summarize, table  # noqa: E402
from bench._services import (ROOT, Controller, RedisServer, ServiceError,  # noqa: E402
                             child_env, zipcomm_import_error)

BACKENDS = ("zipcomm", "redis")
OPS = ("broadcast", "reduce", "allreduce", "shuffle")
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}
DEFAULTS = {"sizes": "100B,100MB", "n": "2,4,8", "reps": 5, "shuffle_items": "1M", "timeout": 300.0}
QUICK = {"sizes": "100B,4KB", "n": "2", "reps": 2, "shuffle_items": "10K", "timeout": 60.0}
GRACE = 20.0  # the parent waits this much longer than the workers' own deadline
LIVE_PIDS: set[int] = set()


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 100B, 4KB, 100MB, 1MiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def parse_count(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"bad count {text!r} (e.g. 1000000, 10K, 1M)")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6}[m.group(2).lower()])


def count_label(count: int) -> str:
    for div, suffix in ((10**6, "M"), (10**3, "K")):
        if count >= div and count % div == 0:
            return f"{count // div}{suffix}"
    return str(count)


def comma_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"error: unknown {what} {bad or text!r}; choose from {','.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    try:
        import uvloop  # noqa: F401
        default_loop = "uvloop"
    except ImportError:
        default_loop = "asyncio"
    p = argparse.ArgumentParser(
        prog="python bench/comm.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints a table (median ms per cell, and the zipcomm/redis ratio) and writes a JSON "
               "file with every raw timing and the machine info.\nExit status: 0 when every cell "
               "ran and verified (cells failing only because zipcomm is unavailable are reported "
               "but allowed), 1 otherwise, 130 on Ctrl-C.")
    p.add_argument("--backends", default="zipcomm,redis",
                   help="comma list of backends: zipcomm,redis (default: %(default)s)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of operations "
                   "(default: %(default)s)")
    p.add_argument("--sizes", help=f"comma list of payload sizes for broadcast/reduce/allreduce, "
                   f"in B/KB/MB/GB (10^3) or KiB/MiB/GiB; arrays of int64 of at least that many "
                   f"bytes (default: {DEFAULTS['sizes']}; --quick: {QUICK['sizes']})")
    p.add_argument("--shuffle-items", type=parse_count, help=f"int64 items per member for "
                   f"shuffle, which ignores --sizes (default: {DEFAULTS['shuffle_items']}; "
                   f"--quick: {QUICK['shuffle_items']})")
    p.add_argument("--n", help=f"comma list of process counts (default: {DEFAULTS['n']}; "
                   f"--quick: {QUICK['n']})")
    p.add_argument("--reps", type=int, help=f"timed rounds per cell, after one warm-up round "
                   f"(default: {DEFAULTS['reps']}; --quick: {QUICK['reps']})")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: sizes "
                   f"{QUICK['sizes']}, n={QUICK['n']}, reps={QUICK['reps']}, "
                   f"{QUICK['shuffle_items']} shuffle items (explicit options still win)")
    p.add_argument("--out", type=Path, help="JSON output path (default: "
                   "bench/results/comm-<timestamp>.json)")
    p.add_argument("--timeout", type=float, help=f"seconds per cell before its workers give up "
                   f"and are killed (default: {DEFAULTS['timeout']:.0f}; "
                   f"--quick: {QUICK['timeout']:.0f})")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop,
                   help="event loop of the workers (default: %(default)s)")
    p.add_argument("--redis-poll-spin-ms", type=float, default=5.0, help="redis backend: re-poll "
                   "back to back for this long before backing off (default: %(default)s)")
    p.add_argument("--redis-poll-sleep-ms", type=float, default=1.0, help="redis backend: sleep "
                   "between polls after the spin phase; 0 = never sleep (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the shuffle inputs")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    table = QUICK if args.quick else DEFAULTS
    for key in ("sizes", "n", "reps", "shuffle_items", "timeout"):
        if getattr(args, key) is None:
            setattr(args, key, table[key])
    args.backends = comma_list(args.backends, BACKENDS, "backend")
    args.ops = comma_list(args.ops, OPS, "op")
    args.size_list = [(s.strip().upper().replace("I", "i"), parse_size(s))
                      for s in args.sizes.split(",") if s.strip()]
    args.shuffle_items = parse_count(args.shuffle_items)
    try:
        args.n_list = [int(x) for x in args.n.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --n must be a comma list of integers, got {args.n!r}")
    if not args.n_list or min(args.n_list) < 1 or args.reps < 1 or not args.size_list:
        raise SystemExit("error: need --n >= 1, --reps >= 1 and at least one size")
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = ROOT / "bench" / "results" / f"comm-{stamp}.json"
    return args


def cells_of(args: argparse.Namespace) -> list[dict]:
    out = []
    for op in args.ops:
        sizes = ([(f"{count_label(args.shuffle_items)} int64", args.shuffle_items * 8)]
                 if op == "shuffle" else args.size_list)
        for label, nbytes in sizes:
            for n in args.n_list:
                for backend in args.backends:  # backends side by side, under the same conditions
                    out.append(dict(backend=backend, op=op, size=label, size_bytes=nbytes, n=n,
                                    reps=args.reps, status="failed", error=None, median_ms=None))
    return out


async def run_workers(cfgs: list[dict], timeout: float) -> tuple[list[tuple], list[int], str]:
    """Run one worker per config; kill all as soon as one fails or the deadline passes.

    Returns (returncode, stdout, stderr) per rank, the ranks in the order they failed, and a
    failure description ("" if all exited with 0)."""
    loop = asyncio.get_running_loop()
    procs, failed, failure = [], [], ""
    try:
        for cfg in cfgs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench._worker", json.dumps(cfg), cwd=ROOT, env=child_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(proc)
            LIVE_PIDS.add(proc.pid)
        tasks = [asyncio.ensure_future(p.communicate()) for p in procs]
        pending, end = set(tasks), loop.time() + timeout
        while pending and not failure:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, end - loop.time()),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                alive = [i for i, p in enumerate(procs) if p.returncode is None]
                failure = f"timeout: ranks {alive} still running after {timeout:.0f}s, killed"
            for task in done:
                rank = tasks.index(task)
                if procs[rank].returncode != 0:
                    failed.append(rank)
                    failure = failure or f"rank {rank} exited with code {procs[rank].returncode}"
        for proc in procs:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        results = await asyncio.gather(*tasks)
        return [(p.returncode, o, e) for p, (o, e) in zip(procs, results)], failed, failure
    finally:
        for proc in procs:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
                await proc.wait()
            LIVE_PIDS.discard(proc.pid)


def run_cell(cell: dict, args: argparse.Namespace, ctx: dict) -> None:
    backend = cell["backend"]
    if ctx["unavailable"].get(backend):
        cell["error"] = f"backend unavailable: {ctx['unavailable'][backend]}"
        return
    cfg = dict(backend=backend, op=cell["op"], size_bytes=cell["size_bytes"], n=cell["n"],
               reps=cell["reps"], shuffle_items=args.shuffle_items, seed=args.seed,
               timeout=args.timeout, loop=args.loop, poll_spin=args.redis_poll_spin_ms / 1e3,
               poll_sleep=args.redis_poll_sleep_ms / 1e3,
               prefix=f"bench-{ctx['run_id']}-{backend}-{cell['op']}-{cell['size_bytes']}-"
                      f"{cell['n']}".replace(" ", ""))
    controller = None
    try:
        if backend == "zipcomm":
            controller = Controller(ctx["workdir"])
            try:
                controller.start()
            except ServiceError as exc:
                cell["error"] = f"backend unavailable: {exc}"
                return
            cfg["controller"] = controller.address
        else:
            cfg["redis_url"] = ctx["redis"].url
        cell["loadavg_before"] = list(os.getloadavg())  # other load on the host skews timings
        began = time.perf_counter()
        outputs, failed, failure = asyncio.run(
            run_workers([dict(cfg, rank=r) for r in range(cell["n"])], args.timeout + GRACE))
        cell["wall_s"] = round(time.perf_counter() - began, 3)
        summarize(cell, outputs, failed, failure)
    finally:
        if controller is not None:
            controller.stop()
        if backend == "redis" and ctx.get("redis") is not None:
            try:
                cell["redis_keys_left"] = ctx["redis"].keys_left()
            except Exception as exc:  # the server died: note it, the next cells will fail too
                cell["redis_keys_left"] = None
                cell["error"] = cell["error"] or f"redis-server unreachable after the cell: {exc}"
                cell["status"] = "failed"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cells, redis, interrupted = cells_of(args), None, False
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    with tempfile.TemporaryDirectory(prefix="zipcomm-bench-") as tmp:
        ctx = {"run_id": uuid.uuid4().hex[:8], "workdir": Path(tmp), "unavailable": {}}
        try:
            if "zipcomm" in args.backends:
                ctx["unavailable"]["zipcomm"] = zipcomm_import_error()
            if "redis" in args.backends:
                redis = RedisServer(Path(tmp))
                try:
                    redis.start()
                    ctx["redis"] = redis
                except ServiceError as exc:
                    ctx["unavailable"]["redis"] = str(exc)
            for i, cell in enumerate(cells, 1):
                cell["error"] = "interrupted"  # until run_cell says otherwise
                run_cell(cell, args, ctx)
                result = (f"median {cell['median_ms']:.3f} ms over {cell['reps']} reps"
                          if cell["status"] == "ok" else f"FAILED: {cell['error']}")
                print(f"[{i}/{len(cells)}] {cell['backend']} {cell['op']} {cell['size']} "
                      f"n={cell['n']}: {result}", flush=True)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            for pid in list(LIVE_PIDS):  # only our own workers, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            machine = machine_info(args.loop, redis)
            machine["loadavg_at_end"] = list(os.getloadavg())
            if ctx.get("redis") is not None:
                try:
                    machine["redis_memory_at_end"] = redis.memory_info()
                except Exception:
                    pass
            if redis is not None:
                redis.stop()
    done = [c for c in cells if c["status"] == "ok" or c["error"]]
    print("\n" + table(done, args.backends))
    ratios = []
    index = {(c["op"], c["size"], c["n"], c["backend"]): c for c in done}
    for key in dict.fromkeys((c["op"], c["size"], c["n"]) for c in done):
        ratios.append({"op": key[0], "size": key[1], "n": key[2],
                       "zipcomm/redis": ratio(index, key)})
    finished = dt.datetime.now(dt.timezone.utc).isoformat()
    report = {"schema": 1, "started": started, "finished": finished,
              "argv": sys.argv, "interrupted": interrupted,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine, "cells": done, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nhost load average at the end: {machine['loadavg_at_end']} on "
          f"{machine['cpus_usable']} CPUs (other load on the host inflates the timings)")
    print(f"wrote {args.out}")
    if interrupted:
        return 130
    bad = [c for c in done if c["status"] != "ok" and not (
        c["backend"] == "zipcomm" and c["error"].startswith("backend unavailable"))]
    return 1 if bad or len(done) < len(cells) else 0


if __name__ == "__main__":
    sys.exit(main())
