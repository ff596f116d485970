"""The per-partition pieces of cirrus's preprocessing jobs (pure numpy, no I/O).

Normalization statistics of one partition are a ``(5, n_features)`` float64 array — the rows of
:data:`STAT_ROWS`: how many values a column has, their mean, the sum of squared deviations from
that mean (``m2``), their minimum and maximum. :func:`combine_stats` merges such arrays exactly
(Chan et al.'s pairwise update, numerically stable), so partitions can be summarized in any
grouping and order — the reduce step of the job runs it up a zipcomm reduce tree.

Which values count: every value of the matrix — for a sparse partition the implicit zeros too, so
the statistics of a sparse dataset equal those of the same matrix stored densely. A sparse dataset
stays sparse: its implicit zeros stay zero, and its stored entries are transformed as follows.

* Min-max scaling: ``low + (x - min) * (high - low) / (max - min)`` per column, a constant column
  going to ``low``. On sparse data ``low`` must be 0; a stored entry gets exactly the dense result,
  and an implicit zero does too whenever the column's minimum is 0 (counts, one-hot features). A
  column with a negative minimum would need its implicit zeros stored to match the dense result;
  they stay zero and :func:`sparse_zero_mismatch` counts such columns (the job reports them).
* Standardization: dense data ``(x - mean) / std`` (population std; a constant column becomes 0).
  Sparse data is scaled without centering, ``x / std`` — centering would turn every implicit zero
  into a stored value — as scikit-learn's ``StandardScaler(with_mean=False)`` does.

Feature hashing maps every entry ``(column j, value v)`` of a row to one of ``2**hash_bits``
buckets: a column listed as categorical contributes 1.0 to the bucket of ``(j, v)`` (each distinct
value is its own feature), any other column contributes ``v`` to the bucket of ``j``. Entries of
one row that land in the same bucket are summed; rows come out sorted by bucket. The bucket is
``splitmix64(j * 0x9E3779B97F4A7C15 ^ k) & (2**hash_bits - 1)`` with ``k`` the IEEE-754 bits of
``float(v)`` (``-0.0`` read as ``0.0``) for a categorical column and ``0x5BD1E995`` otherwise — a
fixed function, so datasets hashed by different runs or machines agree.
"""

from __future__ import annotations

import numpy as np

from .dataset import Partition
from .errors import DatasetError

__all__ = [
    "MIN_MAX_SCALING", "STANDARDIZATION", "METHODS", "STAT_ROWS",
    "empty_stats", "partition_stats", "combine_stats", "normalize_partition", "sparse_zero_mismatch",
    "hash_buckets", "hash_partition",
]

MIN_MAX_SCALING = "min_max"
STANDARDIZATION = "standardization"
METHODS = (MIN_MAX_SCALING, STANDARDIZATION)
STAT_ROWS = ("count", "mean", "m2", "min", "max")
COUNT, MEAN, M2, MIN, MAX = range(5)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NUMERIC_KEY = np.uint64(0x5BD1E995)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def empty_stats(n_features: int) -> np.ndarray:
    """Statistics of no values (the identity of :func:`combine_stats`)."""
    s = np.zeros((5, n_features), dtype=np.float64)
    s[MIN] = np.inf
    s[MAX] = -np.inf
    return s


def _entries(p: Partition) -> tuple[np.ndarray, np.ndarray]:
    """(column of each value, value as float64) of a sparse partition's stored entries."""
    lo, hi = int(p.indptr[0]), int(p.indptr[-1])  # type: ignore[index]
    return (np.asarray(p.indices[lo:hi], dtype=np.intp),  # type: ignore[index]
            np.asarray(p.values[lo:hi], dtype=np.float64))  # type: ignore[index]


def _check_finite(values: np.ndarray, cols: np.ndarray | None, name: str) -> None:
    if values.size and not np.isfinite(values).all():
        where = np.flatnonzero(~np.isfinite(values.reshape(-1)))[0]
        col = int(cols[where]) if cols is not None else int(where % values.shape[-1])
        raise DatasetError(f"partition {name}: column {col} holds a non-finite value "
                           f"({values.reshape(-1)[where]}); normalization needs finite values")


def partition_stats(p: Partition, name: str = "<partition>") -> np.ndarray:
    """Per-column statistics of one partition (see the module docstring)."""
    d = int(p.n_features)  # type: ignore[arg-type]
    s = empty_stats(d)
    if p.dense is not None:
        if p.n_rows == 0:
            return s
        x = np.asarray(p.dense, dtype=np.float64)
        _check_finite(x, None, name)
        s[COUNT] = p.n_rows
        s[MEAN] = x.mean(axis=0)
        s[M2] = ((x - s[MEAN]) ** 2).sum(axis=0)
        s[MIN] = x.min(axis=0)
        s[MAX] = x.max(axis=0)
        return s
    n = p.n_rows
    if n == 0:
        return s
    cols, vals = _entries(p)
    _check_finite(vals, cols, name)
    stored = np.bincount(cols, minlength=d).astype(np.float64)
    total = np.bincount(cols, weights=vals, minlength=d)
    mean = total / n
    dev = vals - mean[cols]
    s[COUNT], s[MEAN] = n, mean
    # squared deviations of the stored values, plus (0 - mean)^2 for each implicit zero
    s[M2] = np.bincount(cols, weights=dev * dev, minlength=d) + (n - stored) * mean * mean
    np.minimum.at(s[MIN], cols, vals)
    np.maximum.at(s[MAX], cols, vals)
    has_zero = stored < n
    s[MIN][has_zero] = np.minimum(s[MIN][has_zero], 0.0)
    s[MAX][has_zero] = np.maximum(s[MAX][has_zero], 0.0)
    return s


def sparse_zero_mismatch(stats: np.ndarray) -> int:
    """Columns whose implicit zeros min-max scaling would move away from 0 (negative minimum)."""
    return int(np.count_nonzero(stats[MIN] < 0))


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = a[COUNT], b[COUNT]
    n = na + nb
    delta = b[MEAN] - a[MEAN]
    frac = np.divide(nb, n, out=np.zeros_like(n), where=n > 0)
    out = np.empty_like(a)
    out[COUNT] = n
    out[MEAN] = a[MEAN] + delta * frac
    out[M2] = a[M2] + b[M2] + delta * delta * na * frac
    np.minimum(a[MIN], b[MIN], out=out[MIN])
    np.maximum(a[MAX], b[MAX], out=out[MAX])
    return out


def combine_stats(values: list) -> np.ndarray:
    """Merge statistics arrays (a zipcomm ``reduce_f``: a list in, one array out)."""
    values = [np.asarray(v, dtype=np.float64) for v in values]
    if not values:
        raise ValueError("combine_stats of no values")
    shape = values[0].shape
    if len(shape) != 2 or shape[0] != 5 or any(v.shape != shape for v in values):
        raise ValueError(f"statistics must all be (5, n_features) arrays, got {[v.shape for v in values]}")
    acc = values[0]
    for v in values[1:]:
        acc = _merge(acc, v)
    return acc


def _scaled(x: np.ndarray, cols: np.ndarray | None, stats: np.ndarray, method: str,
            feature_range: tuple[float, float]) -> np.ndarray:
    """``x`` (float64; columns given by ``cols``, or its last axis) transformed in place."""
    mn, mx = stats[MIN], stats[MAX]
    constant = ~(mx > mn)  # one distinct value (or none)
    if method == MIN_MAX_SCALING:
        lo, hi = feature_range
        span = np.where(constant, 1.0, mx - mn)
        scale = (hi - lo) / span
        shift = np.where(constant, 0.0, mn)
        fill = np.where(constant, lo, np.nan)
        if cols is not None:
            scale, shift, fill, constant = scale[cols], shift[cols], fill[cols], constant[cols]
        x -= shift
        x *= scale
        x += lo
        np.copyto(x, fill, where=constant if cols is not None else np.broadcast_to(constant, x.shape))
        return x
    if method == STANDARDIZATION:
        count = stats[COUNT]
        std = np.sqrt(np.divide(stats[M2], count, out=np.zeros_like(count), where=count > 0))
        inv = np.divide(1.0, std, out=np.zeros_like(std), where=~constant & (std > 0))
        if cols is not None:  # sparse: scale only (see the module docstring)
            x *= inv[cols]
            return x
        x -= stats[MEAN]
        x *= inv  # a constant column: (x - mean) * 0 = 0
        return x
    raise ValueError(f"unknown normalization {method!r}; use one of {METHODS}")


def _out_dtype(dt: np.dtype) -> np.dtype:
    return dt if dt.kind == "f" else np.dtype(np.float64)


def normalize_partition(p: Partition, stats: np.ndarray, method: str,
                        feature_range: tuple[float, float] = (0.0, 1.0)) -> Partition:
    """``p`` with every value normalized by the global ``stats`` (labels and sparsity kept)."""
    if p.dense is not None:
        x = _scaled(np.array(p.dense, dtype=np.float64), None, stats, method, feature_range)
        return Partition(p.labels, dense=x.astype(_out_dtype(p.dense.dtype), copy=False),
                         n_features=p.n_features)
    lo, hi = int(p.indptr[0]), int(p.indptr[-1])  # type: ignore[index]
    cols = np.asarray(p.indices[lo:hi], dtype=np.intp)  # type: ignore[index]
    vals = _scaled(np.array(p.values[lo:hi], dtype=np.float64), cols, stats, method,  # type: ignore[index]
                   feature_range)
    return Partition(p.labels, indptr=p.indptr - lo, indices=p.indices[lo:hi],  # type: ignore[operator,index]
                     values=vals.astype(_out_dtype(p.values.dtype), copy=False),  # type: ignore[union-attr]
                     n_features=p.n_features)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_buckets(cols: np.ndarray, values: np.ndarray, categorical: np.ndarray, hash_bits: int) -> np.ndarray:
    """The bucket (int64) of every entry: ``categorical`` is a per-column bool mask."""
    cols = np.asarray(cols, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64) + 0.0  # -0.0 -> 0.0
    key = np.where(categorical[cols], v.view(np.uint64), _NUMERIC_KEY)
    with np.errstate(over="ignore"):
        h = _splitmix64((cols.astype(np.uint64) * _GOLDEN) ^ key)
    return (h & np.uint64((1 << hash_bits) - 1)).astype(np.int64)


def hash_partition(p: Partition, categorical: np.ndarray, hash_bits: int) -> Partition:
    """``p`` as ``2**hash_bits`` hashed features (see the module docstring); labels kept."""
    nb = 1 << hash_bits
    n = p.n_rows
    if p.dense is not None:
        x = np.asarray(p.dense, dtype=np.float64)
        d = x.shape[1]
        rows, cols, vals = np.repeat(np.arange(n), d), np.tile(np.arange(d), n), x.reshape(-1)
        keep = categorical[cols] | (vals != 0)   # a dense zero adds nothing to a numeric bucket
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        vdt = _out_dtype(p.dense.dtype)
    else:
        cols, vals = _entries(p)
        rows = np.repeat(np.arange(n), np.diff(np.asarray(p.indptr)))
        vdt = _out_dtype(p.values.dtype)  # type: ignore[union-attr]
    buckets = hash_buckets(cols, vals, categorical, hash_bits)
    contrib = np.where(categorical[cols], 1.0, vals)
    keys = rows.astype(np.int64) * nb + buckets
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=contrib, minlength=uniq.size)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(uniq // nb, minlength=n), out=indptr[1:])
    idt = np.int32 if nb <= np.iinfo(np.int32).max else np.int64
    return Partition(p.labels, indptr=indptr, indices=(uniq % nb).astype(idt), values=sums.astype(vdt),
                     n_features=nb)
