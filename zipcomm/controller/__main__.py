"""``python -m zipcomm.controller``: run the membership controller."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys

from .._entry import run, write_ready_file
from ..protocol.handshake import load_secret
from ..transport.connection import is_loopback, parse_address
from .server import MAX_HOSTED_MEMBERS, Controller


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zipcomm.controller",
        description=(
            "Run the zipcomm controller: it keeps channel membership and the tree of peer "
            "connections of every channel, and tells members how to re-wire when others join, "
            "leave or fail. It is never on a data path."
        ),
    )
    p.add_argument("--listen", default="127.0.0.1:7000", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:7000; port 0 picks a free port). "
                        "A non-loopback address requires a secret.")
    p.add_argument("--secret-file", metavar="FILE",
                   help="file (mode 0600) holding the shared secret for HMAC authentication; "
                        "the environment variable ZIPCOMM_SECRET is used when this is not given")
    p.add_argument("--fanout", type=int, default=4, help="children per tree node (default 4)")
    p.add_argument("--depth-slack", type=int, default=1,
                   help="re-balance a channel tree when its depth exceeds the ideal by more than this (default 1)")
    p.add_argument("--heartbeat", type=float, default=1.0,
                   help="seconds between heartbeats expected from members (default 1.0)")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="drop a member silent for this many seconds (default 5.0)")
    p.add_argument("--max-hosted-members", type=int, default=MAX_HOSTED_MEMBERS, metavar="N",
                   help="members one session may host besides its own, for processes that hold many "
                        "handles of a channel (Join.member; default %(default)s); further joins are refused")
    p.add_argument("--ready-file", metavar="FILE",
                   help="write the bound HOST:PORT to FILE once listening (for scripts and tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="log membership changes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fanout < 2:
        print("error: --fanout must be at least 2", file=sys.stderr)
        return 2
    if args.max_hosted_members < 0:
        print("error: --max-hosted-members must be at least 0", file=sys.stderr)
        return 2
    try:
        kind, where = parse_address(args.listen)
        secret = load_secret(path=args.secret_file)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if kind == "tcp" and secret is None and not is_loopback(where[0]):
        print(f"error: refusing to listen on non-loopback {args.listen} without a secret "
              "(set ZIPCOMM_SECRET or --secret-file)", file=sys.stderr)
        return 2

    # The controller holds many long-lived small objects (members, trees) and makes few cycles:
    # what it has at start-up is frozen out of the collector, and the youngest generation is
    # collected every 50,000 allocations instead of every 700 (a join storm otherwise spends
    # about a tenth of its time re-walking the membership).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

    async def serve(stop: asyncio.Event) -> int:
        async with Controller(args.listen, secret=secret, fanout=args.fanout, depth_slack=args.depth_slack,
                              heartbeat=args.heartbeat, heartbeat_timeout=args.heartbeat_timeout,
                              max_hosted_members=args.max_hosted_members) as ctl:
            print(f"zipcomm controller listening on {ctl.address}", flush=True)
            if args.ready_file:
                write_ready_file(args.ready_file, ctl.address)
            await stop.wait()
        return 0

    return run(serve, verbose=args.verbose)




if __name__ == "__main__":
    sys.exit(main())
