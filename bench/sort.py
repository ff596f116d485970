#!/usr/bin/env python3
"""Distributed sort of 100-byte records (thesis section 4.7.1, figure 4.6), with the shuffle done
by zipcomm, by Redis and by S3, side by side in one run.

The input is ``--size`` bytes of records (a 10-byte key and a 90-byte value, random bytes from
``--seed`` with the record's number in the value: every record distinct), generated once into the
dataset store (``--store``: a local folder by default, or ``s3://bucket/prefix``) as input
objects of at most ``--block-size`` each, the same number per worker.  For every repetition and
backend, ``--workers`` fresh worker processes (bench/_sort_worker.py) wait at a barrier, then
time four phases each:

* load: GET my input objects from the store;
* shuffle: range-partition my records by the first two key bytes (vectorized numpy) and send
  each part to the worker of that key range, in rounds of at most ``--chunk`` bytes per worker,
  then wait at a barrier until every worker has all its records;
* sort: sort the received records by key (numpy argsort over the key bytes as big-endian
  integers, then one row gather);
* write: PUT my sorted records to the store.

A phase's figure is the slowest worker's (the JSON also has every worker's wall and CPU
seconds, kernel CPU seconds and minor page faults per phase); end to end is from the first
worker's start to the last worker's end of write; each figure is the median over ``--reps``
repetitions (the backends take turns within every repetition, a different one first each
time).  Every repetition is verified after the timed part: each worker reads its output back;
every output must be sorted and hold one key range, the ranges must be ordered across workers,
and the total record count and the sum of a 64-bit hash of all records must equal the input's.  A repetition that fails verification fails its
backend (exit status 1), it never counts.

Shuffle backends: ``zipcomm`` (a ShuffleChannel, role BOTH, through a controller the run starts;
members connect directly), ``zipcomm-daemon`` (the same with a host daemon the run starts, as a
host runs one for all its jobs: parts for members of the host are partitioned into its shared
memory and handed over by reference), ``redis`` (bench/redis_backend.py's RedisComm over a
redis-server the run starts: SET + polling GETDEL, every key deleted as it is read) and ``s3``
(bench/s3_backend.py's S3Comm over a moto server the run starts).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _launch  # noqa: E402
from bench._backends import redis_worker_cfg, s3_worker_cfg  # noqa: E402
from bench._report import records  # noqa: E402
from bench._services import (ROOT, Controller, Daemon, RedisServer, S3Server,  # noqa: E402
                             ServiceError, zipcomm_import_error)
from cirrus.errors import StorageError  # noqa: E402

RECORD = 100
BACKENDS = ("zipcomm", "zipcomm-daemon", "redis", "s3")
BASELINES = ("zipcomm", "zipcomm-daemon")  # this project's: each gets ratios over the peers
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}
PHASES = ("load", "shuffle", "sort", "write")
GRACE = 20.0
SORT_WORKER = [sys.executable, "-m", "bench._sort_worker"]


class SortError(Exception):
    """A repetition did not verify or did not run."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 100MB, 2GB, 1GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    try:
        import uvloop  # noqa: F401
        default_loop = "uvloop"
    except ImportError:
        default_loop = "asyncio"
    p = argparse.ArgumentParser(
        prog="python bench/sort.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints a table: per backend the median seconds of each phase and end to end;\n"
               "then zipcomm/<peer> and zipcomm-daemon/<peer> for redis and s3, of end to end "
               "and of\nthe shuffle phase, from the same run (< 1: zipcomm is faster); then one "
               "worker's CPU\nseconds per phase, total and in the kernel.  Writes a JSON file with "
               "every worker's\nwall, CPU and kernel CPU seconds and page faults per phase.  Exit "
               "status: 0 when every\nrepetition of every backend ran and verified, 1 otherwise "
               "(also when a backend could\nnot start), 130 on Ctrl-C.")
    p.add_argument("--size", type=parse_size, default=parse_size("2GB"),
                   help="total bytes of records, in B/KB/MB/GB (10^3) or KiB/MiB/GiB "
                        "(default: 2GB)")
    p.add_argument("--workers", type=int, default=8, help="worker processes (default: 8)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per backend (default: 3)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma list of shuffle backends (default: %(default)s)")
    p.add_argument("--store", help="dataset store for the input and output records: a folder or "
                   "s3://bucket/prefix (the bucket must exist; an s3:// store without "
                   "AWS_ENDPOINT_URL in the environment uses the run's own moto server and "
                   "creates the bucket); the run writes under <store>/sort-<run id>/ and deletes "
                   "it at the end (default: a temporary folder)")
    p.add_argument("--chunk", type=parse_size, default=parse_size("100MB"),
                   help="records each worker shuffles per round, in bytes (bounds the data in "
                        "flight); 0 = all in one round (default: 100MB, one input block)")
    p.add_argument("--block-size", type=parse_size, default=parse_size("100MB"),
                   help="largest input and output object (default: 100MB, as the thesis)")
    p.add_argument("--seed", type=int, default=1, help="seed of the records (default: 1)")
    p.add_argument("--daemon-shm-size", default="3G", metavar="SIZE",
                   help="zipcomm-daemon: the host daemon's shared-memory arena; every round's "
                        "parts stay in it until a worker joins them after the last round, so "
                        "it should exceed --size, or the rounds that find it full go over "
                        "sockets (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds a repetition's workers may take before they give up; whatever "
                        f"still runs {GRACE:.0f} s later is killed (default: 900)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop,
                   help="event loop of the workers (default: %(default)s)")
    p.add_argument("--redis-poll-spin-ms", type=float, default=5.0,
                   help="redis: re-poll back to back for this long (default: %(default)s)")
    p.add_argument("--redis-poll-sleep-ms", type=float, default=1.0,
                   help="redis: sleep between polls after that (default: %(default)s)")
    p.add_argument("--s3-poll-spin-ms", type=float, default=2.0,
                   help="s3: re-poll back to back for this long (default: %(default)s)")
    p.add_argument("--s3-poll-sleep-ms", type=float, default=5.0,
                   help="s3: first sleep between polls after that, doubled after every empty "
                        "poll (default: %(default)s)")
    p.add_argument("--s3-poll-max-ms", type=float, default=50.0,
                   help="s3: longest sleep between polls (default: %(default)s)")
    p.add_argument("--out", type=Path, help="JSON output path (default: "
                   "bench/results/sort-<timestamp>.json)")
    return p


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    items = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in items if b not in BACKENDS]
    if bad or not items:
        parser.error(f"unknown backend(s) {bad or args.backends!r}; choose from "
                     f"{','.join(BACKENDS)}")
    args.backends = list(dict.fromkeys(items))
    if not 1 <= args.workers <= 256:
        parser.error("--workers must be between 1 and 256")
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.size < RECORD * args.workers:
        parser.error(f"--size must hold at least one {RECORD}-byte record per worker")
    if args.block_size < RECORD:
        parser.error(f"--block-size must hold at least one {RECORD}-byte record")
    if args.chunk and args.chunk < RECORD:
        parser.error(f"--chunk must be 0 or at least {RECORD} bytes")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.store and "://" in args.store and not args.store.startswith(("s3://", "file://")):
        parser.error(f"--store: unsupported URI {args.store!r} (a folder, file://... or s3://...)")
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = ROOT / "bench" / "results" / f"sort-{stamp}.json"
    return args


def layout(args: argparse.Namespace) -> dict:
    """Records per worker, input blocks per worker, records per block and per shuffle round."""
    total = args.size // RECORD
    per_worker = [total // args.workers + (w < total % args.workers) for w in range(args.workers)]
    block_records = args.block_size // RECORD
    blocks = max(1, math.ceil(max(per_worker) / block_records))
    chunk_records = max(per_worker) if not args.chunk else max(1, args.chunk // RECORD)
    rounds = max(1, math.ceil(max(per_worker) / max(1, chunk_records)))
    return dict(total=total, per_worker=per_worker, blocks=blocks, block_records=block_records,
                chunk_records=chunk_records, rounds=rounds)


async def generate_input(store_uri: str, base: str, args: argparse.Namespace, lay: dict) -> dict:
    """Write every worker's input blocks; return {worker: [keys]}, the count and the checksum."""
    from bench._sort_worker import checksum, generate
    from cirrus.storage import open_store
    inputs: dict[int, list[str]] = {}
    total_sum, count, first = 0, 0, 0
    async with open_store(store_uri) as store:
        for w, n in enumerate(lay["per_worker"]):
            inputs[w] = []
            sizes = [n // lay["blocks"] + (j < n % lay["blocks"]) for j in range(lay["blocks"])]
            for j, m in enumerate(sizes):
                recs = generate(args.seed, w, j, first, m)
                first += m
                total_sum = (total_sum + checksum(recs)) % 2**64
                count += m
                key = f"{base}/input/part-{w:03d}-{j:04d}"
                await store.put(key, recs)
                inputs[w].append(key)
    return {"inputs": inputs, "count": count, "checksum": total_sum}


async def delete_prefix(store_uri: str, prefix: str) -> int:
    from cirrus.storage import open_store
    async with open_store(store_uri) as store:
        keys = await store.list(prefix)
        for key in keys:
            await store.delete(key)
    return len(keys)


async def run_workers(cfgs: list[dict], timeout: float, env: dict[str, str]) -> list[tuple]:
    """Run one ``bench._sort_worker`` per config; kill all as soon as one fails or the deadline
    passes.  Returns (returncode, stdout, stderr) per worker."""
    outputs, _failed, _failure = await _launch.run_workers(cfgs, timeout, env,
                                                           worker=SORT_WORKER)
    return outputs


def evaluate(outputs: list[tuple], n: int, expected: dict, timeout: float) -> dict:
    """Phase figures of one repetition, or SortError naming what is wrong."""
    recs = [records(out) for _rc, out, _err in outputs]
    errors = [r for rs in recs for r in rs if r["type"] == "error"]
    if errors:
        e = errors[0]
        raise SortError(f"worker {e['rank']} in {e['phase']}: {e['error']}")
    bad = [w for w, (rc, _o, _e) in enumerate(outputs) if rc != 0]
    if bad:
        w = bad[0]
        tail = " | ".join(outputs[w][2].decode(errors="replace").strip().splitlines()[-3:])
        what = "killed at the deadline" if outputs[w][0] in (-9, None) else \
            f"exited with code {outputs[w][0]}"
        raise SortError(f"worker {w} {what}" + (f": {tail}" if tail else "")
                        + (f" (deadline {timeout:.0f}s)" if outputs[w][0] == -9 else ""))
    phases = [next((r for r in rs if r["type"] == "phases"), None) for rs in recs]
    results = [next((r for r in rs if r["type"] == "result"), None) for rs in recs]
    if any(p is None for p in phases) or any(r is None for r in results):
        raise SortError("a worker exited without reporting its phases and result")
    # -- verification
    if not all(r["sorted"] for r in results):
        raise SortError(f"output of workers {[r['rank'] for r in results if not r['sorted']]} "
                        f"not sorted")
    held = [r for r in results if r["count"]]
    for r in held:
        if r["classes"] != [r["cls"]]:
            raise SortError(f"worker {r['rank']} holds key ranges {r['classes']}, expected one")
    classes = [r["cls"] for r in held]
    if len(set(classes)) != len(classes):
        raise SortError(f"a key range went to several workers: {sorted(classes)}")
    held.sort(key=lambda r: r["cls"])
    for a, b in zip(held, held[1:]):
        if a["last"] > b["first"]:
            raise SortError(f"boundary out of order: worker {a['rank']} ends at key {a['last']}, "
                            f"worker {b['rank']} (next range) starts at {b['first']}")
    count = sum(r["count"] for r in results)
    total = sum(int(r["checksum"]) for r in results) % 2**64
    if count != expected["count"]:
        raise SortError(f"{count} records in the output, {expected['count']} in the input")
    if total != expected["checksum"]:
        raise SortError(f"checksum of the output {total:#x} != the input's "
                        f"{expected['checksum']:#x}")
    t = [p["t"] for p in phases]
    out = {name: max(ts[i + 1] - ts[i] for ts in t) for i, name in enumerate(PHASES)}
    out["end_to_end"] = max(ts[4] for ts in t) - min(ts[0] for ts in t)
    out["workers"] = [{"rank": p["rank"], **{name: p["t"][i + 1] - p["t"][i]
                                             for i, name in enumerate(PHASES)},
                       **{f"{name}_{what}": p[what][i + 1] - p[what][i]
                          for what in ("cpu", "sys", "minflt") for i, name in enumerate(PHASES)}}
                      for p in phases]
    out["records_per_worker"] = {r["rank"]: r["count"] for r in results}
    return out


class Services:
    """The servers the run starts, each once for the whole run (as a host or a cluster keeps them
    for all its jobs): redis-server, moto, a zipcomm controller and a host daemon.  The daemon's
    arena is reserved page by page when it starts (several seconds for 3G here); restarted for
    every repetition, it would also take the memory the previous repetition's workers had just
    freed, and leave the workers memory that the virtual machine has to fault in afresh."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.redis: RedisServer | None = None
        self.s3: S3Server | None = None
        self.controller: Controller | None = None
        self.daemon: Daemon | None = None
        self.bucket = f"sort-{uuid.uuid4().hex[:12]}"
        self.unavailable: dict[str, str] = {}

    def start(self, need_s3_store: bool) -> None:
        zipcomms = [b for b in self.args.backends if b in BASELINES]
        if zipcomms:
            error = zipcomm_import_error()
            for name in zipcomms if error else ():
                self.unavailable[name] = error
            if not error:
                self._start_zipcomm("zipcomm-daemon" in zipcomms)
        if "redis" in self.args.backends:
            try:
                import redis  # noqa: F401
                self.redis = RedisServer(self.workdir)
                self.redis.start()
            except (ImportError, ServiceError) as exc:
                self.redis = None
                self.unavailable["redis"] = f"{type(exc).__name__}: {exc}"
        if "s3" in self.args.backends or need_s3_store:
            try:
                self.s3 = S3Server(self.workdir)
                self.s3.start()
                self.s3.create_bucket(self.bucket)
            except Exception as exc:
                if self.s3 is not None:
                    self.s3.stop()
                self.s3 = None
                self.unavailable["s3"] = f"{type(exc).__name__}: {exc}"
                if need_s3_store:
                    raise ServiceError(f"the s3:// store needs the moto server: {exc}") from exc

    def _start_zipcomm(self, with_daemon: bool) -> None:
        """The run's controller (both zipcomm backends) and host daemon; a service that does not
        start makes the backends that need it unavailable (and is not kept to be stopped)."""
        try:
            controller = Controller(self.workdir)
            controller.start()
        except ServiceError as exc:
            for name in BASELINES:
                self.unavailable[name] = f"{type(exc).__name__}: {exc}"
            return
        self.controller = controller
        if with_daemon:
            try:
                daemon = Daemon(self.workdir, controller.address, self.args.daemon_shm_size)
                daemon.start()
                self.daemon = daemon
            except ServiceError as exc:
                self.unavailable["zipcomm-daemon"] = f"{type(exc).__name__}: {exc}"

    def cfg(self, backend: str) -> dict:
        if backend == "redis":
            return redis_worker_cfg(self.redis.url, self.args)
        if backend == "s3":
            return s3_worker_cfg(self.bucket, self.s3.client_settings(), self.args)
        if backend in BASELINES:
            return {"controller": self.controller.address}
        return {}

    def env(self, backend: str) -> dict[str, str]:
        """What a worker of ``backend`` gets in its environment on top of the run's."""
        return {"ZIPCOMM_DAEMON": self.daemon.address} if backend == "zipcomm-daemon" else {}

    def leftovers(self, backend: str, prefix: str) -> int:
        """Shuffle objects / keys still in the backend's store after a repetition (deleted)."""
        if backend == "redis":
            return self.redis.keys_left()
        if backend == "s3":
            return self.s3.keys_left(self.bucket, prefix + "/")
        return 0

    def stop(self) -> None:
        for server in (self.redis, self.s3, self.daemon, self.controller):
            if server is not None:
                server.stop()


def run_rep(args, services: Services, backend: str, rep: int, ctx: dict) -> dict:
    prefix = f"sort-{ctx['run_id']}-{backend}-{rep}"
    lay, data = ctx["layout"], ctx["data"]
    base = dict(backend=backend, workers=args.workers, store=ctx["store"], timeout=args.timeout,
                loop=args.loop, prefix=prefix, chunk_records=lay["chunk_records"],
                rounds=lay["rounds"], block_records=lay["block_records"],
                output=f"{ctx['base']}/output/{backend}-{rep}", **services.cfg(backend))
    env = dict(ctx["env"], **services.env(backend))
    cfgs = [dict(base, rank=w, inputs=data["inputs"][w]) for w in range(args.workers)]
    outputs = asyncio.run(run_workers(cfgs, args.timeout + GRACE, env))
    result = evaluate(outputs, args.workers, data, args.timeout)
    left = services.leftovers(backend, prefix)
    if left:
        raise SortError(f"{left} shuffle keys/objects left in {backend} after the repetition")
    return result


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(summary: dict, backends: list[str]) -> str:
    cols = [*PHASES, "end_to_end"]
    lines = [f"{'backend':<15}" + "".join(f"{c + ' s':>14}" for c in cols) + "  reps ok"]
    lines.append("-" * len(lines[0]))
    for b in backends:
        s = summary[b]
        cells = "".join(f"{s[c]:>14.3f}" if s[c] is not None else f"{'-':>14}" for c in cols)
        lines.append(f"{b:<15}{cells}  {s['ok']}/{s['reps']}" +
                     (f"  ({s['error']})" if s["error"] else ""))
    return "\n".join(lines)


def cpu_table(summary: dict, backends: list[str]) -> str:
    """A worker's CPU seconds per phase, of which in the kernel (page faults, socket copies)."""
    lines = [f"{'backend':<15}" + "".join(f"{c + ' cpu/kernel s':>22}" for c in PHASES)]
    lines.append("-" * len(lines[0]))
    for b in backends:
        s = summary[b]
        cells = "".join(f"{s['cpu'][c]:>15.3f} /{s['sys'][c]:>5.2f}" if s["cpu"][c] is not None
                        else f"{'-':>22}" for c in PHASES)
        lines.append(f"{b:<15}{cells}")
    return "\n".join(lines)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    lay = layout(args)
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    runs: dict[str, list[dict]] = {b: [] for b in args.backends}
    interrupted, fatal = False, None
    with tempfile.TemporaryDirectory(prefix="zipcomm-sort-") as tmp:
        workdir = Path(tmp)
        run_id = uuid.uuid4().hex[:8]
        services = Services(args, workdir)
        store = args.store or str(workdir / "store")
        env: dict[str, str] = {}
        need_s3_store = store.startswith("s3://") and not (
            os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"))
        ctx = dict(run_id=run_id, workdir=workdir, store=store, base=f"sort-{run_id}",
                   layout=lay, env=env)
        generated = False
        try:
            services.start(need_s3_store)
            if need_s3_store:  # the store's bucket on the run's own moto server
                env.update(services.s3.env())
                os.environ.update(services.s3.env())
                from urllib.parse import urlparse
                services.s3.create_bucket(urlparse(store).netloc)
            for name, why in services.unavailable.items():
                print(f"{name}: backend unavailable: {why}", flush=True)
            print(f"generating {lay['total']:,} records ({args.size / 1e6:,.0f} MB) in "
                  f"{args.workers} x {lay['blocks']} objects under {store}/{ctx['base']}/ ...",
                  flush=True)
            began = time.perf_counter()
            generated = True
            ctx["data"] = asyncio.run(generate_input(store, ctx["base"], args, lay))
            print(f"  done in {time.perf_counter() - began:.1f} s; {lay['rounds']} shuffle "
                  f"round(s) of at most {lay['chunk_records']:,} records per worker", flush=True)
            for rep in range(args.reps):
                k = rep % len(args.backends)  # the backends take turns within a repetition,
                for backend in args.backends[k:] + args.backends[:k]:  # each leading once
                    entry: dict = {"rep": rep, "status": "failed", "error": None}
                    runs[backend].append(entry)
                    if backend in services.unavailable:
                        entry["error"] = f"backend unavailable: {services.unavailable[backend]}"
                        continue
                    entry["loadavg_before"] = list(os.getloadavg())
                    try:
                        entry.update(run_rep(args, services, backend, rep, ctx))
                        entry["status"] = "ok"
                        print(f"[rep {rep + 1}/{args.reps}] {backend}: end to end "
                              f"{entry['end_to_end']:.3f} s (" + ", ".join(
                                  f"{p} {entry[p]:.3f}" for p in PHASES) + ")", flush=True)
                    except (SortError, ServiceError) as exc:
                        entry["error"] = str(exc)
                        print(f"[rep {rep + 1}/{args.reps}] {backend}: FAILED: {exc}", flush=True)
        except KeyboardInterrupt:
            interrupted = True
        except (ServiceError, StorageError, OSError) as exc:  # the store or its server
            fatal = f"{type(exc).__name__}: {exc}"
            print(f"error: {fatal}", flush=True)
        finally:
            _launch.kill_live()  # only our own workers, by pid
            loadavg_end = list(os.getloadavg())
            if generated:
                try:
                    asyncio.run(delete_prefix(store, ctx["base"] + "/"))
                except Exception as exc:
                    print(f"warning: could not delete {store}/{ctx['base']}/: {exc}", flush=True)
            services.stop()
    summary: dict = {}
    for b in args.backends:
        ok = [e for e in runs[b] if e["status"] == "ok"]
        errors = [e["error"] for e in runs[b] if e["error"]]
        summary[b] = {c: median([e[c] for e in ok]) for c in (*PHASES, "end_to_end")}
        summary[b].update(ok=len(ok), reps=args.reps, error=errors[0] if errors else None)
        for what in ("cpu", "sys"):  # a worker's CPU seconds per phase: median over workers and reps
            summary[b][what] = {c: median([w[f"{c}_{what}"] for e in ok for w in e["workers"]])
                                for c in PHASES}
    ratios = {}
    for base in (b for b in args.backends if b in BASELINES):
        for peer in (b for b in args.backends if b not in BASELINES):
            for c in ("end_to_end", "shuffle"):
                a, p = summary[base][c], summary[peer][c]
                ratios[f"{base}/{peer} {c}"] = round(a / p, 3) if a and p else None
    print("\n" + table(summary, args.backends))
    print("\nCPU seconds of one worker (median over workers and repetitions), total / in the kernel:\n"
          + cpu_table(summary, args.backends))
    if ratios:
        print("\n" + "\n".join(f"{k}: {v if v is not None else '-'}" for k, v in ratios.items())
              + "\n(< 1: zipcomm is faster)")
    report = {"schema": 1, "started": started,
              "finished": dt.datetime.now(dt.timezone.utc).isoformat(), "argv": sys.argv,
              "interrupted": interrupted,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "layout": {k: v for k, v in lay.items() if k != "per_worker"},
              "machine": {"cpus_usable": len(os.sched_getaffinity(0)), "python": sys.version,
                          "loadavg_at_end": loadavg_end},
              "unavailable": services.unavailable, "error": fatal, "summary": summary, "ratios": ratios,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nhost load average at the end: {loadavg_end} (other load on the host inflates the "
          f"timings)\nwrote {args.out}")
    if interrupted:
        return 130
    return 0 if all(s["ok"] == args.reps for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
