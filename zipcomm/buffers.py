"""Large receive buffers, reused."""

from __future__ import annotations

import math
import sys
import weakref

import numpy as np

from .protocol.frames import array_problem
from .protocol.payload import snapshot_payload

__all__ = ["BufferPool", "POOLED_MIN", "snapshot"]

# Received arrays at least this large come from the pool.
POOLED_MIN = 8 << 20


class BufferPool:
    """Large receive buffers kept for reuse. A fresh buffer costs the kernel a zero-filled page
    per page touched, which on this kind of transfer costs more than receiving the bytes; a
    reused one costs nothing. A buffer is reused once nothing but the pool refers to it (the
    arrays handed out and the history's parts are views of it). Bounded by ``max_bytes``:
    beyond it, buffers are plain allocations."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._bufs: list[np.ndarray] = []
        self._bytes = 0
        # Arrays made by ``empty`` and not handed over yet, by id (held weakly).
        self._empties: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 array of ``nbytes`` (its contents are undefined)."""
        bufs = self._bufs
        best = -1
        for i in range(len(bufs)):
            size = bufs[i].nbytes
            # 2: the list's reference and getrefcount's argument: nobody else holds it
            if nbytes <= size <= 2 * nbytes and sys.getrefcount(bufs[i]) == 2 and (
                    best < 0 or size < bufs[best].nbytes):
                best = i
        if best >= 0:
            return bufs[best][:nbytes]
        while self._bytes + nbytes > self.max_bytes:
            free = [i for i in range(len(bufs)) if sys.getrefcount(bufs[i]) == 2]
            if not free:
                return np.empty(nbytes, np.uint8)
            self._bytes -= bufs.pop(free[0]).nbytes
        buf = np.empty(nbytes, np.uint8)
        bufs.append(buf)
        self._bytes += nbytes
        return buf[:]

    def _index(self, buf: object) -> int:
        """The position of ``buf`` among the pool's buffers (by identity), or -1."""
        return next((i for i, b in enumerate(self._bufs) if b is buf), -1)

    def pooled(self, buf: object) -> bool:
        """Whether ``buf`` is one of the pool's buffers."""
        return self._index(buf) >= 0

    def forget(self, buf: object) -> None:
        """Stop keeping ``buf`` if it is one of the pool's buffers: it is freed, not reused,
        once nothing refers to it any more."""
        i = self._index(buf)
        if i >= 0:
            self._bytes -= self._bufs.pop(i).nbytes

    def empty(self, shape: object, dtype: object) -> np.ndarray:
        """A writable array for the application to fill and then send or contribute: a large
        one is handed over without a copy (see :meth:`hand_over`)."""
        dt = np.dtype(dtype)
        dims = _shape(shape)
        if (dt.hasobject or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)
                or dt.itemsize * math.prod(dims) < POOLED_MIN):
            return np.empty(shape, dt)  # (also what refuses a bad shape)
        arr = self.array(dt, dims)
        self._empties[id(arr)] = arr
        return arr

    def hand_over(self, data: object) -> bool:
        """Whether ``data`` is an array of :meth:`empty` handed over for the first time. It is
        zipcomm's from now on, and read-only for the application, which may still read it (the
        same as an array of a host daemon's ``empty()``)."""
        if type(data) is not np.ndarray or self._empties.get(id(data)) is not data:
            return False
        del self._empties[id(data)]
        data.flags.writeable = False
        return True

    def array(self, dtype: np.dtype, shape: list | tuple) -> np.ndarray:
        """An array of ``dtype`` and ``shape`` over a buffer of the pool (contents undefined)."""
        return self.take(dtype.itemsize * math.prod(shape)).view(dtype).reshape(shape)


def _shape(shape: object) -> tuple:
    return tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)


def snapshot(data: object, pool: BufferPool) -> object:
    """A private copy of a payload (checked like any): what zipcomm keeps after the call that sent
    it returned. A large plain array is copied into a buffer of ``pool``, unless it is one of the
    pool's :meth:`~BufferPool.empty` arrays, which is handed over as it is."""
    if type(data) is np.ndarray and data.nbytes >= POOLED_MIN and array_problem(data) is None:
        if pool.hand_over(data):
            return data
        copy = pool.array(data.dtype, data.shape)
        np.copyto(copy, data, casting="no")
        return copy
    return snapshot_payload(data)
