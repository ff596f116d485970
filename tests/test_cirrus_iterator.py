"""cirrus.iterator: exact round trip on both backends, bounded prefetch memory, seeded order, cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cirrus.dataset import Partition, open_dataset, write_arrays
from cirrus.errors import PartitionCorrupt
from cirrus.iterator import Minibatch, MinibatchIterator
from cirrus.storage import LocalStore, Store
from test_cirrus_dataset import make_dense, make_sparse
from test_cirrus_storage import moto_server, store_uri  # noqa: F401  (shared fixtures)

pytestmark = [pytest.mark.timeout(60)]


class SlowStore(Store):
    """Wraps a store: every get takes ``delay`` seconds; counts gets and concurrent gets."""

    def __init__(self, inner: Store, delay: float = 0.002) -> None:
        self.inner, self.delay, self.uri = inner, delay, inner.uri
        self.gets: list[str] = []
        self.active = self.max_active = 0

    async def get(self, key: str) -> bytes:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            data = await self.inner.get(key)
            self.gets.append(key)
            return data
        finally:
            self.active -= 1

    async def put(self, key, data):
        await self.inner.put(key, data)

    async def list(self, prefix=""):
        return await self.inner.list(prefix)

    async def delete(self, key):
        await self.inner.delete(key)


def _prefetch_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("cirrus-prefetch-") and not t.done()]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sparse", "dense"])
async def test_iterator_reproduces_every_row(store_uri, kind):
    if kind == "sparse":
        labels, indptr, indices, values, nf = make_sparse(n_rows=3000, seed=5)
        await write_arrays(store_uri, labels, csr=(indptr, indices, values, nf), partition_bytes=30_000)
        expect = Partition(labels, indptr=indptr, indices=indices, values=values, n_features=nf).toarray()
    else:
        labels, expect = make_dense(n_rows=3000, n_features=9, seed=6)
        await write_arrays(store_uri, labels, dense=expect, partition_bytes=30_000)
    async with await open_dataset(store_uri) as ds:
        assert ds.n_partitions >= 4
        got_labels, got_rows, n_batches = [], [], 0
        async with MinibatchIterator(ds, 64, prefetch_bytes=100_000) as it:
            async for mb in it:
                assert isinstance(mb, Minibatch) and mb.kind == kind and 0 < mb.n_rows <= 64
                assert mb.n_features == ds.n_features
                arrays = [mb.labels, mb.dense] if kind == "dense" else [mb.labels, mb.indices, mb.values]
                for a in arrays:  # views into the partition's bytes, no copies
                    assert not a.flags.owndata and not a.flags.writeable
                if kind == "sparse":
                    assert mb.indptr[0] == 0 and mb.indptr[-1] == mb.indices.shape[0]
                got_labels.append(mb.labels)
                got_rows.append(mb.toarray())
                n_batches += 1
            assert it.partitions_fetched == ds.n_partitions and it.bytes_in_flight == 0
    assert np.array_equal(np.concatenate(got_labels), labels)
    assert np.array_equal(np.concatenate(got_rows), expect)
    assert n_batches >= 3000 // 64


@pytest.mark.asyncio
async def test_memory_bound_while_streaming_10x_the_bound(tmp_path):
    labels, indptr, indices, values, nf = make_sparse(n_rows=8000, seed=9)
    await write_arrays(tmp_path, labels, csr=(indptr, indices, values, nf), partition_bytes=8_000)
    async with await open_dataset(tmp_path) as ds:
        ds.store = slow = SlowStore(ds.store, delay=0.001)
        total = sum(ds.partition_nbytes(i) for i in range(ds.n_partitions))
        biggest = max(ds.partition_nbytes(i) for i in range(ds.n_partitions))
        bound = 25_000
        assert total >= 10 * bound and ds.n_partitions >= 40
        rows = 0
        samples = []
        async with MinibatchIterator(ds, 50, prefetch_bytes=bound, max_concurrency=2) as it:
            async for mb in it:
                rows += mb.n_rows
                samples.append(it.bytes_in_flight)
                if mb.partition % 3 == 0:
                    await asyncio.sleep(0.001)  # a consumer slower than the store at times
            assert rows == ds.n_rows
            assert max(samples) <= it.max_bytes_in_flight <= bound + biggest
            assert it.max_bytes_in_flight > biggest  # it did prefetch beyond the current partition
        assert slow.max_active <= 2 and len(slow.gets) == ds.n_partitions


@pytest.mark.asyncio
async def test_partition_bigger_than_the_bound(tmp_path):
    labels, dense = make_dense(n_rows=500, n_features=20)
    await write_arrays(tmp_path, labels, dense=dense, partition_bytes=20_000)
    async with await open_dataset(tmp_path) as ds:
        biggest = max(ds.partition_nbytes(i) for i in range(ds.n_partitions))
        async with MinibatchIterator(ds, 32, prefetch_bytes=0) as it:
            got = [mb.dense async for mb in it]
        assert np.array_equal(np.concatenate(got), dense)
        assert it.max_bytes_in_flight == biggest  # one partition at a time, no deadlock


@pytest.mark.asyncio
async def test_random_order_is_seeded_and_covers_each_partition_once_per_epoch(tmp_path):
    labels, dense = make_dense(n_rows=1200, n_features=4)
    await write_arrays(tmp_path, labels, dense=dense, partition_bytes=2_000)

    async def visit(seed, epochs=3, order="random"):
        async with await open_dataset(tmp_path) as ds:
            seen = []
            async with MinibatchIterator(ds, 1000, order=order, seed=seed, epochs=epochs,
                                         prefetch_bytes=10_000) as it:
                async for mb in it:
                    assert mb.start == 0  # batch bigger than a partition: one batch per partition
                    seen.append((mb.epoch, mb.partition, mb.labels.copy()))
            return ds.n_partitions, seen, it

    n, a, it = await visit(seed=1)
    assert n >= 20 and len(a) == 3 * n
    for e in range(3):
        order = [p for ep, p, _ in a if ep == e]
        assert sorted(order) == list(range(n)) and order == it.partition_order(e)
    orders = [[p for ep, p, _ in a if ep == e] for e in range(3)]
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(n))
    _, b, _ = await visit(seed=1)
    assert [(e, p) for e, p, _ in a] == [(e, p) for e, p, _ in b]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(a, b))
    _, c, _ = await visit(seed=2)
    assert [p for _, p, _ in c] != [p for _, p, _ in a]
    _, s, _ = await visit(seed=1, epochs=2, order="sequential")
    assert [p for _, p, _ in s] == list(range(n)) * 2
    # labels of partition p are the same rows whatever the order
    by_part = {p: lab for _, p, lab in s}
    assert all(np.array_equal(lab, by_part[p]) for _, p, lab in a)


@pytest.mark.asyncio
async def test_aclose_cancels_background_fetches(tmp_path):
    labels, dense = make_dense(n_rows=2000, n_features=10)
    await write_arrays(tmp_path, labels, dense=dense, partition_bytes=4_000)
    async with await open_dataset(tmp_path) as ds:
        ds.store = SlowStore(ds.store, delay=0.05)
        it = MinibatchIterator(ds, 10, prefetch_bytes=40_000, epochs=None)
        mb = await it.__anext__()
        assert mb.n_rows == 10 and len(_prefetch_tasks()) > 1 and it.bytes_in_flight > 0
        await it.aclose()
        assert _prefetch_tasks() == [] and it.bytes_in_flight == 0 and it.closed
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()

        # breaking out of `async with` early, and cancelling a consumer blocked on a fetch
        async with MinibatchIterator(ds, 10, prefetch_bytes=40_000) as it:
            async for mb in it:
                break
        assert _prefetch_tasks() == []

        it = MinibatchIterator(ds, 10_000, prefetch_bytes=40_000)

        async def consume():
            async for _ in it:
                pass

        task = asyncio.create_task(consume())
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10
        while not _prefetch_tasks():  # poll until the consumer has fetches in flight
            assert loop.time() < give_up, "the iterator started no prefetch"
            await asyncio.sleep(0.001)
        assert _prefetch_tasks()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await it.aclose()
        assert _prefetch_tasks() == [] and it.bytes_in_flight == 0


@pytest.mark.asyncio
async def test_corrupt_partition_stops_the_iterator_cleanly(tmp_path):
    labels, indptr, indices, values, nf = make_sparse(n_rows=1000)
    await write_arrays(tmp_path, labels, csr=(indptr, indices, values, nf), partition_bytes=5_000)
    store = LocalStore(tmp_path)
    async with await open_dataset(tmp_path) as ds:
        key = ds.manifest["partitions"][3]["key"]
        data = bytearray(await store.get(key))
        data[-1] ^= 0x10
        await store.put(key, bytes(data))
        rows = 0
        it = MinibatchIterator(ds, 25, prefetch_bytes=30_000)
        with pytest.raises(PartitionCorrupt) as ei:
            async for mb in it:
                assert mb.partition < 3
                rows += mb.n_rows
        assert key in str(ei.value) and rows == sum(ds.partition_rows(i) for i in range(3))
        assert it.closed and _prefetch_tasks() == [] and it.bytes_in_flight == 0


@pytest.mark.asyncio
async def test_iterator_arguments_and_empty_dataset(tmp_path):
    await write_arrays(tmp_path, np.empty(0), dense=np.empty((0, 3)))
    async with await open_dataset(tmp_path) as ds:
        assert ds.n_partitions == 0
        assert [mb async for mb in MinibatchIterator(ds, 4, epochs=None)] == []
        for kw in ({"batch_size": 0}, {"batch_size": 1, "order": "shuffled"}, {"batch_size": 1, "epochs": -1},
                   {"batch_size": 1, "prefetch_bytes": -1}, {"batch_size": 1, "max_concurrency": 0}):
            with pytest.raises(ValueError):
                MinibatchIterator(ds, **kw)
    labels, dense = make_dense(n_rows=100, n_features=3)
    await write_arrays(tmp_path / "d", labels, dense=dense, partition_bytes=1_000)
    async with await open_dataset(tmp_path / "d") as ds:
        sizes = [mb.n_rows async for mb in MinibatchIterator(ds, 16, drop_last=True)]
        assert sizes and set(sizes) == {16}


_RSS_PROBE = r"""
import asyncio, json, sys
from cirrus import open_dataset, MinibatchIterator

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

async def main(uri, bound):
    async with await open_dataset(uri) as ds:
        it = MinibatchIterator(ds, 200, prefetch_bytes=bound, max_concurrency=4)
        first = await it.__anext__()            # everything imported and started: the baseline
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                        # reset the peak (VmHWM) to the current RSS
        base = status("VmRSS")
        rows = first.n_rows
        async for mb in it:
            rows += mb.n_rows
        await it.aclose()
        print(json.dumps({"rows": rows, "growth": status("VmHWM") - base, "total": sum(
            ds.partition_nbytes(i) for i in range(ds.n_partitions)),
            "biggest": max(ds.partition_nbytes(i) for i in range(ds.n_partitions))}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_measured_rss_stays_under_the_bound_while_streaming_10x_it(tmp_path):
    """The process's peak resident memory while streaming a 100 MB dataset through an iterator
    bounded at 8 MB grows by at most the bound, one partition and a fixed allowance — far less
    than the dataset (which an iterator that kept its partitions would hold)."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    n, d = 400_000, 60
    x = rng.standard_normal((n, d)).astype(np.float32)
    asyncio.run(write_arrays(str(tmp_path / "big"), rng.integers(0, 2, n).astype(np.float32), dense=x,
                             partition_bytes=2_000_000))
    del x
    bound = 8 << 20
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "big"), str(bound)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    print("rss growth", got)
    assert got["rows"] == n and got["total"] >= 10 * bound
    assert got["growth"] <= bound + got["biggest"] + (16 << 20), got
