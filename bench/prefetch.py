#!/usr/bin/env python3
"""Minibatch throughput of cirrus's iterator with and without prefetching, against a
store with injected latency (default 10 ms per partition read: a remote object store).

Writes a generated sparse dataset (Criteo-like) into a temporary folder for each partition size,
then streams it through ``MinibatchIterator`` twice in one run: once fetching one partition at a time on
demand (``prefetch_bytes=0, max_concurrency=1``) and once with prefetching, while the
consumer does a sparse dot product per minibatch (a stand-in for an SGD step). Prints
minibatches/s of both and their ratio per partition size; ``--reps`` runs each mode that many
times (median). Prefetching hides the store's time behind the consumer's work, so the gain is
bounded by (read time + work per partition) / work per partition: it is largest when a read
costs more than consuming the partition (small partitions, slow store, light work).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cirrus import MinibatchIterator, open_dataset, write_arrays  # noqa: E402
from cirrus.generators import criteo_like  # noqa: E402
from cirrus.storage import LocalStore  # noqa: E402


class SlowStore(LocalStore):
    """A local folder whose reads take ``latency`` seconds more (a remote store's round trip) and,
    with ``bandwidth`` (bytes/s per request) set, size / bandwidth more (one connection's throughput)."""

    def __init__(self, root: str, latency: float, bandwidth: float = 0.0) -> None:
        super().__init__(root)
        self.latency = latency
        self.bandwidth = bandwidth

    async def get(self, key: str) -> bytes:
        began = time.perf_counter()
        data = await super().get(key)
        delay = self.latency + (len(data) / self.bandwidth if self.bandwidth else 0.0)
        await asyncio.sleep(max(0.0, delay - (time.perf_counter() - began)))
        return data


async def stream(root: str, latency: float, batch: int, prefetch: bool, weights: np.ndarray,
                 bandwidth: float = 0.0) -> tuple[float, int]:
    ds = await open_dataset(SlowStore(root, latency, bandwidth))
    kwargs = dict(prefetch_bytes=64 << 20, max_concurrency=8) if prefetch else \
        dict(prefetch_bytes=0, max_concurrency=1)
    n = 0
    began = time.perf_counter()
    async with MinibatchIterator(ds, batch, **kwargs) as it:
        async for mb in it:
            # the consumer's work: margins of the minibatch under a weight vector
            np.add.reduceat(weights[mb.indices] * mb.values, mb.indptr[:-1]) if mb.nnz else None
            n += 1
    return time.perf_counter() - began, n


async def main(args: argparse.Namespace) -> int:
    data, _ = criteo_like(args.rows, hash_bits=args.hash_bits, seed=1)
    weights = np.random.default_rng(0).standard_normal(data.n_features).astype(np.float32)
    sizes = [int(float(x)) for x in args.partition_bytes.split(",")]
    bandwidth = args.bandwidth * 1e6
    print(f"dataset: {data.n_rows} rows (Criteo-like, 2^{args.hash_bits} features); store latency "
          f"{args.latency * 1e3:.0f} ms per read" + (f" + size / {args.bandwidth:g} MB/s" if bandwidth else "")
          + f"; minibatch {args.batch}; median of {args.reps} runs", flush=True)
    print(f"{'partition':>10s} {'parts':>6s} {'no prefetch mb/s':>17s} {'prefetch mb/s':>14s} {'ratio':>6s}")
    ratios = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="cirrus-prefetch-") as tmp:
            manifest = await write_arrays(tmp, data.labels, csr=(data.indptr, data.indices, data.values,
                                                                 data.n_features), partition_bytes=size)
            rates: dict[str, list[float]] = {"no prefetch": [], "prefetch": []}
            for _ in range(args.reps):
                for mode in rates:
                    secs, n = await stream(tmp, args.latency, args.batch, mode == "prefetch", weights, bandwidth)
                    rates[mode].append(n / secs)
            slow, fast = statistics.median(rates["no prefetch"]), statistics.median(rates["prefetch"])
            ratios.append(fast / slow)
            print(f"{size / 1e6:8.2f}MB {len(manifest['partitions']):6d} {slow:17.0f} {fast:14.0f} "
                  f"{fast / slow:5.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python bench/prefetch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="rows of the generated dataset (default %(default)s)")
    p.add_argument("--hash-bits", type=int, default=18, help="feature hashing bits (default %(default)s)")
    p.add_argument("--partition-bytes", default="250000,1000000,10000000",
                   help="partition sizes in bytes, comma-separated; one row each (default %(default)s)")
    p.add_argument("--bandwidth", type=float, default=0.0,
                   help="MB/s of one read (a remote store's per-connection throughput); 0 = unlimited "
                        "(default), so only --latency is injected")
    p.add_argument("--latency", type=float, default=0.010, help="seconds added to every read (default 0.010)")
    p.add_argument("--batch", type=int, default=20, help="minibatch size (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="runs of each mode; the median is reported (default 3)")
    sys.exit(asyncio.run(main(p.parse_args())))
