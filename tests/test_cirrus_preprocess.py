"""Preprocessing jobs (normalize, feature_hashing): map-reduce over real worker processes through a
real zipcomm controller, checked against single-process references written independently here."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cirrus import Partition, open_dataset
from cirrus.dataset import MANIFEST_KEY, commit_dataset, write_partition
from cirrus.errors import DatasetError, IncompleteDataset, PartitionCorrupt
from cirrus.preprocess import (MIN_MAX_SCALING, STANDARDIZATION, PreprocessError, feature_hashing_async,
                               load_stats, normalize_async)
from cirrus.storage import open_store
from test_cirrus_storage import moto_server, store_uri  # noqa: F401  (shared fixtures)

WORKERS = 4
ROOT = Path(__file__).resolve().parent.parent


# -- data ------------------------------------------------------------------------------------------

def _dense(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 50, d) + rng.uniform(-100, 100, d)
    x[:, 1] = 7.25          # a constant column
    x[:, -1] = np.round(x[:, -1])  # repeated values
    return rng.integers(0, 2, n).astype(np.float32), x


def _sparse(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows; column 0 constant where stored, column d-1 never stored."""
    rng = np.random.default_rng(seed)
    rows_idx, rows_val = [], []
    for _ in range(n):
        k = int(rng.integers(0, 6))
        cols = np.sort(rng.choice(d - 1, size=k, replace=False))
        vals = rng.standard_normal(k) * 10 + 3
        vals[cols == 0] = -2.5
        rows_idx.append(cols)
        rows_val.append(vals)
    indptr = np.concatenate([[0], np.cumsum([len(c) for c in rows_idx])]).astype(np.int64)
    return (rng.integers(0, 3, n).astype(np.float32), indptr,
            np.concatenate(rows_idx).astype(np.int32), np.concatenate(rows_val))


async def _write(uri: str, parts: list[Partition]) -> None:
    """A dataset made of exactly these partitions (empty ones included)."""
    async with open_store(uri) as store:
        entries = [await write_partition(store, i, p) for i, p in enumerate(parts)]
        await commit_dataset(store, entries, kind=parts[0].kind, n_features=parts[0].n_features)


def _split(full: Partition, layout: str) -> list[Partition]:
    n = full.n_rows
    if layout == "one":
        return [full]
    cuts = [0, n // 5, n // 5, 2 * n // 3, 2 * n // 3, n, n] if layout == "with_empty" else \
        [0, n // 7, 2 * n // 7, n // 2, 3 * n // 4, n]
    return [full.rows(a, b) for a, b in zip(cuts, cuts[1:])]


async def _read_all(uri: str) -> tuple[Partition, list[int]]:
    async with await open_dataset(uri) as ds:
        parts = [await ds.read_partition(i) for i in range(ds.n_partitions)]
    labels = np.concatenate([p.labels for p in parts])
    if parts[0].dense is not None:
        return Partition(labels, dense=np.concatenate([p.dense for p in parts])), [p.n_rows for p in parts]
    shift = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + s for p, s in zip(parts, shift)])
    return (Partition(labels, indptr=indptr, indices=np.concatenate([p.indices for p in parts]),
                      values=np.concatenate([p.values for p in parts]), n_features=parts[0].n_features),
            [p.n_rows for p in parts])


# -- references (plain numpy, one process, column by column) --------------------------------------

def _ref_scale(vals: np.ndarray, method: str) -> np.ndarray:
    if vals.size == 0:
        return vals
    if method == MIN_MAX_SCALING:
        lo, hi = vals.min(), vals.max()
        return np.zeros_like(vals) if hi == lo else (vals - lo) / (hi - lo)
    mu, sd = vals.mean(), vals.std()
    return np.zeros_like(vals) if vals.min() == vals.max() else (vals - mu) / sd


def _reference(full: Partition, method: str) -> np.ndarray:
    """Dense: every column scaled. Sparse: the stored entries' values, as documented — min-max
    exactly as the dense matrix's (implicit zeros included in the statistics); standardization
    scaled by the dense column's standard deviation, without centering."""
    if full.dense is not None:
        return np.stack([_ref_scale(full.dense[:, j], method) for j in range(full.dense.shape[1])], axis=1)
    dense = full.toarray().astype(np.float64)
    out = np.array(full.values, dtype=np.float64)
    for j in range(full.n_features):
        at = full.indices == j
        col = dense[:, j]
        if method == MIN_MAX_SCALING:
            out[at] = _minmax_at(col, full.values[at])
        else:
            sd = col.std()
            out[at] = 0.0 if col.min() == col.max() else full.values[at] / sd
    return out


def _minmax_at(col: np.ndarray, vals: np.ndarray) -> np.ndarray:
    lo, hi = col.min(), col.max()
    return np.zeros_like(vals, dtype=np.float64) if hi == lo else (vals - lo) / (hi - lo)


# -- normalize ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("layout", ["many", "with_empty", "one"])
@pytest.mark.parametrize("method", [MIN_MAX_SCALING, STANDARDIZATION])
@pytest.mark.asyncio
async def test_normalize_equals_numpy_reference(tmp_path, kind, layout, method) -> None:
    if kind == "dense":
        y, x = _dense(900, 6, seed=1)
        full = Partition(y, dense=x)
    else:
        y, ip, ix, v = _sparse(1200, 9, seed=2)
        full = Partition(y, indptr=ip, indices=ix, values=v, n_features=9)
    src, dst = str(tmp_path / "in"), str(tmp_path / "out")
    parts = _split(full, layout)
    await _write(src, parts)
    seen: list[tuple[int, int]] = []
    manifest = await normalize_async(src, dst, method, n_workers=WORKERS,
                                     progress=lambda done, total: seen.append((done, total)))
    assert manifest["derived"]["workers"] == WORKERS and manifest["derived"]["method"] == method
    assert seen[-1] == (2 * len(parts), 2 * len(parts))  # summarized and written, every partition
    out, sizes = await _read_all(dst)
    assert sizes == [p.n_rows for p in parts]  # partition i -> partition i
    np.testing.assert_array_equal(out.labels, full.labels)
    ref = _reference(full, method)
    if kind == "dense":
        np.testing.assert_allclose(out.dense, ref, rtol=0, atol=1e-6)
        const = out.dense[:, 1]
        assert (const == 0).all()  # constant column: low end (min-max) / zero (standardization)
    else:
        np.testing.assert_array_equal(out.indptr, full.indptr)
        np.testing.assert_array_equal(out.indices, full.indices)  # sparsity kept
        np.testing.assert_allclose(out.values, ref, rtol=0, atol=1e-6)
    stats = await load_stats(dst)
    if kind == "dense":
        np.testing.assert_allclose(stats["mean"], full.dense.mean(axis=0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(stats["std"], full.dense.std(axis=0), rtol=1e-9, atol=1e-9)
    else:
        dense = full.toarray()  # the statistics are those of the matrix, implicit zeros included
        np.testing.assert_allclose(stats["mean"], dense.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats["std"], dense.std(axis=0), rtol=1e-9, atol=1e-12)
        assert stats["min"][8] == stats["max"][8] == 0  # a column never stored
        if method == MIN_MAX_SCALING:  # those columns' implicit zeros stay 0 (reported, not hidden)
            assert manifest["derived"]["columns_with_negative_minimum"] == int((dense.min(axis=0) < 0).sum())


@pytest.mark.asyncio
async def test_min_max_feature_range_and_s3(store_uri) -> None:
    """The same job against S3 (moto on loopback; workers inherit the AWS settings) and locally."""
    y, x = _dense(400, 4, seed=3)
    src, dst = store_uri + "/in", store_uri + "/out"
    await _write(src, _split(Partition(y, dense=x), "many"))
    await normalize_async(src, dst, MIN_MAX_SCALING, feature_range=(-1.0, 1.0), n_workers=WORKERS)
    out, _ = await _read_all(dst)
    ref = _reference(Partition(y, dense=x), MIN_MAX_SCALING) * 2 - 1
    ref[:, 1] = -1.0
    np.testing.assert_allclose(out.dense, ref, rtol=0, atol=1e-6)


# -- feature hashing ------------------------------------------------------------------------------

_MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _ref_bucket(col: int, val: float, categorical: bool, bits: int) -> int:
    key = int(np.float64(val + 0.0).view(np.uint64)) if categorical else 0x5BD1E995
    return _splitmix(((col * 0x9E3779B97F4A7C15) & _MASK) ^ key) & ((1 << bits) - 1)


def _ref_hash(full: Partition, categorical: set[int], bits: int) -> np.ndarray:
    out = np.zeros((full.n_rows, 1 << bits))
    for r in range(full.n_rows):
        if full.dense is not None:
            entries = list(enumerate(full.dense[r]))
        else:
            lo, hi = full.indptr[r], full.indptr[r + 1]
            entries = list(zip(full.indices[lo:hi], full.values[lo:hi]))
        for j, v in entries:
            cat = int(j) in categorical
            out[r, _ref_bucket(int(j), float(v), cat, bits)] += 1.0 if cat else v
    return out


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.asyncio
async def test_feature_hashing_equals_reference(tmp_path, kind) -> None:
    bits = 8
    if kind == "dense":
        y, x = _dense(300, 6, seed=4)
        full = Partition(y, dense=x)
        categorical = {1, 3}
    else:
        y, ip, ix, v = _sparse(400, 9, seed=5)
        v = np.where(ix % 2 == 0, np.round(v), v)  # categorical columns carry repeated values
        full = Partition(y, indptr=ip, indices=ix, values=v, n_features=9)
        categorical = {0, 2, 4}
    src, dst = str(tmp_path / "in"), str(tmp_path / "out")
    await _write(src, _split(full, "with_empty"))
    manifest = await feature_hashing_async(src, dst, hash_bits=bits, columns=sorted(categorical),
                                           n_workers=WORKERS)
    assert manifest["n_features"] == 1 << bits and manifest["kind"] == "sparse"
    out, _ = await _read_all(dst)
    np.testing.assert_array_equal(out.labels, full.labels)
    for r in range(0, out.n_rows, 37):
        row = out.indices[out.indptr[r]:out.indptr[r + 1]]
        assert (np.diff(row) > 0).all()  # sorted, one entry per bucket
    np.testing.assert_allclose(out.toarray(), _ref_hash(full, categorical, bits), rtol=0, atol=1e-9)
    b = manifest["derived"]["buckets"]
    assert b["stored_entries"] == out.nnz and b["used"] == len(np.unique(out.indices))


# -- failures ---------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_corrupt_partition_is_named_and_no_output_looks_complete(tmp_path) -> None:
    y, x = _dense(500, 4, seed=6)
    src, dst = str(tmp_path / "in"), str(tmp_path / "out")
    await _write(src, _split(Partition(y, dense=x), "many"))
    await normalize_async(src, dst, n_workers=2)           # a complete output from before ...
    victim = Path(src) / "part-000003.crpt"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))
    with pytest.raises(PartitionCorrupt) as err:
        await normalize_async(src, dst, STANDARDIZATION, n_workers=WORKERS)
    assert "part-000003.crpt" in str(err.value)
    with pytest.raises(IncompleteDataset):                  # ... is not left looking complete
        await open_dataset(dst)
    assert _workers_alive() == []


@pytest.mark.asyncio
async def test_bad_arguments_are_refused_before_any_work(tmp_path) -> None:
    y, x = _dense(50, 3, seed=7)
    src = str(tmp_path / "in")
    await _write(src, [Partition(y, dense=x)])
    with pytest.raises(ValueError, match="unknown normalization"):
        await normalize_async(src, str(tmp_path / "o"), "z-score")
    with pytest.raises(ValueError, match="is the input dataset"):
        await normalize_async(src, src)
    with pytest.raises(ValueError, match="feature_range"):
        await normalize_async(src, str(tmp_path / "o"), feature_range=(1, 1))
    with pytest.raises(ValueError, match="out of range"):
        await feature_hashing_async(src, str(tmp_path / "o"), columns=[3])
    with pytest.raises(IncompleteDataset):
        await normalize_async(str(tmp_path / "nothing"), str(tmp_path / "o"))
    y2, ip, ix, v = _sparse(40, 9, seed=7)
    await _write(str(tmp_path / "sp"), [Partition(y2, indptr=ip, indices=ix, values=v, n_features=9)])
    with pytest.raises(ValueError, match="implicit zeros stay 0"):
        await normalize_async(str(tmp_path / "sp"), str(tmp_path / "o"), feature_range=(-1.0, 1.0))
    assert not (tmp_path / "o" / MANIFEST_KEY).exists()


@pytest.mark.asyncio
async def test_non_finite_values_are_refused_naming_the_partition(tmp_path) -> None:
    y, x = _dense(200, 3, seed=8)
    x[150, 2] = np.nan
    src = str(tmp_path / "in")
    await _write(src, _split(Partition(y, dense=x), "many"))
    with pytest.raises(DatasetError, match=r"part-00000\d\.crpt: column 2 holds a non-finite"):
        await normalize_async(src, str(tmp_path / "o"), n_workers=WORKERS)


def _workers_alive() -> list[int]:
    """Worker processes of this test process still running."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"cirrus._prep_worker" in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(d.name))
    return pids


@pytest.mark.asyncio
async def test_a_worker_killed_mid_job_fails_the_job_cleanly(tmp_path) -> None:
    y, ip, ix, v = _sparse(4000, 50, seed=9)
    src, dst = str(tmp_path / "in"), str(tmp_path / "out")
    full = Partition(y, indptr=ip, indices=ix, values=v, n_features=50)
    await _write(src, [full.rows(a, a + 250) for a in range(0, 4000, 250)])
    killed: list[int] = []

    def on_progress(done: int, total: int) -> None:
        if done >= 1 and not killed:  # the map phase has started: kill one worker
            pids = _workers_alive()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])

    with pytest.raises(PreprocessError) as err:
        await asyncio.wait_for(normalize_async(src, dst, n_workers=WORKERS, progress=on_progress, timeout=60),
                               90)
    assert killed, "no worker was running to kill"
    assert "worker" in str(err.value)
    with pytest.raises(IncompleteDataset):
        await open_dataset(dst)
    assert _workers_alive() == []


# -- command line ---------------------------------------------------------------------------------

def test_cli_normalize_and_hash(tmp_path) -> None:
    y, x = _dense(300, 5, seed=10)
    src = str(tmp_path / "in")
    asyncio.run(_write(src, _split(Partition(y, dense=x), "many")))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = lambda *a: subprocess.run([sys.executable, "-m", "cirrus", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=120, env=env)
    for cmd in ("normalize", "hash"):
        h = run(cmd, "--help")
        assert h.returncode == 0 and "--workers" in h.stdout and "--controller" in h.stdout, h.stdout
    r = run("normalize", src, str(tmp_path / "n"), "--method", "standardization", "--workers", "4")
    assert r.returncode == 0, r.stderr
    assert "wrote 300 rows" in r.stdout and "10/10 partition steps" in r.stderr  # progress on stderr
    out, _ = asyncio.run(_read_all(str(tmp_path / "n")))
    np.testing.assert_allclose(out.dense, _reference(Partition(y, dense=x), STANDARDIZATION), atol=1e-6)
    r = run("hash", str(tmp_path / "n"), str(tmp_path / "h"), "--bits", "6", "--columns", "1,3-4", "--workers", "4")
    assert r.returncode == 0, r.stderr
    assert "of 64 buckets used" in r.stdout
    bad = run("normalize", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
