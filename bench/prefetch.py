#!/usr/bin/env python3
"""Minibatch throughput of cirrus's iterator with and without prefetching, against a
store with injected latency (default 10 ms per partition read: a remote object store).

Writes a generated sparse dataset (Criteo-like) into a temporary folder, then streams it
through ``MinibatchIterator`` twice in one run: once fetching one partition at a time on
demand (``prefetch_bytes=0, max_concurrency=1``) and once with prefetching, while the
consumer does a sparse dot product per minibatch (a stand-in for an SGD step). Prints
minibatches/s of both and their ratio; ``--reps`` runs each mode that many times (median).
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
    """A local folder whose reads take ``latency`` seconds more (a remote store's round trip)."""

    def __init__(self, root: str, latency: float) -> None:
        super().__init__(root)
        self.latency = latency

    async def get(self, key: str) -> bytes:
        await asyncio.sleep(self.latency)
        return await super().get(key)


async def stream(root: str, latency: float, batch: int, prefetch: bool, weights: np.ndarray) -> tuple[float, int]:
    ds = await open_dataset(SlowStore(root, latency))
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
    with tempfile.TemporaryDirectory(prefix="cirrus-prefetch-") as tmp:
        manifest = await write_arrays(tmp, data.labels, csr=(data.indptr, data.indices, data.values,
                                                             data.n_features), partition_bytes=args.partition_bytes)
        print(f"dataset: {manifest['n_rows']} rows, {len(manifest['partitions'])} partitions of "
              f"~{args.partition_bytes / 1e6:.2f} MB; store latency {args.latency * 1e3:.0f} ms per read; "
              f"minibatch {args.batch}", flush=True)
        rates: dict[str, list[float]] = {"no prefetch": [], "prefetch": []}
        for _ in range(args.reps):
            for mode in rates:
                secs, n = await stream(tmp, args.latency, args.batch, mode == "prefetch", weights)
                rates[mode].append(n / secs)
        for mode, values in rates.items():
            print(f"{mode:12s} median {statistics.median(values):10.0f} minibatches/s  "
                  f"({', '.join(f'{v:.0f}' for v in values)})")
        ratio = statistics.median(rates["prefetch"]) / statistics.median(rates["no prefetch"])
        print(f"prefetch / no prefetch: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python bench/prefetch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="rows of the generated dataset (default %(default)s)")
    p.add_argument("--hash-bits", type=int, default=18, help="feature hashing bits (default %(default)s)")
    p.add_argument("--partition-bytes", type=int, default=1_000_000,
                   help="partition size in bytes (default %(default)s)")
    p.add_argument("--latency", type=float, default=0.010, help="seconds added to every read (default 0.010)")
    p.add_argument("--batch", type=int, default=20, help="minibatch size (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="runs of each mode; the median is reported (default 3)")
    sys.exit(asyncio.run(main(p.parse_args())))
