"""The shuffle's partition: split data into ``n`` parts by ``hash_function``, keeping item order.

A numpy array is partitioned vectorized: ``hash_function(array, n)`` returns one bucket index per
row, and the rows are placed by a stable counting partition — one pass counts the rows of each
bucket, a second copies every row to its bucket's next slot (C, ``csrc/scatter.c``, through the
cffi extension ``zipcomm._scatter_c``).  That is two linear passes, against the sort a stable
``argsort`` by bucket costs.  Without the extension (or with ``ZIPCOMM_SCATTER=numpy``) the same
result comes from numpy: the bucket array narrowed to 8 or 16 bits so that the stable argsort is
a radix sort, then one gather.

The parts are views into one new array (never the caller's buffer: a part may still be on its
way after the call returns).  Lists are partitioned item by item.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

__all__ = ["partition", "partition_array", "IMPLEMENTATION"]

try:
    from . import _scatter_c  # type: ignore[attr-defined]
except ImportError:  # not built: the numpy path
    _scatter_c = None

_choice = os.environ.get("ZIPCOMM_SCATTER", "").lower()
if _choice not in ("", "c", "numpy"):
    raise ImportError(f"ZIPCOMM_SCATTER must be 'c' or 'numpy', got {_choice!r}")
if _choice == "c" and _scatter_c is None:
    raise ImportError("ZIPCOMM_SCATTER=c but the extension zipcomm._scatter_c is not built "
                      "(pip install -e . builds it)")
#: "c" or "numpy": the implementation :func:`partition_array` uses
IMPLEMENTATION = "numpy" if _choice == "numpy" or _scatter_c is None else "c"


def _buckets(data: np.ndarray, hash_function: Callable, n: int) -> np.ndarray:
    idx = np.asarray(hash_function(data, n))
    if idx.shape != (len(data),) or idx.dtype.kind not in "iu":
        raise TypeError("hash_function(array, n) must return an integer array with one index per row")
    return idx


def _out_of_range(n: int, value: Any) -> ValueError:
    return ValueError(f"hash_function returned {value}, an index outside [0, {n})")


def partition_array(data: np.ndarray, idx: np.ndarray, n: int,
                    out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(gathered, counts)``: the rows of ``data`` grouped by bucket ``idx`` (stable), and the
    number of rows per bucket.  ``gathered`` is ``out`` if given (a writable C-contiguous array
    of ``data``'s shape and dtype, e.g. shared memory), else a new array."""
    if out is not None and (out.shape != data.shape or out.dtype != data.dtype
                            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous {data.dtype} array of shape {data.shape}")
    if IMPLEMENTATION == "c" and data.size and data.dtype.kind != "O":
        src = np.ascontiguousarray(data)
        bucket = np.ascontiguousarray(idx)
        dst = np.empty_like(src) if out is None else out
        counts = np.empty(n, dtype=np.int64)
        bad = np.zeros(1, dtype=np.int64)
        ffi, lib = _scatter_c.ffi, _scatter_c.lib
        rc = lib.scatter_rows(
            ffi.from_buffer("unsigned char[]", src),
            len(src), src.nbytes // len(src),
            ffi.from_buffer("char[]", bucket), bucket.itemsize, int(bucket.dtype.kind == "i"), n,
            ffi.from_buffer("unsigned char[]", dst),
            ffi.from_buffer("int64_t[]", counts), ffi.from_buffer("int64_t[]", bad))
        if rc == lib.SCATTER_OUT_OF_RANGE:
            raise _out_of_range(n, idx[int(bad[0])])
        if rc != lib.SCATTER_OK:
            raise MemoryError(f"partition failed (scatter_rows returned {rc})")
        return dst, counts
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise _out_of_range(n, idx.min() if idx.min() < 0 else idx.max())
    narrow = np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.intp
    idx = idx.astype(narrow, copy=False)
    counts = np.bincount(idx, minlength=n).astype(np.int64, copy=False)
    order = np.argsort(idx, kind="stable")
    if out is None:
        return data[order], counts
    np.take(data, order, axis=0, out=out)
    return out, counts


def partition(data: Any, hash_function: Callable, n: int, out: np.ndarray | None = None) -> list:
    """Split ``data`` into ``n`` parts: vectorized for numpy arrays (into ``out`` if given,
    see :func:`partition_array`), per item for lists."""
    if isinstance(data, np.ndarray):
        if data.ndim == 0:
            raise TypeError("a shuffle needs an array with at least one dimension (rows), got a 0-d array")
        if n == 1:
            if out is None:  # it may travel after the call returns: not the caller's buffer
                return [np.array(data, copy=True)]
            partition_array(data, np.zeros(len(data), np.uint8), 1, out)
            return [out]
        gathered, counts = partition_array(data, _buckets(data, hash_function, n), n, out)
        return np.split(gathered, np.cumsum(counts)[:-1])
    parts: list[list] = [[] for _ in range(n)]
    for item in data:
        k = int(hash_function(item, n))
        if not 0 <= k < n:
            raise _out_of_range(n, k)
        parts[k].append(item)
    return parts
