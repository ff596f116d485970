"""Partition format and datasets.

A **partition** is one binary, self-describing, versioned, checksummed object::

    header (128 bytes, little-endian)
      magic b"CRPT" | version u16 | header_len u16 | kind u8 (0 dense, 1 sparse)
      dtype codes u8 x4 (labels, indptr, indices, values) | 3 pad
      n_rows u64 | n_features u64 | nnz u64
      section lengths u64 x4 (labels, indptr, indices, values)
      blake2b-128 digest of the body (16 bytes) | zero padding | crc32 of header[0:124] (u32)
    body: the four sections in that order, each padded with zeros to a multiple of 8 bytes
      labels (n_rows), and for sparse CSR rows: indptr (n_rows + 1, int64), indices (nnz), values (nnz);
      dense rows: indptr and indices are empty and values is the row-major n_rows x n_features matrix.

:func:`decode_partition` checks magic, version, the header CRC, every length, the body digest and the
CSR structure before it returns read-only numpy views over the bytes (no copy); anything else raises a
:class:`~cirrus.errors.PartitionError` naming the partition — never a half-parsed result.

A **dataset** is a folder / prefix holding ``part-NNNNNN.crpt`` partitions and a ``manifest.json``
that is written last (atomically): a writer that dies mid-write leaves no manifest, and
:func:`open_dataset` refuses such a folder with :class:`~cirrus.errors.IncompleteDataset`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DatasetError, IncompleteDataset, NotFound, PartitionCorrupt, PartitionVersionError
from .storage import Store, open_store

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MANIFEST_KEY",
    "Partition",
    "Dataset",
    "encode_partition",
    "decode_partition",
    "write_dataset",
    "write_arrays",
    "write_arrays_sync",
    "write_partition",
    "commit_dataset",
    "open_dataset",
]

MAGIC = b"CRPT"
FORMAT_VERSION = 1
MANIFEST_VERSION = 1
MANIFEST_KEY = "manifest.json"
HEADER_SIZE = 128
DEFAULT_PARTITION_BYTES = 10_000_000

_HEADER = struct.Struct("<4sHHBBBBB3xQQQQQQQ16s")
_CRC = struct.Struct("<I")
_CRC_OFFSET = HEADER_SIZE - _CRC.size
assert _HEADER.size <= _CRC_OFFSET

DENSE, SPARSE = 0, 1
_KINDS = {DENSE: "dense", SPARSE: "sparse"}
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("<i8")}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_PART_RE = re.compile(r"^part-\d{6}\.crpt$")
_THREAD_THRESHOLD = 64 << 10  # encode / decode / verify bigger partitions off the event loop


def _pad(n: int) -> int:
    return -n % 8


def _label_dtype(dt: np.dtype) -> np.dtype:
    dt = np.dtype(dt)
    if dt.kind == "f":
        return np.dtype("<f4") if dt.itemsize <= 4 else np.dtype("<f8")
    if dt.kind in "iub":
        return np.dtype("<i4") if dt.kind == "i" and dt.itemsize <= 4 else np.dtype("<i8")
    raise TypeError(f"unsupported label dtype {dt}")


def _value_dtype(dt: np.dtype) -> np.dtype:
    dt = np.dtype(dt)
    if dt.kind == "f" and dt.itemsize <= 4:
        return np.dtype("<f4")
    if dt.kind in "fiub":
        return np.dtype("<f8")
    raise TypeError(f"unsupported value dtype {dt}")


def _index_dtype(dt: np.dtype) -> np.dtype:
    dt = np.dtype(dt)
    if dt.kind == "i" and dt.itemsize <= 4:
        return np.dtype("<i4")
    if dt.kind in "iu":
        return np.dtype("<i8")
    raise TypeError(f"unsupported index dtype {dt}")


@dataclass(eq=False)
class Partition:
    """Rows with labels: ``dense`` (n_rows x n_features) or CSR ``indptr``/``indices``/``values``.

    Also the type of a minibatch (:class:`cirrus.iterator.Minibatch` adds where it came from).
    Arrays decoded from a partition are read-only views over its bytes.
    """

    labels: np.ndarray
    dense: np.ndarray | None = None
    indptr: np.ndarray | None = None
    indices: np.ndarray | None = None
    values: np.ndarray | None = None
    n_features: int | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.labels.shape}")
        if self.dense is not None:
            if self.indptr is not None or self.indices is not None or self.values is not None:
                raise ValueError("a partition is either dense or sparse (CSR), not both")
            self.dense = np.asarray(self.dense)
            if self.dense.ndim != 2 or self.dense.shape[0] != self.labels.shape[0]:
                raise ValueError(f"dense must be (n_rows={self.labels.shape[0]}, n_features), "
                                 f"got shape {self.dense.shape}")
            if self.n_features is None:
                self.n_features = int(self.dense.shape[1])
            elif self.n_features != self.dense.shape[1]:
                raise ValueError(f"n_features={self.n_features} but dense has {self.dense.shape[1]} columns")
        else:
            if self.indptr is None or self.indices is None or self.values is None:
                raise ValueError("give dense=, or indptr=, indices= and values= (CSR)")
            if self.n_features is None:
                raise ValueError("a sparse partition needs n_features")
            self.indptr = np.asarray(self.indptr)
            self.indices = np.asarray(self.indices)
            self.values = np.asarray(self.values)
            if self.indices.dtype.kind not in "iu":
                if self.indices.size:
                    raise ValueError(f"indices must be integers, not {self.indices.dtype}")
                self.indices = self.indices.astype(np.int64)
            if self.indptr.shape != (self.labels.shape[0] + 1,):
                raise ValueError(f"indptr must have n_rows + 1 = {self.labels.shape[0] + 1} entries, "
                                 f"got shape {self.indptr.shape}")
            if self.indices.ndim != 1 or self.indices.shape != self.values.shape:
                raise ValueError(f"indices {self.indices.shape} and values {self.values.shape} must be "
                                 "1-D of the same length")
        self.n_features = int(self.n_features)
        if self.n_features < 0:
            raise ValueError("n_features must be >= 0")

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "sparse"

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nnz(self) -> int:
        if self.dense is not None:
            return int(self.dense.size)
        return int(self.indptr[-1] - self.indptr[0])  # type: ignore[index]

    def __len__(self) -> int:
        return self.n_rows

    def rows(self, start: int, stop: int) -> Partition:
        """Rows ``[start, stop)``: views, except a CSR minibatch's rebased ``indptr`` (a small copy)."""
        start, stop, _ = slice(start, stop).indices(self.n_rows)
        stop = max(stop, start)
        if self.dense is not None:
            return Partition(self.labels[start:stop], dense=self.dense[start:stop], n_features=self.n_features)
        ip = self.indptr
        assert ip is not None and self.indices is not None and self.values is not None
        lo, hi = int(ip[start]), int(ip[stop])
        return Partition(self.labels[start:stop], indptr=ip[start:stop + 1] - lo,
                         indices=self.indices[lo:hi], values=self.values[lo:hi], n_features=self.n_features)

    def toarray(self) -> np.ndarray:
        """The rows as a dense matrix (a copy; for tests and small data)."""
        if self.dense is not None:
            return np.array(self.dense)
        out = np.zeros((self.n_rows, self.n_features), dtype=self.values.dtype)  # type: ignore[union-attr]
        ip = self.indptr - self.indptr[0]  # type: ignore[operator]
        rows = np.repeat(np.arange(self.n_rows), np.diff(ip))
        lo = int(self.indptr[0])  # type: ignore[index]
        np.add.at(out, (rows, self.indices[lo:lo + int(ip[-1])]),  # type: ignore[index]
                  self.values[lo:lo + int(ip[-1])])  # type: ignore[index]
        return out

    def encoded_size(self) -> int:
        """Bytes of :func:`encode_partition` for this partition (without encoding it)."""
        secs = _sections(self)
        return HEADER_SIZE + sum(a.nbytes + _pad(a.nbytes) for a in secs)


def _sections(p: Partition) -> list[np.ndarray]:
    labels = np.ascontiguousarray(p.labels, dtype=_label_dtype(p.labels.dtype))
    if p.dense is not None:
        empty = np.empty(0, dtype="<i8")
        return [labels, empty, np.empty(0, dtype="<i4"),
                np.ascontiguousarray(p.dense, dtype=_value_dtype(p.dense.dtype))]
    assert p.indptr is not None and p.indices is not None and p.values is not None
    lo, hi = int(p.indptr[0]), int(p.indptr[-1])
    indptr = np.ascontiguousarray(p.indptr, dtype="<i8")
    if lo:
        indptr = indptr - lo
    return [labels, indptr,
            np.ascontiguousarray(p.indices[lo:hi], dtype=_index_dtype(p.indices.dtype)),
            np.ascontiguousarray(p.values[lo:hi], dtype=_value_dtype(p.values.dtype))]


def _check_structure(p: Partition, name: str) -> None:
    """CSR invariants (indptr monotone from 0 to nnz, indices in range)."""
    if p.dense is not None:
        return
    ip, idx = p.indptr, p.indices
    assert ip is not None and idx is not None
    if ip[0] != 0 or ip[-1] != idx.shape[0] or (ip.shape[0] > 1 and np.any(ip[1:] < ip[:-1])):
        raise PartitionCorrupt(f"partition {name}: invalid CSR indptr", name=name)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= (p.n_features or 0)):
        raise PartitionCorrupt(f"partition {name}: feature index out of range [0, {p.n_features})", name=name)


def encode_partition(p: Partition) -> bytes:
    """Serialize ``p`` (see the module docstring for the layout)."""
    secs = _sections(p)
    labels, indptr, indices, values = secs
    if p.dense is None:
        try:
            _check_structure(Partition(labels, indptr=indptr, indices=indices, values=values,
                                       n_features=p.n_features), "<being encoded>")
        except PartitionCorrupt as e:
            raise ValueError(f"cannot encode: {e}") from None
    digest = hashlib.blake2b(digest_size=16)
    chunks: list[Any] = []
    for a in secs:
        mv = memoryview(a.reshape(-1).view(np.uint8))
        pad = b"\0" * _pad(a.nbytes)
        digest.update(mv)
        digest.update(pad)
        chunks.append(mv)
        chunks.append(pad)
    kind = DENSE if p.dense is not None else SPARSE
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, kind,
                        _CODES[labels.dtype], _CODES[indptr.dtype], _CODES[indices.dtype], _CODES[values.dtype],
                        p.n_rows, p.n_features, indices.shape[0] if kind == SPARSE else values.size,
                        labels.nbytes, indptr.nbytes, indices.nbytes, values.nbytes, digest.digest())
    head = head + b"\0" * (_CRC_OFFSET - len(head))
    head += _CRC.pack(zlib.crc32(head))
    return b"".join([head, *chunks])


def partition_digest(data: bytes | memoryview) -> str:
    """The body digest recorded in a partition header (hex), without verifying anything."""
    return bytes(memoryview(data)[_HEADER.size - 16:_HEADER.size]).hex()


def decode_partition(data: bytes | bytearray | memoryview, name: str = "<partition>") -> Partition:
    """Parse and verify a partition. Arrays are read-only views over ``data`` (keep it immutable)."""
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    n = len(mv)
    if n < 8:
        raise PartitionCorrupt(f"partition {name}: truncated ({n} bytes, no header)", name=name)
    if bytes(mv[:4]) != MAGIC:
        raise PartitionCorrupt(f"partition {name}: bad magic {bytes(mv[:4])!r} (not a cirrus partition)",
                               name=name)
    version = int.from_bytes(mv[4:6], "little")
    if version != FORMAT_VERSION:
        raise PartitionVersionError(f"partition {name}: format version {version} is not supported "
                                    f"(this cirrus reads version {FORMAT_VERSION})", name=name)
    if n < HEADER_SIZE:
        raise PartitionCorrupt(f"partition {name}: truncated ({n} bytes, header is {HEADER_SIZE})", name=name)
    (crc,) = _CRC.unpack_from(mv, _CRC_OFFSET)
    if zlib.crc32(mv[:_CRC_OFFSET]) != crc:
        raise PartitionCorrupt(f"partition {name}: header checksum mismatch (corrupt header)", name=name)
    (_, _, header_len, kind, c_lab, c_ptr, c_idx, c_val, n_rows, n_features, nnz,
     l_lab, l_ptr, l_idx, l_val, digest) = _HEADER.unpack_from(mv, 0)
    if header_len != HEADER_SIZE or kind not in _KINDS or any(mv[_HEADER.size:_CRC_OFFSET]):
        raise PartitionCorrupt(f"partition {name}: invalid header", name=name)
    try:
        dt_lab, dt_ptr, dt_idx, dt_val = (_DTYPES[c] for c in (c_lab, c_ptr, c_idx, c_val))
    except KeyError:
        raise PartitionCorrupt(f"partition {name}: unknown dtype code in header", name=name) from None
    if kind == DENSE:
        expect = (n_rows * dt_lab.itemsize, 0, 0, n_rows * n_features * dt_val.itemsize)
        ok = nnz == n_rows * n_features
    else:
        expect = (n_rows * dt_lab.itemsize, (n_rows + 1) * dt_ptr.itemsize,
                  nnz * dt_idx.itemsize, nnz * dt_val.itemsize)
        ok = dt_ptr == np.dtype("<i8") and dt_val.kind == "f" and dt_idx.kind == "i"
    if not ok or (l_lab, l_ptr, l_idx, l_val) != expect:
        raise PartitionCorrupt(f"partition {name}: inconsistent section lengths in header", name=name)
    total = HEADER_SIZE + sum(x + _pad(x) for x in expect)
    if n < total:
        raise PartitionCorrupt(f"partition {name}: truncated ({n} of {total} bytes)", name=name)
    if n > total:
        raise PartitionCorrupt(f"partition {name}: {n - total} trailing bytes after the last section",
                               name=name)
    if hashlib.blake2b(mv[HEADER_SIZE:], digest_size=16).digest() != digest:
        raise PartitionCorrupt(f"partition {name}: body checksum mismatch (corrupt data)", name=name)

    arrays = []
    off = HEADER_SIZE
    for length, dt in zip(expect, (dt_lab, dt_ptr, dt_idx, dt_val)):
        arrays.append(np.frombuffer(mv, dtype=dt, count=length // dt.itemsize, offset=off))
        off += length + _pad(length)
    labels, indptr, indices, values = arrays
    if kind == DENSE:
        p = Partition(labels, dense=values.reshape(n_rows, n_features), n_features=n_features)
    else:
        p = Partition(labels, indptr=indptr, indices=indices, values=values, n_features=n_features)
        _check_structure(p, name)
    return p


# ----------------------------------------------------------------------------------------------------
# writing datasets


def _row_costs(p: Partition) -> np.ndarray:
    """Cumulative encoded bytes after each row (approximate: no header, no padding)."""
    lab = _label_dtype(p.labels.dtype).itemsize
    if p.dense is not None:
        per = lab + p.n_features * _value_dtype(p.dense.dtype).itemsize  # type: ignore[operator]
        return np.arange(1, p.n_rows + 1, dtype=np.int64) * per
    per_nz = _index_dtype(p.indices.dtype).itemsize + _value_dtype(p.values.dtype).itemsize  # type: ignore
    ip = np.asarray(p.indptr, dtype=np.int64)
    return (np.arange(1, p.n_rows + 1, dtype=np.int64) * (lab + 8)) + (ip[1:] - ip[0]) * per_nz


def _concat(parts: list[Partition]) -> Partition:
    if len(parts) == 1:
        return parts[0]
    labels = np.concatenate([q.labels for q in parts])
    if parts[0].dense is not None:
        return Partition(labels, dense=np.concatenate([q.dense for q in parts]),  # type: ignore[misc]
                         n_features=parts[0].n_features)
    ptrs, idx, vals, off = [np.zeros(1, dtype=np.int64)], [], [], 0
    for q in parts:
        lo, hi = int(q.indptr[0]), int(q.indptr[-1])  # type: ignore[index]
        ptrs.append(np.asarray(q.indptr[1:], dtype=np.int64) - lo + off)  # type: ignore[index]
        idx.append(q.indices[lo:hi])  # type: ignore[index]
        vals.append(q.values[lo:hi])  # type: ignore[index]
        off += hi - lo
    return Partition(labels, indptr=np.concatenate(ptrs), indices=np.concatenate(idx),
                     values=np.concatenate(vals), n_features=parts[0].n_features)


class _Splitter:
    """Accumulates pieces (partitions of any size) and cuts them into ~partition_bytes partitions."""

    def __init__(self, partition_bytes: int) -> None:
        if partition_bytes <= 0:
            raise ValueError("partition_bytes must be > 0")
        self.target = partition_bytes
        self.pending: list[Partition] = []
        self.pending_bytes = 0
        self.kind: str | None = None
        self.n_features: int | None = None

    def add(self, piece: Partition) -> list[Partition]:
        if self.kind is None:
            self.kind, self.n_features = piece.kind, piece.n_features
        elif piece.kind != self.kind or piece.n_features != self.n_features:
            raise DatasetError(f"inconsistent rows: {piece.kind} x {piece.n_features} features after "
                               f"{self.kind} x {self.n_features}")
        out = []
        costs = _row_costs(piece)
        n, start = piece.n_rows, 0
        while start < n:
            base = int(costs[start - 1]) if start else 0
            room = self.target - self.pending_bytes
            end = int(np.searchsorted(costs, base + room, side="right"))  # rows [start, end) fit
            if end == start and not self.pending:
                end = start + 1  # a single row bigger than a partition: a partition of one row
            if end >= n:
                self.pending.append(piece if start == 0 else piece.rows(start, n))
                self.pending_bytes += int(costs[-1]) - base
                break
            if end > start:
                self.pending.append(piece.rows(start, end))
            out.append(_concat(self.pending))
            self.pending, self.pending_bytes = [], 0
            start = end
        return out

    def flush(self) -> list[Partition]:
        if not self.pending:
            return []
        out = [_concat(self.pending)]
        self.pending, self.pending_bytes = [], 0
        return out


def _rows_to_piece(rows: list[tuple[Any, Any]], n_features: int | None) -> Partition:
    labels = np.asarray([r[0] for r in rows])
    first = rows[0][1]
    if isinstance(first, tuple):
        if n_features is None:
            raise DatasetError("sparse rows (label, (indices, values)) need write_dataset(..., n_features=N)")
        idx = [np.asarray(r[1][0]) for r in rows]
        val = [np.asarray(r[1][1]) for r in rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(i) for i in idx], out=indptr[1:])
        cat_i = np.concatenate(idx) if idx else np.empty(0, np.int64)
        cat_v = np.concatenate(val) if val else np.empty(0, np.float64)
        if cat_i.dtype.kind not in "iu":
            cat_i = cat_i.astype(np.int64)
        return Partition(labels, indptr=indptr, indices=cat_i, values=cat_v, n_features=n_features)
    dense = np.stack([np.asarray(r[1]) for r in rows])
    return Partition(labels, dense=dense, n_features=n_features)


async def _pieces(data: Any, n_features: int | None, chunk_rows: int = 4096):
    """Normalize the accepted inputs to an async stream of Partition pieces."""
    if isinstance(data, Partition):
        yield data
        return
    if isinstance(data, AsyncIterable):
        it: Any = data
        is_async = True
    elif isinstance(data, Iterable):
        it, is_async = data, False
    else:
        raise TypeError(f"write_dataset takes a Partition or an iterable of rows / Partitions, "
                        f"not {type(data).__name__}")
    rows: list[tuple[Any, Any]] = []

    async def items():
        if is_async:
            async for x in it:
                yield x
        else:
            for x in it:
                yield x

    async for item in items():
        if isinstance(item, Partition):
            if rows:
                yield _rows_to_piece(rows, n_features)
                rows = []
            yield item
            continue
        rows.append(item)
        if len(rows) >= chunk_rows:
            yield _rows_to_piece(rows, n_features)
            rows = []
    if rows:
        yield _rows_to_piece(rows, n_features)


def part_key(i: int) -> str:
    return f"part-{i:06d}.crpt"


async def _encode(p: Partition) -> bytes:
    if p.nnz * 8 > _THREAD_THRESHOLD:
        return await asyncio.to_thread(encode_partition, p)
    return encode_partition(p)


async def write_dataset(store_or_uri: str | os.PathLike[str] | Store, data: Any, *,
                        partition_bytes: int = DEFAULT_PARTITION_BYTES,
                        n_features: int | None = None,
                        progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``data`` as a dataset at ``store_or_uri``; return its manifest. ``progress(n)`` is
    called after each partition with the number written so far.

    ``data`` is a :class:`Partition` (split into ≈ ``partition_bytes`` partitions), or a (sync or async)
    iterable of rows ``(label, dense_row)`` / ``(label, (indices, values))`` (sparse rows need
    ``n_features``) and/or :class:`Partition` chunks. An existing dataset there is replaced: its manifest
    is removed first and the new one written last, so at no time does a mix look complete.
    """
    store = open_store(store_or_uri)
    owns = store is not store_or_uri
    try:
        await store.delete(MANIFEST_KEY)
        splitter = _Splitter(partition_bytes)
        entries: list[dict[str, Any]] = []

        async def emit(p: Partition) -> None:
            entries.append(await write_partition(store, len(entries), p))
            if progress is not None:
                progress(len(entries))

        async for piece in _pieces(data, n_features):
            for p in splitter.add(piece):
                await emit(p)
        for p in splitter.flush():
            await emit(p)
        if splitter.kind is None:
            if isinstance(data, Partition):  # zero rows
                splitter.kind, splitter.n_features = data.kind, data.n_features
            else:
                raise DatasetError(f"no rows to write to {store.uri}", uri=store.uri)
        return await commit_dataset(store, entries, kind=splitter.kind, n_features=splitter.n_features)
    finally:
        if owns:
            await store.aclose()


async def write_partition(store: Store, index: int, p: Partition) -> dict[str, Any]:
    """Encode ``p`` and store it as partition ``index`` (key ``part-NNNNNN.crpt``); return its manifest
    entry for :func:`commit_dataset`. Jobs that write partitions from several processes use this and
    leave the manifest to one coordinator."""
    data_ = await _encode(p)
    key = part_key(index)
    await store.put(key, data_)
    secs = _sections(p)
    return {"key": key, "n_rows": p.n_rows, "nnz": p.nnz, "nbytes": len(data_),
            "digest": partition_digest(data_), "label_dtype": secs[0].dtype.name,
            "value_dtype": secs[3].dtype.name, "index_dtype": secs[2].dtype.name if p.kind == "sparse" else None}


_DTYPE_FIELDS = ("label_dtype", "value_dtype", "index_dtype")


async def commit_dataset(store: Store, entries: list[dict[str, Any]], *, kind: str, n_features: int,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make the partitions ``entries`` (from :func:`write_partition`, in order) a dataset: write the
    manifest (last, atomically), then delete stale partitions of a previous dataset at ``store``.
    ``extra`` adds fields to the manifest (e.g. how the dataset was derived). Returns the manifest."""
    if [e["key"] for e in entries] != [part_key(i) for i in range(len(entries))]:
        raise DatasetError(f"partitions of {store.uri} must be numbered 0..{len(entries) - 1} in order",
                           uri=store.uri)
    dtypes = {f: entries[0][f] for f in _DTYPE_FIELDS} if entries else {}
    parts = [{k: v for k, v in e.items() if k not in _DTYPE_FIELDS} for e in entries]
    manifest = {
        "format": "cirrus-dataset",
        "version": MANIFEST_VERSION,
        "partition_format_version": FORMAT_VERSION,
        "kind": kind,
        "n_features": int(n_features),
        "n_rows": sum(e["n_rows"] for e in parts),
        "nnz": sum(e["nnz"] for e in parts),
        **dtypes,
        **(extra or {}),
        "partitions": parts,
    }
    await store.put(MANIFEST_KEY, json.dumps(manifest, indent=1).encode())
    listed = {e["key"] for e in parts}
    for key in await store.list("part-"):
        if _PART_RE.match(key) and key not in listed:
            await store.delete(key)  # stale partition of a previous, larger dataset
    return manifest


async def write_arrays(uri: str | os.PathLike[str] | Store, labels: Any, dense: Any = None,
                       csr: tuple[Any, Any, Any, int] | None = None, *,
                       partition_bytes: int = DEFAULT_PARTITION_BYTES,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write numpy arrays: ``dense`` (n_rows x n_features) or ``csr=(indptr, indices, values, n_features)``."""
    if (dense is None) == (csr is None):
        raise ValueError("give exactly one of dense= or csr=")
    if dense is not None:
        p = Partition(labels, dense=dense)
    else:
        indptr, indices, values, nf = csr  # type: ignore[misc]
        p = Partition(labels, indptr=indptr, indices=indices, values=values, n_features=nf)
    return await write_dataset(uri, p, partition_bytes=partition_bytes, progress=progress)


def write_arrays_sync(uri: str | os.PathLike[str], labels: Any, dense: Any = None,
                      csr: tuple[Any, Any, Any, int] | None = None, *,
                      partition_bytes: int = DEFAULT_PARTITION_BYTES) -> dict[str, Any]:
    """Blocking :func:`write_arrays` (for scripts; not from inside a running event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("write_arrays_sync() called from a running event loop: await write_arrays()")
    return asyncio.run(write_arrays(uri, labels, dense, csr, partition_bytes=partition_bytes))


# ----------------------------------------------------------------------------------------------------
# reading datasets


def _validate_manifest(m: Any, uri: str) -> None:
    def bad(why: str) -> DatasetError:
        return DatasetError(f"dataset {uri}: invalid manifest.json ({why})", uri=uri)

    if not isinstance(m, dict) or m.get("format") != "cirrus-dataset":
        raise bad("not a cirrus dataset manifest")
    if m.get("version") != MANIFEST_VERSION:
        raise DatasetError(f"dataset {uri}: manifest version {m.get('version')!r} is not supported "
                           f"(this cirrus reads version {MANIFEST_VERSION})", uri=uri)
    if m.get("kind") not in ("dense", "sparse"):
        raise bad(f"kind {m.get('kind')!r}")
    if not isinstance(m.get("n_features"), int) or m["n_features"] < 0:
        raise bad("n_features")
    parts = m.get("partitions")
    if not isinstance(parts, list):
        raise bad("partitions")
    for i, e in enumerate(parts):
        if (not isinstance(e, dict) or not isinstance(e.get("key"), str) or not _PART_RE.match(e["key"])
                or not all(isinstance(e.get(f), int) and e[f] >= 0 for f in ("n_rows", "nbytes"))):
            raise bad(f"partition entry {i}")
    if sum(e["n_rows"] for e in parts) != m.get("n_rows"):
        raise bad("n_rows does not match the partitions")


class Dataset:
    """An opened dataset: its manifest and partitions. ``async with`` closes its store."""

    def __init__(self, store: Store, manifest: dict[str, Any], *, owns_store: bool = True) -> None:
        self.store = store
        self.manifest = manifest
        self._owns_store = owns_store

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def n_features(self) -> int:
        return self.manifest["n_features"]

    @property
    def n_rows(self) -> int:
        return self.manifest["n_rows"]

    @property
    def n_partitions(self) -> int:
        return len(self.manifest["partitions"])

    def partition_nbytes(self, i: int) -> int:
        return self.manifest["partitions"][i]["nbytes"]

    def partition_rows(self, i: int) -> int:
        return self.manifest["partitions"][i]["n_rows"]

    def partition_name(self, i: int) -> str:
        return self.store.name(self.manifest["partitions"][i]["key"])

    async def read_partition(self, i: int) -> Partition:
        """Fetch, verify and decode partition ``i`` (views over its bytes)."""
        if not 0 <= i < self.n_partitions:
            raise IndexError(f"partition {i} out of range (dataset {self.uri} has {self.n_partitions})")
        entry = self.manifest["partitions"][i]
        name = self.store.name(entry["key"])
        try:
            data = await self.store.get(entry["key"])
        except NotFound:
            raise IncompleteDataset(f"partition {name} listed in the manifest is missing", uri=self.uri) from None
        if len(data) > _THREAD_THRESHOLD:
            return await asyncio.to_thread(self._decode_checked, data, name, entry)
        return self._decode_checked(data, name, entry)

    def _decode_checked(self, data: bytes, name: str, entry: dict[str, Any]) -> Partition:
        p = decode_partition(data, name)
        if (p.n_rows != entry["n_rows"] or p.n_features != self.n_features or p.kind != self.kind
                or ("digest" in entry and partition_digest(data) != entry["digest"])):
            raise PartitionCorrupt(f"partition {name} does not match the manifest (stale or replaced)", name=name)
        return p

    async def aclose(self) -> None:
        if self._owns_store:
            await self.store.aclose()

    async def __aenter__(self) -> Dataset:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (f"Dataset({self.uri!r}, {self.kind}, rows={self.n_rows}, features={self.n_features}, "
                f"partitions={self.n_partitions})")


async def open_dataset(uri: str | os.PathLike[str] | Store, *, check: bool = True) -> Dataset:
    """Open the dataset at ``uri``. Without a manifest (a writer crashed or is still writing), or with a
    partition it lists missing (``check=True``: one listing), raise :class:`IncompleteDataset`."""
    store = open_store(uri)
    owns = store is not uri
    try:
        try:
            raw = await store.get(MANIFEST_KEY)
        except NotFound:
            parts = [k for k in await store.list("part-") if _PART_RE.match(k)]
            why = (f"{len(parts)} partition(s) but no {MANIFEST_KEY}: the writer did not finish"
                   if parts else f"no {MANIFEST_KEY}: not a cirrus dataset")
            raise IncompleteDataset(f"dataset {store.uri} is incomplete: {why}", uri=store.uri) from None
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"dataset {store.uri}: manifest.json is not valid JSON ({e})", uri=store.uri) from e
        _validate_manifest(manifest, store.uri)
        if check:
            present = set(await store.list("part-"))
            missing = [e["key"] for e in manifest["partitions"] if e["key"] not in present]
            if missing:
                raise IncompleteDataset(f"dataset {store.uri} is incomplete: {len(missing)} partition(s) "
                                        f"missing, e.g. {store.name(missing[0])}", uri=store.uri)
        return Dataset(store, manifest, owns_store=owns)
    except BaseException:
        if owns:
            await store.aclose()
        raise
