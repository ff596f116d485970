#!/usr/bin/env python3
"""Benchmark zipcomm's collectives against its peers (Redis, S3, MPI, gloo), side by side in one run.

Every backend runs the same cells (op, payload size, number of processes n) under the same
conditions, one cell at a time: broadcast from rank 0, reduce (sum) to rank 0, allreduce (sum),
and shuffle (every rank sends each of its int64 items to rank ``item % n``).  Payloads are int64
arrays of at least the given size.  For each cell the ranks run --warmup verified warm-up rounds
and --reps verified timed rounds: broadcast payloads must arrive bit-exact, reduce results must equal
the closed-form sum of all contributions, and each shuffle output must hold exactly the items of
all ranks' inputs that hash to its rank.  A round starts when the root (broadcast) or the first
sender (reduce, allreduce, shuffle) leaves the barrier that precedes it, and ends when the last
rank has its result (a reduce's non-root ranks have theirs when their contribution is on its
way); a second barrier then holds every rank until the last one is done, so no rank checks its
result or builds its next input on the cores while a round is still timed; all times are time.perf_counter() (CLOCK_MONOTONIC, comparable across
processes); a cell's figure is the median over its timed rounds.

The ranks are processes running bench/_worker.py: n separate ones for zipcomm, redis, s3 and
gloo, one ``mpirun -n N`` for mpi.  The script starts what the backends need (a redis-server and
a moto S3 server for the run, a zipcomm controller per cell, a free loopback port per gloo cell);
a backend whose software is missing is reported as "backend unavailable: ..." and skipped.
Backends are registered in BACKENDS in bench/comm.py (bench/_backends.py says how to add one).
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
from bench._backends import LAUNCH_STYLES, Backend, Redis, Zipcomm, ZipcommDaemon  # noqa: E402
from bench._launch import kill_live  # noqa: E402
from bench._report import (BASELINE, UNAVAILABLE, comparisons, machine_info, peers, ratio,  # noqa: E402
                           summarize, table)
from bench._services import ROOT, ServiceError  # noqa: E402
from bench.gloo_backend import Gloo  # noqa: E402
from bench.mpi_backend import Mpi  # noqa: E402
from bench.plot import PlotError, plot  # noqa: E402
from bench.s3_backend import S3  # noqa: E402

# The registry: name -> parent side of the backend (launch style, availability check, services).
BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (Zipcomm, ZipcommDaemon, Redis, Mpi, Gloo, S3)}
OPS = ("broadcast", "reduce", "allreduce", "shuffle")
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}
DEFAULTS = {"sizes": "100B,100MB", "n": "2,4,8,16", "reps": 5, "shuffle_items": "1M", "timeout": 300.0}
QUICK = {"sizes": "100B", "n": "2", "reps": 2, "shuffle_items": "10K", "timeout": 60.0}
GRACE = 20.0  # the parent waits this much longer than the workers' own deadline


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
    listing = "\n".join(f"  {b.name:<8} {b.summary}\n  {'':<8} {LAUNCH_STYLES[b.launch]}; "
                        f"needs: {b.needs}" for b in BACKENDS.values())
    p = argparse.ArgumentParser(
        prog="python bench/comm.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"backends:\n{listing}\n\nPrints a table: every backend's median ms per cell, "
               f"and {BASELINE}/<peer> for every other\nbackend selected (< 1: {BASELINE} is "
               f"faster).  Writes a JSON file with every raw timing, the ratios\nand the machine "
               f"info.  Exit status: 0 when every cell ran and verified (cells of an\nunavailable "
               f"backend are reported but allowed), 1 otherwise, 130 on Ctrl-C.")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma list of backends (default: %(default)s; those unavailable here "
                        "are skipped)")
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
    p.add_argument("--reps", type=int, help=f"timed rounds per cell, after the warm-up rounds "
                   f"(default: {DEFAULTS['reps']}; --quick: {QUICK['reps']})")
    p.add_argument("--zipcomm-root", choices=("rank0", "any"), default="rank0",
                   help="zipcomm broadcast / reduce: rank 0 creates the channel before the others "
                        "join, so it is the tree's root, as MPI's and gloo's root=0 (rank0); or "
                        "all ranks join at once and the first one in is the root (any; rank 0 "
                        "then sends to, or gets the result from, another member) (default: "
                        "%(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="verified, untimed rounds before the "
                   "timed ones, the same for every backend: the figures are of the steady state "
                   "(connections open, receive buffers reused), as MPI benchmarks such as OSU's "
                   "skip their first iterations (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: sizes "
                   f"{QUICK['sizes']}, n={QUICK['n']}, reps={QUICK['reps']}, "
                   f"{QUICK['shuffle_items']} shuffle items (explicit options still win)")
    p.add_argument("--out", type=Path, help="JSON output path (default: "
                   "bench/results/comm-<timestamp>.json)")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="do not draw the figures (by default, time vs n per backend for every "
                        "op and size, PNGs next to the JSON: bench/plot.py)")
    p.add_argument("--install-peers", action="store_true",
                   help="first install the peers that are missing (bench/install-peers.sh: "
                        "redis-server, Open MPI, mpi4py, torch, moto, matplotlib; Debian, as root)")
    p.add_argument("--timeout", type=float, help=f"seconds per cell before its ranks give up "
                   f"(an MPI call cannot); whatever still runs {GRACE:.0f} s later is killed "
                   f"(default: {DEFAULTS['timeout']:.0f}; --quick: {QUICK['timeout']:.0f})")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop,
                   help="event loop of the workers (zipcomm and redis use it; default: "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the shuffle inputs")
    for backend in BACKENDS.values():
        backend.add_options(p)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    table = QUICK if args.quick else DEFAULTS
    for key in ("sizes", "n", "reps", "shuffle_items", "timeout"):
        if getattr(args, key) is None:
            setattr(args, key, table[key])
    args.backends = list(dict.fromkeys(comma_list(args.backends, tuple(BACKENDS), "backend")))
    args.ops = comma_list(args.ops, OPS, "op")
    args.size_list = [(s.strip().upper().replace("I", "i"), parse_size(s))
                      for s in args.sizes.split(",") if s.strip()]
    args.shuffle_items = parse_count(args.shuffle_items)
    try:
        args.n_list = [int(x) for x in args.n.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --n must be a comma list of integers, got {args.n!r}")
    if not args.n_list or min(args.n_list) < 1 or args.reps < 1 or args.warmup < 0 or not args.size_list:
        raise SystemExit("error: need --n >= 1, --reps >= 1, --warmup >= 0 and at least one size")
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


def run_cell(cell: dict, args: argparse.Namespace, ctx: dict) -> None:
    name = cell["backend"]
    if ctx["unavailable"].get(name):
        cell["error"] = f"{UNAVAILABLE}: {ctx['unavailable'][name]}"
        return
    backend: Backend = ctx["backends"][name]
    cfg = dict(backend=name, worker=backend.worker, op=cell["op"], size_bytes=cell["size_bytes"],
               n=cell["n"], reps=cell["reps"], warmup=args.warmup, zipcomm_root=args.zipcomm_root,
               shuffle_items=args.shuffle_items, seed=args.seed,
               timeout=args.timeout, loop=args.loop,
               prefix=f"bench-{ctx['run_id']}-{name}-{cell['op']}-{cell['size_bytes']}-"
                      f"{cell['n']}".replace(" ", ""), **backend.worker_cfg())
    try:
        with backend.cell(cell, cfg):
            cell["loadavg_before"] = list(os.getloadavg())  # other load on the host skews timings
            began = time.perf_counter()
            outputs, failed, failure = asyncio.run(
                backend.run_ranks(cfg, cell["n"], args.timeout + GRACE))
            cell["wall_s"] = round(time.perf_counter() - began, 3)
            summarize(cell, outputs, failed, failure)
            if (cell["error"] or "").startswith(UNAVAILABLE):  # the ranks cannot import it:
                ctx["unavailable"][name] = cell["error"][len(UNAVAILABLE) + 2:]  # skip the rest
    except ServiceError as exc:  # a per-cell service did not start (zipcomm's controller)
        cell["error"] = f"{UNAVAILABLE}: {exc}"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    if args.install_peers:
        subprocess.run([str(ROOT / "bench" / "install-peers.sh")], check=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cells, interrupted = cells_of(args), False
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    with tempfile.TemporaryDirectory(prefix="zipcomm-bench-") as tmp:
        ctx: dict = {"run_id": uuid.uuid4().hex[:8], "workdir": Path(tmp), "unavailable": {},
                     "backends": {}}
        try:
            for name in args.backends:  # availability checks and run-wide services
                ctx["backends"][name] = backend = BACKENDS[name](args, Path(tmp))
                try:
                    backend.start()
                except ServiceError as exc:
                    ctx["unavailable"][name] = str(exc)
                    print(f"{name}: {UNAVAILABLE}: {exc}", flush=True)
            for i, cell in enumerate(cells, 1):
                cell["error"] = "interrupted"  # until run_cell says otherwise
                run_cell(cell, args, ctx)
                result = (f"median {cell['median_ms']:.3f} ms over {cell['reps']} reps"
                          if cell["status"] == "ok" else
                          "skipped" if cell["error"].startswith(UNAVAILABLE) else
                          f"FAILED: {cell['error']}")
                print(f"[{i}/{len(cells)}] {cell['backend']} {cell['op']} {cell['size']} "
                      f"n={cell['n']}: {result}", flush=True)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            kill_live()  # only our own workers and mpirun sessions, by pid
            machine = machine_info(args.loop)
            for backend in ctx["backends"].values():
                try:
                    machine.update(backend.info())
                except Exception as exc:  # the report matters more than one version string
                    machine[f"{backend.name}_info_error"] = f"{type(exc).__name__}: {exc}"
            machine["loadavg_at_end"] = list(os.getloadavg())
            for backend in ctx["backends"].values():
                backend.stop()
    done = [c for c in cells if c["status"] == "ok" or c["error"]]
    print("\n" + table(done, args.backends))
    ratios = []
    index = {(c["op"], c["size"], c["n"], c["backend"]): c for c in done}
    for key in dict.fromkeys((c["op"], c["size"], c["n"]) for c in done):
        ratios.append({"op": key[0], "size": key[1], "n": key[2],
                       **{f"{base}/{peer}": ratio(index, key, peer, base)
                          for base, peer in comparisons(args.backends)}})
    finished = dt.datetime.now(dt.timezone.utc).isoformat()
    report = {"schema": 1, "started": started, "finished": finished,
              "argv": sys.argv, "interrupted": interrupted,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine, "unavailable": ctx["unavailable"], "cells": done,
              "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nhost load average at the end: {machine['loadavg_at_end']} on "
          f"{machine['cpus_usable']} CPUs (other load on the host inflates the timings)")
    print(f"wrote {args.out}")
    if args.plot and done:
        try:
            for path in plot(report, args.out.parent, args.out.stem):
                print(f"wrote {path}")
        except PlotError as exc:  # the results stand without their figures
            print(f"no plots: {exc}")
    if interrupted:
        return 130
    bad = [c for c in done if c["status"] != "ok" and not c["error"].startswith(UNAVAILABLE)]
    return 1 if bad or len(done) < len(cells) else 0


if __name__ == "__main__":
    sys.exit(main())
