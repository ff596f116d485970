"""Prefetching minibatch iterator with bounded memory.

::

    async with await open_dataset(uri) as ds:
        async with MinibatchIterator(ds, 20, prefetch_bytes=64 << 20, order="random", seed=worker_id,
                                     epochs=3) as it:
            async for mb in it:      # mb.labels, and mb.dense or mb.indptr / mb.indices / mb.values
                ...

Partitions are fetched ahead in background tasks (at most ``max_concurrency`` requests at once). The
bytes the iterator holds — partitions being fetched or fetched and waiting, plus the one it is cutting
minibatches from — never exceed ``prefetch_bytes`` plus one partition: the waiting/fetching ones stay
within ``prefetch_bytes``, except that one partition larger than ``prefetch_bytes`` is fetched when the
iterator holds nothing else. ``bytes_in_flight`` is the current figure, ``max_bytes_in_flight`` the
largest seen (sizes are the encoded partition sizes from the manifest; decoded arrays are views over
those bytes, so this is the memory the iterator keeps alive).

Minibatches never span two partitions (the last one of a partition may be smaller than ``batch_size``;
``drop_last=True`` skips those). Their arrays are read-only views into the partition's bytes; a CSR
minibatch's ``indptr`` is rebased to start at 0 (a copy of ``batch_size + 1`` integers).

``partitions=[...]`` restricts the iterator to those partitions (e.g. a training split).
``order="random"``: each epoch visits every (chosen) partition exactly once, in an order drawn from
``(seed, epoch)`` — give each worker its own seed. ``epochs=None`` repeats forever.

``aclose()`` (or leaving ``async with``) cancels and awaits every background fetch. A failed fetch
(missing or corrupt partition) is raised when its turn comes, after the iterator closed itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .dataset import Dataset, Partition

__all__ = ["Minibatch", "MinibatchIterator"]


@dataclass(eq=False)
class Minibatch(Partition):
    """A :class:`Partition` slice plus where it came from."""

    partition: int = -1
    start: int = 0
    epoch: int = 0


class MinibatchIterator:
    def __init__(self, dataset: Dataset, batch_size: int, *, prefetch_bytes: int = 64 << 20,
                 order: str = "sequential", seed: int = 0, epochs: int | None = 1,
                 max_concurrency: int = 4, drop_last: bool = False,
                 partitions: list[int] | None = None) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be > 0")
        if prefetch_bytes < 0:
            raise ValueError("prefetch_bytes must be >= 0")
        if order not in ("sequential", "random"):
            raise ValueError(f"order must be 'sequential' or 'random', not {order!r}")
        if epochs is not None and epochs < 0:
            raise ValueError("epochs must be >= 0 or None (forever)")
        if max_concurrency <= 0:
            raise ValueError("max_concurrency must be > 0")
        if partitions is not None:
            partitions = [int(i) for i in partitions]
            bad = [i for i in partitions if not 0 <= i < dataset.n_partitions]
            if bad:
                raise ValueError(f"partitions {bad[:5]} out of range 0..{dataset.n_partitions - 1}")
        self.partitions = partitions
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.prefetch_bytes = int(prefetch_bytes)
        self.order = order
        self.seed = seed
        self.epochs = epochs
        self.max_concurrency = max_concurrency
        self.drop_last = drop_last

        self._schedule = self._make_schedule()
        self._next: tuple[int, int] | None = next(self._schedule, None)
        self._pending: deque[tuple[int, int, int, asyncio.Task[Partition]]] = deque()
        self._reserved = 0          # bytes of partitions being fetched / fetched and waiting
        self._current: Partition | None = None
        self._current_nbytes = 0
        self._cur_index = -1
        self._cur_epoch = 0
        self._pos = 0
        self._sem: asyncio.Semaphore | None = None
        self._closed = False
        self.max_bytes_in_flight = 0
        self.partitions_fetched = 0

    # -- schedule ------------------------------------------------------------------------------------
    def partition_order(self, epoch: int) -> list[int]:
        """The order in which partitions are visited in ``epoch``."""
        chosen = self.partitions if self.partitions is not None else list(range(self.dataset.n_partitions))
        if self.order == "sequential":
            return list(chosen)
        perm = np.random.default_rng([int(self.seed), int(epoch)]).permutation(len(chosen))
        return [chosen[i] for i in perm]

    def _make_schedule(self) -> Iterator[tuple[int, int]]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            if not self.partition_order(epoch):
                return
            for i in self.partition_order(epoch):
                yield epoch, i
            epoch += 1

    # -- accounting ----------------------------------------------------------------------------------
    @property
    def bytes_in_flight(self) -> int:
        """Bytes held now: partitions fetching / waiting plus the current one."""
        return self._reserved + self._current_nbytes

    @property
    def closed(self) -> bool:
        return self._closed

    def _note(self) -> None:
        b = self.bytes_in_flight
        if b > self.max_bytes_in_flight:
            self.max_bytes_in_flight = b

    async def _fetch(self, index: int) -> Partition:
        assert self._sem is not None
        async with self._sem:
            return await self.dataset.read_partition(index)

    def _fill(self) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        while self._next is not None and not self._closed:
            epoch, index = self._next
            nb = self.dataset.partition_nbytes(index)
            idle = not self._pending and self._current is None
            if self._reserved + nb > self.prefetch_bytes and not idle:
                break
            task = asyncio.create_task(self._fetch(index), name=f"cirrus-prefetch-{index}")
            self._pending.append((epoch, index, nb, task))
            self._reserved += nb
            self._next = next(self._schedule, None)
        self._note()

    # -- iteration -----------------------------------------------------------------------------------
    def __aiter__(self) -> MinibatchIterator:
        return self

    async def __anext__(self) -> Minibatch:
        while True:
            if self._closed:
                raise StopAsyncIteration
            p = self._current
            if p is not None:
                n = p.n_rows
                if self._pos < n and not (self.drop_last and n - self._pos < self.batch_size):
                    return self._cut(p)
                self._current, self._current_nbytes = None, 0   # release the spent partition
            self._fill()
            if not self._pending:
                self._closed = True
                raise StopAsyncIteration
            epoch, index, nb, task = self._pending[0]
            try:
                part = await task
            except BaseException:
                await self.aclose()
                raise
            self._pending.popleft()
            self._reserved -= nb
            self._current, self._current_nbytes = part, nb
            self._cur_index, self._cur_epoch, self._pos = index, epoch, 0
            self.partitions_fetched += 1
            self._fill()

    def _cut(self, p: Partition) -> Minibatch:
        start = self._pos
        stop = min(start + self.batch_size, p.n_rows)
        self._pos = stop
        # The partition was validated when decoded, so its slices are valid: build the minibatch
        # without re-running Partition's checks (this is the per-minibatch hot path).
        mb = object.__new__(Minibatch)
        d = mb.__dict__
        d.update(labels=p.labels[start:stop], n_features=p.n_features, partition=self._cur_index,
                 start=start, epoch=self._cur_epoch)
        if p.dense is not None:
            d.update(dense=p.dense[start:stop], indptr=None, indices=None, values=None)
            return mb
        ip = p.indptr
        assert ip is not None and p.indices is not None and p.values is not None
        lo, hi = int(ip[start]), int(ip[stop])
        d.update(dense=None, indptr=ip[start:stop + 1] - lo, indices=p.indices[lo:hi], values=p.values[lo:hi])
        return mb

    async def aclose(self) -> None:
        """Cancel and await every background fetch; release what the iterator holds."""
        self._closed = True
        tasks = [t for *_, t in self._pending]
        self._pending.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._reserved = 0
        self._current, self._current_nbytes = None, 0
        self._next = None

    async def __aenter__(self) -> MinibatchIterator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (f"MinibatchIterator({self.dataset.uri!r}, batch_size={self.batch_size}, order={self.order}, "
                f"in_flight={self.bytes_in_flight}/{self.prefetch_bytes})")
