"""Fast text parsers returning in-memory arrays: LIBSVM, CSV and Criteo TSV.

These know nothing of the partition format: they turn a text file into numpy arrays
(:class:`SparseData` CSR rows + labels, or :class:`DenseData`).  Files are read in blocks
of whole lines; the structure of a block (line boundaries, tokens per line, which token
follows a ``:``) is found with vectorized numpy byte operations, and the numbers are
converted in one C-level pass per block.  Labels are kept exactly (float64).

Malformed input raises :class:`LoadError` naming the file and the 1-based line number.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

try:  # the other half of cirrus may or may not be there yet
    from cirrus.errors import CirrusError as _Base
except ImportError:  # pragma: no cover
    _Base = Exception

__all__ = [
    "LoadError",
    "SparseData",
    "DenseData",
    "parse_libsvm",
    "iter_libsvm",
    "parse_csv",
    "parse_criteo",
    "criteo_hash",
    "CRITEO_NUMERIC",
    "CRITEO_CATEGORICAL",
]

BLOCK_BYTES = 8 << 20
CRITEO_NUMERIC = 13
CRITEO_CATEGORICAL = 26
_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619


class LoadError(_Base, ValueError):
    """Malformed input text; ``path`` and ``line`` (1-based) say where."""

    def __init__(self, path, line, message):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass
class SparseData:
    """Rows in CSR form plus one label per row.

    ``labels`` float64 (exactly as written), ``indptr`` int64 (n_rows + 1), ``indices``
    int32 (int64 if ``n_features`` > 2**31 - 1), zero-based, ``values`` float32.
    """

    labels: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    n_features: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.indices[a:b], self.values[a:b]

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n_rows, self.n_features), np.float32)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.values)
        return out

    def __eq__(self, other):  # exact equality, arrays included
        if not isinstance(other, SparseData):
            return NotImplemented
        return (self.n_features == other.n_features
                and np.array_equal(self.labels, other.labels)
                and np.array_equal(self.indptr, other.indptr)
                and np.array_equal(self.indices, other.indices)
                and np.array_equal(self.values, other.values))


@dataclass
class DenseData:
    """``labels`` float64 (n_rows,), ``X`` (n_rows, n_features), ``columns`` header names or None."""

    labels: np.ndarray
    X: np.ndarray
    columns: list[str] | None = None

    @property
    def n_rows(self) -> int:
        return self.X.shape[0]

    @property
    def n_features(self) -> int:
        return self.X.shape[1]


# ----------------------------------------------------------------------------- block reading

def _open(path_or_file) -> tuple[BinaryIO, str, bool]:
    if isinstance(path_or_file, (str, os.PathLike)):
        return open(path_or_file, "rb"), os.fspath(path_or_file), True
    f = path_or_file
    name = getattr(f, "name", "<stream>")
    if isinstance(f, io.TextIOBase):
        f = f.buffer if hasattr(f, "buffer") else io.BytesIO(f.read().encode())
    return f, str(name), False


def _blocks(f: BinaryIO, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield (index of the block's first line, 0-based; bytes of whole lines)."""
    line0 = 0
    rest = b""
    while True:
        chunk = f.read(block_bytes)
        if not chunk:
            if rest:
                yield line0, rest
            return
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        block, rest = data[:cut + 1], data[cut + 1:]
        yield line0, block
        line0 += block.count(b"\n")


_WS = np.zeros(256, bool)
_WS[[9, 10, 11, 12, 13, 32]] = True          # exactly bytes.split()'s whitespace
_SEP = _WS.copy()
_SEP[ord(":")] = True
_COMMENT = re.compile(rb"#[^\n]*")
_QID = re.compile(rb"(?<![^ \t\r\x0b\x0c\n])qid:[^ \t\r\n\x0b\x0c]*")
_COLON_TO_SPACE = bytes.maketrans(b":", b" ")


def _floats(tokens: list) -> np.ndarray:
    return np.fromiter(map(float, tokens), np.float64, len(tokens))




_U = np.uint64


def _decimals(buf: np.ndarray, block: bytes, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Numbers buf[a[i]:b[i]] as float64, identical to ``float()`` of each token.

    Tokens of 1-8 plain digits (indices, counts, small integer values) are converted eight
    bytes at a time in uint64 lanes (SWAR, as simdjson does); every other token goes through
    ``float()``, which raises ValueError for what is not a number.
    """
    n = len(a)
    out = np.empty(n)
    if n == 0:
        return out
    L = b - a
    padded = np.concatenate([np.full(8, 48, np.uint8), buf])
    w = np.lib.stride_tricks.sliding_window_view(padded, 8)[b].view("<u8").ravel()
    sh = (np.uint64(8) - np.clip(L, 1, 8).astype(np.uint64)) * _U(8)
    keep = _U(0xFFFFFFFFFFFFFFFF) << sh
    w = (w & keep) | (_U(0x3030303030303030) & ~keep)       # bytes before the token -> '0'
    hi = _U(0xF0F0F0F0F0F0F0F0)
    ok = ((w & hi) == _U(0x3030303030303030)) & (((w + _U(0x0606060606060606)) & hi)
                                                == _U(0x3030303030303030)) & (L >= 1) & (L <= 8)
    w = ((w & _U(0x0F0F0F0F0F0F0F0F)) * _U(2561)) >> _U(8)
    w = ((w & _U(0x00FF00FF00FF00FF)) * _U(6553601)) >> _U(16)
    w = ((w & _U(0x0000FFFF0000FFFF)) * _U(42949672960001)) >> _U(32)
    out[:] = w
    if not ok.all():
        bad = np.flatnonzero(~ok)
        out[bad] = _floats([block[x:y] for x, y in zip(a[bad].tolist(), b[bad].tolist())])
    return out


# ----------------------------------------------------------------------------- LIBSVM

@dataclass
class _RawBlock:
    labels: np.ndarray      # float64
    counts: np.ndarray      # nnz per row, int64
    indices: np.ndarray     # int64, as written in the file
    values: np.ndarray      # float32
    lines: np.ndarray       # 0-based file line of each row (for later errors)


def _slow_libsvm_line(line: bytes) -> None:
    """Raise ValueError describing what is wrong with one (comment/qid-stripped) line."""
    toks = line.split()
    if not toks:
        return
    if b":" in toks[0]:
        raise ValueError(f"missing label (first token {toks[0][:40]!r} is a feature)")
    try:
        float(toks[0])
    except ValueError:
        raise ValueError(f"bad label {toks[0][:40]!r}") from None
    for t in toks[1:]:
        parts = t.split(b":")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"expected index:value, got {t[:40]!r}")
        try:
            i = int(parts[0])
        except ValueError:
            raise ValueError(f"bad feature index {parts[0][:40]!r}") from None
        if i < 0:
            raise ValueError(f"negative feature index {i}")
        try:
            float(parts[1])
        except ValueError:
            raise ValueError(f"bad feature value {parts[1][:40]!r}") from None


def _libsvm_block_error(name: str, line0: int, block: bytes):
    for k, line in enumerate(block.split(b"\n")):
        try:
            _slow_libsvm_line(line)
        except ValueError as e:
            return LoadError(name, line0 + k + 1, str(e))
    return LoadError(name, None, "malformed LIBSVM block (no single bad line found)")


_FAST_FORBIDDEN = (b"\t", b"\r", b"\x0b", b"\x0c")
_FAST_CLASS = np.zeros(256, np.uint8)
_FAST_CLASS[[32, 58, 10]] = [1, 2, 4]


def _structure_fast(buf: np.ndarray, block: bytes):
    """Structure of a block written the canonical way (single spaces, no tabs/CR, no padding).

    Returns (pairs per row, 0-based line of each row within the block, label starts, label
    ends, positions of the spaces, of the colons, of the newlines), or None if the block is not
    canonical or is malformed (then the general path decides and names the bad line).
    """
    if (not block or block[:1] in b" :" or block[-1:] in b" :"
            or any(p in block for p in _FAST_FORBIDDEN)):
        return None
    # no two of {space, colon, newline} side by side, except blank lines ("\n\n")
    cls = _FAST_CLASS[buf]
    nz = cls != 0
    both = nz[:-1] & nz[1:]
    if both.any() and (both & ~((cls[:-1] == 4) & (cls[1:] == 4))).any():
        return None
    nl = np.flatnonzero(cls == 4)
    ends = nl if block.endswith(b"\n") else np.append(nl, len(buf))
    starts = np.empty(len(ends), np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    # spaces and colons alternate (space, colon, space, colon ...) and each line holds as many
    # spaces as colons: so a line is "label( index:value)*" with no colon in the label, and
    # feature i is buf[sp[i]+1:col[i]] ":" buf[col[i]+1:end of word]
    sp = np.flatnonzero(cls == 1)
    col = np.flatnonzero(cls == 2)
    if len(sp) != len(col) or not (sp < col).all() or not (col[:-1] < sp[1:]).all():
        return None
    ssp = np.searchsorted(sp, starts)
    nsp = np.searchsorted(sp, ends) - ssp
    ncolon = np.searchsorted(col, ends) - np.searchsorted(col, starts)
    if not np.array_equal(nsp, ncolon):
        return None
    rows = np.flatnonzero(ends > starts)
    first_space = sp[np.minimum(ssp, max(len(sp) - 1, 0))] if len(sp) else ends
    label_end = np.where(nsp > 0, first_space, ends)
    return ncolon[rows].astype(np.int64), rows.astype(np.int64), starts[rows], label_end[rows], \
        sp, col, nl


def _structure_general(name: str, line0: int, buf: np.ndarray, block: bytes):
    """Structure of any block, vectorized; raises LoadError naming the first malformed line."""
    n = len(buf)
    sep = _SEP[buf]
    prev_sep = np.empty(n, bool)
    prev_sep[0] = True
    prev_sep[1:] = sep[:-1]
    starts = np.flatnonzero(~sep & prev_sep)
    nl = np.flatnonzero(buf == 10)
    nlines = len(nl) + (0 if (n and buf[-1] == 10) else 1)
    tok_line = np.searchsorted(nl, starts)                    # 0-based line within block
    after_colon = np.zeros(len(starts), bool)
    s1 = starts[starts > 0]
    after_colon[len(starts) - len(s1):] = buf[s1 - 1] == 58
    per_line = np.bincount(tok_line, minlength=nlines)
    first_tok = np.cumsum(per_line) - per_line
    k = np.arange(len(starts)) - first_tok[tok_line]          # rank of each token in its line
    colons = np.flatnonzero(buf == 58)
    colon_per_line = np.bincount(np.searchsorted(nl, colons), minlength=nlines)
    want_after = (k >= 2) & (k % 2 == 0)
    bad_tok = after_colon != want_after
    pairs = (per_line - 1) // 2
    bad_line = ((per_line > 0) & ((per_line % 2 == 0) | (colon_per_line != pairs)))
    if bad_tok.any():
        bad_line[tok_line[bad_tok]] = True
    if bad_line.any():
        first = int(np.argmax(bad_line))
        line = block.split(b"\n")[first]
        try:
            _slow_libsvm_line(line)
            msg = "malformed line (expected: label index:value ...)"
        except ValueError as e:
            msg = str(e)
        raise LoadError(name, line0 + first + 1, msg)
    rows = per_line > 0
    return pairs[rows].astype(np.int64), np.flatnonzero(rows).astype(np.int64)


def _parse_libsvm_block(name: str, line0: int, block: bytes) -> _RawBlock:
    if b"#" in block:
        block = _COMMENT.sub(b"", block)
    if b"qid" in block:
        block = _QID.sub(b"", block)
    if not block.strip():
        e = np.zeros(0, np.int64)
        return _RawBlock(np.zeros(0), e, e, np.zeros(0, np.float32), e)
    buf = np.frombuffer(block, np.uint8)
    st = _structure_fast(buf, block)
    if st is not None:
        pairs, rows, label_start, label_end, sp, col, nl = st
        try:
            labels = _decimals(buf, block, label_start, label_end)
            idx_f = _decimals(buf, block, sp + 1, col)
            end = np.empty(len(col), np.int64)
            end[:-1] = sp[1:]
            end[-1:] = len(buf)
            if len(nl):
                k = np.searchsorted(nl, col)
                has = k < len(nl)
                end[has] = np.minimum(end[has], nl[k[has]])
            vals = _decimals(buf, block, col + 1, end).astype(np.float32)
        except ValueError:
            raise _libsvm_block_error(name, line0, block) from None
    else:
        pairs, rows = _structure_general(name, line0, buf, block)
        tokens = block.translate(_COLON_TO_SPACE).split()
        per_row = 1 + 2 * pairs
        if len(tokens) != int(per_row.sum()):  # pragma: no cover - structure and split disagree
            raise _libsvm_block_error(name, line0, block)
        try:
            nums = _floats(tokens)
        except ValueError:
            raise _libsvm_block_error(name, line0, block) from None
        label_pos = np.cumsum(per_row) - per_row
        labels = nums[label_pos]
        is_feat = np.ones(len(nums), bool)
        is_feat[label_pos] = False
        feats = nums[is_feat]
        idx_f = feats[0::2]
        vals = feats[1::2].astype(np.float32)
    idx = idx_f.astype(np.int64)
    if len(idx):
        badm = (idx != idx_f) | (idx_f < 0) | (idx_f >= 2.0 ** 62)
        if badm.any():
            bk = int(np.flatnonzero(badm)[0])
            row = int(np.searchsorted(np.cumsum(pairs), bk, side="right"))
            raise LoadError(name, line0 + int(rows[row]) + 1,
                            f"feature index {idx_f[bk]!r} is not a non-negative integer")
    return _RawBlock(labels, pairs, idx, vals, rows + line0)


def _index_dtype(n_features: int):
    return np.int32 if n_features <= np.iinfo(np.int32).max else np.int64


def _finish_libsvm(name, raws: list[_RawBlock], n_features, zero_based) -> SparseData:
    if raws:
        labels = np.concatenate([r.labels for r in raws])
        counts = np.concatenate([r.counts for r in raws])
        idx = np.concatenate([r.indices for r in raws])
        vals = np.concatenate([r.values for r in raws])
        lines = np.concatenate([r.lines for r in raws])
    else:
        labels, counts, idx = np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
        vals, lines = np.zeros(0, np.float32), np.zeros(0, np.int64)
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    if not zero_based and len(idx):
        if idx.min() == 0:
            pos = int(np.argmin(idx))
            row = int(np.searchsorted(indptr, pos, side="right") - 1)
            raise LoadError(name, int(lines[row]) + 1,
                            "feature index 0 in a one-based file (pass zero_based=True)")
        idx = idx - 1
    top = int(idx.max()) + 1 if len(idx) else 0
    if n_features is None:
        n_features = top
    elif top > n_features:
        pos = int(np.flatnonzero(idx >= n_features)[0])
        row = int(np.searchsorted(indptr, pos, side="right") - 1)
        raise LoadError(name, int(lines[row]) + 1,
                        f"feature index {int(idx[pos]) + (0 if zero_based else 1)} "
                        f"out of range for n_features={n_features}")
    return SparseData(labels, indptr, idx.astype(_index_dtype(n_features)), vals, int(n_features))


def _resolve_zero_based(zero_based, raws) -> bool:
    if zero_based == "auto":
        return any(len(r.indices) and r.indices.min() == 0 for r in raws)
    if zero_based not in (True, False):
        raise ValueError(f"zero_based must be True, False or 'auto', not {zero_based!r}")
    return bool(zero_based)


def parse_libsvm(path_or_file, *, n_features: int | None = None,
                 zero_based: bool | str = "auto", workers: int = 1) -> SparseData:
    """Parse a LIBSVM / SVMlight file: ``label idx:val idx:val ... [# comment]``.

    ``qid:N`` tokens and comments are ignored, blank lines skipped; labels (``+1``, ``-1``,
    ``0``, ``3.5`` ...) are kept exactly as float64. ``zero_based="auto"`` treats the file as
    one-based unless some index is 0 (as scikit-learn does). ``n_features`` defaults to the
    largest index + 1; a larger index than allowed raises :class:`LoadError`. ``workers`` > 1
    parses byte ranges of a file path in that many processes (same result, same errors).
    """
    name = os.fspath(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) \
        else str(getattr(path_or_file, "name", "<stream>"))
    raws = _parse_blocks(path_or_file, _libsvm_block_fn, None, workers)
    return _finish_libsvm(name, raws, n_features, _resolve_zero_based(zero_based, raws))


def iter_libsvm(path_or_file, rows_per_chunk: int, *, n_features: int | None = None,
                zero_based: bool | str = False) -> Iterator[SparseData]:
    """Stream a LIBSVM file as :class:`SparseData` chunks of ``rows_per_chunk`` rows (last smaller).

    Memory stays bounded by one read block plus one chunk. Indices are one-based by default;
    ``zero_based="auto"`` decides from the first read block (≈ 8 MB) and holds to it. Each chunk's
    ``n_features`` is ``n_features`` if given, else that chunk's largest index + 1.
    """
    if rows_per_chunk < 1:
        raise ValueError("rows_per_chunk must be >= 1")
    f, name, close = _open(path_or_file)
    try:
        zb = None if zero_based == "auto" else _resolve_zero_based(zero_based, [])
        pending: list[_RawBlock] = []
        have = 0
        for l0, b in _blocks(f, min(BLOCK_BYTES, max(1 << 16, rows_per_chunk * 64))):
            raw = _parse_libsvm_block(name, l0, b)
            if zb is None:
                zb = _resolve_zero_based("auto", [raw])
            pending.append(raw)
            have += len(raw.labels)
            while have >= rows_per_chunk:
                chunk, pending = _take(pending, rows_per_chunk)
                have -= rows_per_chunk
                yield _finish_libsvm(name, chunk, n_features, zb)
        if have:
            yield _finish_libsvm(name, pending, n_features, bool(zb))
    finally:
        if close:
            f.close()


def _take(raws: list[_RawBlock], n: int) -> tuple[list[_RawBlock], list[_RawBlock]]:
    out, rest = [], []
    need = n
    for i, r in enumerate(raws):
        if need == 0:
            rest = raws[i:]
            break
        m = len(r.labels)
        if m <= need:
            out.append(r)
            need -= m
            continue
        nnz = int(r.counts[:need].sum())
        out.append(_RawBlock(r.labels[:need], r.counts[:need], r.indices[:nnz], r.values[:nnz],
                             r.lines[:need]))
        rest = [_RawBlock(r.labels[need:], r.counts[need:], r.indices[nnz:], r.values[nnz:],
                          r.lines[need:])] + raws[i + 1:]
        need = 0
        break
    return out, rest


# ----------------------------------------------------------------------------- CSV

def _csv_fields(line: bytes, delim: bytes, name: str, lineno: int, ncols: int | None) -> list[float]:
    fields = line.split(delim)
    if ncols is not None and len(fields) != ncols:
        raise LoadError(name, lineno, f"expected {ncols} fields, found {len(fields)} (ragged row)")
    out = []
    for j, x in enumerate(fields):
        x = x.strip()
        if not x:
            out.append(float("nan"))
            continue
        try:
            out.append(float(x))
        except ValueError:
            raise LoadError(name, lineno, f"field {j + 1}: {x[:40]!r} is not a number") from None
    return out


def parse_csv(path_or_file, *, label_column: int | None = 0, header: bool | str = "auto",
              delimiter: str = ",", dtype=np.float32) -> DenseData:
    """Parse a delimited numeric text file into labels + a dense 2-D array.

    ``label_column`` (may be negative; ``None`` = no labels, all zeros) is removed from ``X``.
    ``header="auto"`` treats the first non-blank line as a header if any field of it is not a
    number. Empty fields become NaN. A row with a different field count raises
    :class:`LoadError` naming the line.
    """
    delim = delimiter.encode()
    if len(delim) != 1 or delim in b"\r\n\"":
        raise ValueError(f"delimiter must be one byte, not newline or quote: {delimiter!r}")
    f, name, close = _open(path_or_file)
    columns = None
    ncols = None
    parts: list[np.ndarray] = []
    try:
        for l0, block in _blocks(f):
            if ncols is None:
                lines = block.split(b"\n")
                k = next((i for i, l in enumerate(lines) if l.strip()), None)
                if k is None:
                    continue
                first = lines[k]
                fields = first.split(delim)
                ncols = len(fields)
                is_header = header
                if header == "auto":
                    try:
                        [float(x) for x in fields if x.strip()]
                        is_header = False
                    except ValueError:
                        is_header = True
                if is_header:
                    columns = [x.strip().decode("utf-8", "replace") for x in fields]
                    lines[k] = b""
                    block = b"\n".join(lines)
            lines = block.split(b"\n")
            good = [l for l in lines if l.strip()]
            counts = np.fromiter((l.count(delim) for l in good), np.int64, len(good))
            ok = bool((counts == ncols - 1).all())
            if ok:
                toks = delim.join(good).split(delim)
                try:
                    arr = _floats(toks)
                except ValueError:
                    ok = False
            if not ok:  # slow path: exact messages, NaN for empty fields
                rows = [_csv_fields(l, delim, name, l0 + i + 1, ncols)
                        for i, l in enumerate(lines) if l.strip()]
                arr = np.array(rows, np.float64).reshape(-1)
            parts.append(arr.reshape(-1, ncols))
    finally:
        if close:
            f.close()
    if not ncols:  # empty file
        return DenseData(np.zeros(0), np.zeros((0, 0), dtype), columns)
    M = np.concatenate(parts) if parts else np.zeros((0, ncols))
    if label_column is None:
        return DenseData(np.zeros(len(M)), M.astype(dtype), columns)
    if not -ncols <= label_column < ncols:
        raise LoadError(name, None, f"label_column {label_column} out of range for {ncols} columns")
    lc = label_column % ncols
    keep = [j for j in range(ncols) if j != lc]
    if columns is not None:
        columns = [columns[j] for j in keep]
    return DenseData(np.ascontiguousarray(M[:, lc]), np.ascontiguousarray(M[:, keep], dtype=dtype),
                     columns)


# ----------------------------------------------------------------------------- Criteo

def _fnv1a(data: bytes, h: int = _FNV_OFFSET) -> int:
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h


_CAT_BASIS = np.array([_fnv1a(bytes([c])) for c in range(CRITEO_CATEGORICAL)], np.uint32)


def criteo_hash(column: int, token: bytes, hash_bits: int = 20) -> int:
    """Feature index of categorical ``token`` in categorical column ``column`` (0..25).

    32-bit FNV-1a over ``bytes([column]) + token``, masked to ``hash_bits`` bits, plus 13.
    Stable across processes and platforms (unlike Python's ``hash``).
    """
    return CRITEO_NUMERIC + (_fnv1a(token, _fnv1a(bytes([column]))) & ((1 << hash_bits) - 1))


def _criteo_slow_error(name, line0, block, ncol):
    for k, line in enumerate(block.split(b"\n")):
        if not line.strip():
            continue
        fields = line.rstrip(b"\r").split(b"\t")
        if len(fields) != ncol:
            return LoadError(name, line0 + k + 1,
                             f"expected {ncol} tab-separated fields, found {len(fields)}")
        try:
            float(fields[0])
        except ValueError:
            return LoadError(name, line0 + k + 1, f"bad label {fields[0][:40]!r}")
        for j in range(1, 1 + CRITEO_NUMERIC):
            if fields[j]:
                try:
                    float(fields[j])
                except ValueError:
                    return LoadError(name, line0 + k + 1,
                                     f"numeric column {j}: {fields[j][:40]!r} is not a number")
    return LoadError(name, None, "malformed Criteo block")


def _parse_criteo_block(name: str, l0: int, block: bytes, hash_bits: int):
    ncol = 1 + CRITEO_NUMERIC + CRITEO_CATEGORICAL
    if b"\r" in block:
        block = block.replace(b"\r", b"")
    if not block.strip(b"\n"):
        return None
    buf = np.frombuffer(block, np.uint8)
    nl = np.flatnonzero(buf == 10)
    ends = nl if block.endswith(b"\n") else np.append(nl, len(buf))
    starts = np.empty(len(ends), np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    tabs = np.flatnonzero(buf == 9)
    ntabs = np.searchsorted(tabs, ends) - np.searchsorted(tabs, starts)
    nonblank = ends > starts
    if (ntabs[nonblank] != ncol - 1).any():
        raise _criteo_slow_error(name, l0, block, ncol)
    starts, ends = starts[nonblank], ends[nonblank]
    n = len(starts)
    T = tabs.reshape(n, ncol - 1)
    fs = np.empty((n, ncol), np.int64)
    fe = np.empty((n, ncol), np.int64)
    fs[:, 0] = starts
    fs[:, 1:] = T + 1
    fe[:, :-1] = T
    fe[:, -1] = ends
    try:
        labels = _decimals(buf, block, fs[:, 0], fe[:, 0])
        na, nb = fs[:, 1:1 + CRITEO_NUMERIC], fe[:, 1:1 + CRITEO_NUMERIC]
        num_present = nb > na
        numv = np.zeros(na.shape, np.float32)
        numv[num_present] = _decimals(buf, block, na[num_present], nb[num_present])
    except ValueError:
        raise _criteo_slow_error(name, l0, block, ncol) from None
    ca, cb = fs[:, 1 + CRITEO_NUMERIC:], fe[:, 1 + CRITEO_NUMERIC:]
    L = cb - ca
    cat_present = L > 0
    # FNV-1a of each present token, grouped by token length (hex ids: nearly all one length)
    Lp = L[cat_present]
    ap = ca[cat_present]
    hp = np.broadcast_to(_CAT_BASIS, L.shape)[cat_present].copy()
    prime = np.uint32(_FNV_PRIME)
    for length in np.flatnonzero(np.bincount(Lp)).tolist():
        sel = np.flatnonzero(Lp == length)
        M = np.lib.stride_tricks.sliding_window_view(buf, length)[ap[sel]].T.copy()
        hh = hp[sel]
        for j in range(length):
            hh ^= M[j]
            hh *= prime
        hp[sel] = hh
    feat = np.empty((n, ncol - 1), np.int64)
    feat[:, :CRITEO_NUMERIC] = np.arange(CRITEO_NUMERIC)
    cat_feat = np.zeros(L.shape, np.int64)
    cat_feat[cat_present] = (hp & np.uint32((1 << hash_bits) - 1)).astype(np.int64) + CRITEO_NUMERIC
    feat[:, CRITEO_NUMERIC:] = cat_feat
    vals = np.ones((n, ncol - 1), np.float32)
    vals[:, :CRITEO_NUMERIC] = numv
    present = np.concatenate([num_present, cat_present], axis=1)
    return labels, present.sum(1), feat[present], vals[present]


def parse_criteo(path_or_file, *, hash_bits: int = 20, workers: int = 1) -> SparseData:
    """Parse Criteo-style TSV: label, 13 integer columns, 26 categorical (hex) columns.

    Numeric column j (0..12) becomes feature j with its value; categorical column c becomes
    feature :func:`criteo_hash` (c, token) with value 1. Empty fields are absent. Indices in a
    row are in column order; two categorical values hashing to one bucket give a repeated index
    (consumers sum them). ``n_features = 13 + 2**hash_bits``. ``workers`` > 1 parses byte
    ranges of a file path in that many processes (same result).
    """
    if not 1 <= hash_bits <= 31:
        raise ValueError("hash_bits must be in 1..31")
    out = [o for o in _parse_blocks(path_or_file, _parse_criteo_block, hash_bits, workers)
           if o is not None]
    nf = CRITEO_NUMERIC + (1 << hash_bits)
    if not out:
        return SparseData(np.zeros(0), np.zeros(1, np.int64), np.zeros(0, _index_dtype(nf)),
                          np.zeros(0, np.float32), nf)
    counts = np.concatenate([o[1] for o in out])
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return SparseData(np.concatenate([o[0] for o in out]), indptr,
                      np.concatenate([o[2] for o in out]).astype(_index_dtype(nf)),
                      np.concatenate([o[3] for o in out]), nf)


# ----------------------------------------------------------------------------- parallel blocks

def _libsvm_block_fn(name, l0, block, _arg):
    return _parse_libsvm_block(name, l0, block)


def _range_worker(path: str, a: int, b: int, fn, arg):
    """Parse bytes [a, b) of ``path`` (whole lines); line numbers relative to the range."""
    with open(path, "rb") as f:
        f.seek(a)
        data = f.read(b - a)
    try:
        results = [fn(path, l0, block, arg) for l0, block in _blocks(io.BytesIO(data))]
    except LoadError as e:
        return "error", e.line, e.reason
    return "ok", results, data.count(b"\n")


def _split_points(path: str, size: int, parts: int) -> list[int]:
    step = max(BLOCK_BYTES, -(-size // parts))
    points = [0]
    with open(path, "rb") as f:
        for p in range(step, size, step):
            if p <= points[-1]:
                continue
            f.seek(p - 1)
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                k = chunk.find(b"\n")
                if k >= 0:
                    q = f.tell() - len(chunk) + k + 1
                    if q < size:
                        points.append(q)
                    break
                if f.tell() >= size:
                    break
    points.append(size)
    return points


def _parse_blocks(path_or_file, fn, arg, workers: int) -> list:
    """fn(name, first_line, block, arg) over the input's blocks, in order."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if workers > 1 and isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        size = os.path.getsize(path)
        if size > 2 * BLOCK_BYTES:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            pts = _split_points(path, size, workers * 4)
            ctx = multiprocessing.get_context("spawn")
            out = []
            offset = 0
            with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
                futs = [ex.submit(_range_worker, path, a, b, fn, arg) for a, b in zip(pts, pts[1:])]
                for fut in futs:
                    status, res, n = fut.result()
                    if status == "error":
                        for g in futs:
                            g.cancel()
                        raise LoadError(path, None if res is None else offset + res, n)
                    for r in res:
                        if isinstance(r, _RawBlock):
                            r.lines += offset
                    out.extend(res)
                    offset += n
            return out
    f, name, close = _open(path_or_file)
    try:
        return [fn(name, l0, block, arg) for l0, block in _blocks(f)]
    finally:
        if close:
            f.close()
