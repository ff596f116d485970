"""``python -m cirrus.ps``: run the sharded parameter server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from zipcomm._entry import run, write_ready_file
from zipcomm.protocol.handshake import load_secret
from zipcomm.transport.connection import parse_address, refuse_open_listen

from .shard import Shard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cirrus.ps",
        description="Run cirrus's parameter server: model tables sharded by row (feature index) over "
                    "--shards processes (row r on shard r %% k), per-coordinate optimizers, at-most-once "
                    "pushes per (worker, incarnation, step), retired incarnations refused, bounded "
                    "staleness, a key-value store, and periodic checkpoints to a dataset store. Without "
                    "--shard it starts every shard as its own process and prints their addresses as one "
                    "JSON line; with --shard I it runs that one shard. Stops on SIGINT / SIGTERM.")
    p.add_argument("--shards", type=int, default=1, metavar="K", help="number of shards (default: 1)")
    p.add_argument("--shard", type=int, default=None, metavar="I", help="run only shard I of K")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="address of a single shard (--shard); port 0 picks a free one (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="interface the shards listen on when all are "
                   "started (default: %(default)s; free ports)")
    p.add_argument("--checkpoint", metavar="URI", default=None,
                   help="folder or s3://bucket/prefix for checkpoints (default: none)")
    p.add_argument("--checkpoint-every", type=float, default=0.0, metavar="SECONDS",
                   help="write a checkpoint this often (default: 0 = only on request)")
    p.add_argument("--resume", action="store_true", help="load the shard's checkpoint at start, if any")
    p.add_argument("--max-staleness", type=int, default=None, metavar="N",
                   help="refuse pushes computed on a model more than N updates old (default: no bound)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="file (mode 0600) holding the shared secret clients must prove (HMAC); default: "
                        "$ZIPCOMM_SECRET. A non-loopback address without a secret is refused.")
    p.add_argument("--ready-file", metavar="FILE",
                   help="write the address(es) as JSON to FILE once listening (for scripts and tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="log checkpoints and resumes")
    return p


def _check(args: argparse.Namespace) -> str | None:
    if args.shards < 1:
        return "--shards must be >= 1"
    if args.shard is not None and not 0 <= args.shard < args.shards:
        return f"--shard must be in 0..{args.shards - 1}"
    if args.checkpoint_every < 0:
        return "--checkpoint-every must be >= 0"
    if args.checkpoint_every > 0 and not args.checkpoint:
        return "--checkpoint-every needs --checkpoint"
    if args.resume and not args.checkpoint:
        return "--resume needs --checkpoint"
    if args.max_staleness is not None and args.max_staleness < 0:
        return "--max-staleness must be >= 0"
    return None


def _one(args: argparse.Namespace) -> int:
    async def serve(stop: asyncio.Event) -> int:
        shard = Shard(args.shard, args.shards, max_staleness=args.max_staleness,
                      checkpoint_uri=args.checkpoint, checkpoint_every=args.checkpoint_every)
        address = await shard.start(args.listen, resume=args.resume, secret=args.secret)
        if args.ready_file:
            write_ready_file(args.ready_file, json.dumps({"shards": [address]}))
        try:
            await stop.wait()
        finally:
            await shard.aclose()
        return 0

    return run(serve, verbose=args.verbose)


def _all(args: argparse.Namespace) -> int:
    """Start K shard processes, report their addresses, stop them together."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the clean-up below on SIGTERM too
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-ps-") as tmp:
        try:
            for i in range(args.shards):
                cmd = [sys.executable, "-m", "cirrus.ps", "--shards", str(args.shards), "--shard", str(i),
                       "--listen", f"{args.host}:0", "--ready-file", os.path.join(tmp, f"{i}.json")]
                if args.secret_file:
                    cmd += ["--secret-file", args.secret_file]
                if args.checkpoint:
                    cmd += ["--checkpoint", args.checkpoint, "--checkpoint-every", str(args.checkpoint_every)]
                if args.resume:
                    cmd.append("--resume")
                if args.max_staleness is not None:
                    cmd += ["--max-staleness", str(args.max_staleness)]
                procs.append(subprocess.Popen(cmd))
            addresses = []
            deadline = time.monotonic() + 30
            for i, p in enumerate(procs):
                path = os.path.join(tmp, f"{i}.json")
                while not os.path.exists(path):
                    if p.poll() is not None:
                        print(f"error: shard {i} exited with code {p.returncode}", file=sys.stderr)
                        return 1
                    if time.monotonic() > deadline:
                        print(f"error: shard {i} did not start within 30 s", file=sys.stderr)
                        return 1
                    time.sleep(0.02)
                with open(path) as f:
                    addresses += json.load(f)["shards"]
            line = json.dumps({"shards": addresses})
            if args.ready_file:
                write_ready_file(args.ready_file, line)
            print(line, flush=True)
            while all(p.poll() is None for p in procs):  # one shard gone = the server is gone
                time.sleep(0.1)
            dead = [i for i, p in enumerate(procs) if p.returncode is not None]
            print(f"shard(s) {dead} exited (code {procs[dead[0]].returncode}); stopping the others",
                  file=sys.stderr)
            return 1
        except (KeyboardInterrupt, SystemExit):
            return 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the process that started us dies, so no shard outlives its
    supervisor and no supervisor outlives the program that started it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was already gone before prctl
            sys.exit(0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        args.secret = load_secret(path=args.secret_file)
        kind, where = parse_address(args.listen if args.shard is not None else f"{args.host}:0")
        if kind == "tcp":
            refuse_open_listen(where[0], args.secret, "the parameter server")  # type: ignore[index]
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shard is not None or os.environ.get("CIRRUS_PS_DIE_WITH_PARENT") == "1":
        _die_with_parent()
    return _one(args) if args.shard is not None else _all(args)


if __name__ == "__main__":
    sys.exit(main())
