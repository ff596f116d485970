"""``python -m zipcomm.daemon``: run the per-host daemon."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys

from .._entry import run, write_ready_file
from ..transport.connection import is_loopback
from ..errors import ZipError
from ..protocol.handshake import load_secret
from .server import Daemon

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 1G)")
    size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size < 1 << 20:
        raise argparse.ArgumentTypeError("the arena needs at least 1M")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zipcomm.daemon",
        description=(
            "Run the zipcomm daemon of this host. Members started with ZIPCOMM_DAEMON=<socket> "
            "send their broadcast and reduce traffic through it: the daemon is the host's one "
            "member of each channel tree (data crosses each host once), keeps large arrays in a "
            "shared-memory arena that local members map read-only (no copy), and combines the "
            "local contributions of a reduce in place before one partial goes up. A shuffle "
            "partitions into the arena and hands the parts for members of this host over by "
            "reference; its parts for other hosts, and reduces with a custom function, go over "
            "direct links. If the daemon dies, members fall back to direct connections. Run "
            "one per host for all its jobs: the arena's pages are reserved when it starts."
        ),
        epilog="Segments are named zc_d_<128-bit random>, mode 0600, listed in <socket>.segments; "
               "a daemon started after a crash removes those its predecessor left.",
    )
    p.add_argument("--controller", default=os.environ.get("ZIPCOMM_CONTROLLER"), metavar="HOST:PORT",
                   help="the controller (default: $ZIPCOMM_CONTROLLER)")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="Unix socket for local members (created mode 0600; give members "
                        "ZIPCOMM_DAEMON=PATH)")
    p.add_argument("--shm-size", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="size of the shared-memory arena, e.g. 512M, 2G (default 1G); it is "
                        "reserved at start, so a full /dev/shm is found then, not later")
    p.add_argument("--listen-host", default="127.0.0.1", metavar="HOST",
                   help="address the daemon accepts peer connections on (default 127.0.0.1; use "
                        "this host's address for a multi-host cluster: requires a secret)")
    p.add_argument("--host-id", metavar="NAME", help="this host's name in the cluster (default: hostname)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="file (mode 0600) holding the cluster secret; members must present the "
                        "same secret to use the daemon (default: $ZIPCOMM_SECRET)")
    p.add_argument("--ready-file", metavar="FILE",
                   help="write the socket path to FILE once serving (for scripts and tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="log sessions and channel changes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.controller:
        print("error: no controller: pass --controller HOST:PORT or set ZIPCOMM_CONTROLLER", file=sys.stderr)
        return 2
    try:
        secret = load_secret(path=args.secret_file)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if secret is None and not is_loopback(args.listen_host):
        print(f"error: refusing to listen on non-loopback {args.listen_host} without a secret "
              "(set ZIPCOMM_SECRET or --secret-file)", file=sys.stderr)
        return 2

    async def serve(stop: asyncio.Event) -> int:
        try:
            daemon = Daemon(args.controller, args.socket, shm_size=args.shm_size, secret=secret,
                            listen_host=args.listen_host, host_id=args.host_id)
            await daemon.start()
        except (ZipError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            arena = f"arena {daemon.arena.name} ({daemon.arena.size} bytes)" if daemon.arena else "no arena"
            print(f"zipcomm daemon serving {daemon.socket_path}, {arena}", flush=True)
            if args.ready_file:
                write_ready_file(args.ready_file, daemon.socket_path)
            await stop.wait()
        finally:
            await daemon.aclose()
        return 0

    return run(serve, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
