"""The shuffle partition shared by the bench backends that partition themselves (redis, mpi, gloo).

Item ``x`` goes to rank ``x % n``, the hash the zipcomm worker passes to ``shuffle_send_receive``
(``lambda a, n: a % n``), and within a part the items keep their input order (a stable partition,
as zipcomm's own ``zipcomm.channels.shuffle.partition`` does).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["gathered_parts", "partition"]


def gathered_parts(arr: np.ndarray, n: int,
                   hash_function: Callable[[np.ndarray, int], np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(gathered, counts)``: the items ordered by destination, and the item count per
    destination (``counts[d]`` items for rank ``d``, back to back) — the send buffer and send
    counts of an all-to-all-v.

    Vectorized counting partition: the bucket array is narrowed to 8 or 16 bits so that numpy's
    stable argsort is a radix sort (O(len)).  With ``n == 1`` ``gathered`` is ``arr`` itself.
    """
    if arr.ndim != 1:
        raise ValueError(f"shuffle expects a 1-D array, got shape {arr.shape}")
    buckets = np.remainder(arr, n) if hash_function is None else np.asarray(hash_function(arr, n))
    if buckets.shape != arr.shape:
        raise ValueError(f"hash_function returned shape {buckets.shape}, expected {arr.shape}")
    if n == 1:
        return arr, np.array([arr.size], dtype=np.int64)
    if hash_function is not None and buckets.size and (buckets.min() < 0 or buckets.max() >= n):
        raise ValueError(f"hash_function returned a bucket outside [0, {n})")
    narrow = np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.intp
    buckets = buckets.astype(narrow, copy=False)
    counts = np.bincount(buckets, minlength=n).astype(np.int64, copy=False)
    return arr[np.argsort(buckets, kind="stable")], counts


def partition(arr: np.ndarray, n: int,
              hash_function: Callable[[np.ndarray, int], np.ndarray] | None = None
              ) -> list[np.ndarray]:
    """Split a 1-D array into ``n`` parts by bucket (default ``arr % n``), keeping item order.

    The parts are views into one gathered array (see :func:`gathered_parts`)."""
    gathered, counts = gathered_parts(arr, n, hash_function)
    if n == 1:
        return [gathered]
    return np.split(gathered, np.cumsum(counts)[:-1])
