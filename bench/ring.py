#!/usr/bin/env python3
"""Micro-benchmark of the SPSC ring (zipcomm.ring): the C ring against its pure-Python twin.

One process pushes records of --size bytes into a ring of --capacity bytes until it is full (or
--batch records are in), pops them all, and repeats until --n records went through; the best of
--repeat runs is reported as records/s (push + pop), with the C / Python ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zipcomm.ring import CRing, PyRing, memory_size  # noqa: E402

IMPLS = {"c": CRing, "python": PyRing}


def run(cls, n: int, size: int, capacity: int, batch: int, into: bool) -> float:
    """Seconds to push and pop ``n`` records of ``size`` bytes; checks every record."""
    ring = cls.create(bytearray(memory_size(capacity)))
    record = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    out = bytearray(size)
    done = 0
    start = time.perf_counter()
    while done < n:
        todo = min(batch, n - done)
        pushed = 0
        while pushed < todo and ring.push(record):
            pushed += 1
        if pushed == 0:
            raise SystemExit(f"a {size}-byte record does not fit an empty ring of {capacity} bytes")
        if into:
            for _ in range(pushed):
                ring.pop_into(out)
        else:
            for _ in range(pushed):
                ring.pop()
        done += pushed
    elapsed = time.perf_counter() - start
    last = out if into else ring.pop() if ring.push(record) else None
    if bytes(last) != record:
        raise SystemExit(f"{cls.implementation}: a record came back changed")
    ring.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000,
                        help="records pushed and popped per run (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64,
                        help="payload bytes per record (default: %(default)s)")
    parser.add_argument("--capacity", type=int, default=1 << 16,
                        help="bytes in the ring's data area (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256,
                        help="records pushed before they are popped (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per implementation; the best counts (default: %(default)s)")
    parser.add_argument("--into", action="store_true",
                        help="pop with pop_into() into a reused buffer instead of pop()")
    parser.add_argument("--impls", default="c,python",
                        help="comma-separated implementations among c, python (default: %(default)s)")
    args = parser.parse_args(argv)
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = [name for name in impls if name not in IMPLS]
    if unknown or not impls:
        parser.error(f"--impls: unknown implementation(s) {unknown}; choose among c, python")
    if min(args.n, args.size + 1, args.capacity, args.batch, args.repeat) < 1:
        parser.error("--n, --capacity, --batch and --repeat must be positive, --size >= 0")

    rates: dict[str, float] = {}
    print(f"{args.n} records of {args.size} B through a {args.capacity} B ring, "
          f"batches of {args.batch}, {'pop_into' if args.into else 'pop'}, best of {args.repeat}")
    print(f"{'impl':<8} {'seconds':>9} {'records/s':>12} {'MB/s':>9}")
    for name in impls:
        try:
            best = min(run(IMPLS[name], args.n, args.size, args.capacity, args.batch, args.into)
                       for _ in range(args.repeat))
        except ImportError as exc:
            print(f"{name:<8} unavailable: {exc}")
            continue
        rates[name] = args.n / best
        print(f"{name:<8} {best:>9.3f} {rates[name]:>12,.0f} {rates[name] * args.size / 1e6:>9.1f}")
    if "c" in rates and "python" in rates:
        print(f"c / python: {rates['c'] / rates['python']:.2f}x the records per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
