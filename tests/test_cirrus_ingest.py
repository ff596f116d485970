"""cirrus.load_libsvm (thesis figure 3.5): a LIBSVM file becomes a dataset; every row and label
comes back exactly through the minibatch iterator, whole-file and streamed."""

from __future__ import annotations

import numpy as np
import pytest

import cirrus
from cirrus.generators import criteo_like, write_libsvm

pytestmark = [pytest.mark.timeout(60)]


@pytest.mark.asyncio
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_load_libsvm_round_trip(tmp_path, streamed: bool) -> None:
    data, _ = criteo_like(3000, hash_bits=12, seed=3)
    text = tmp_path / "train.svm"
    write_libsvm(data, text)
    uri = str(tmp_path / "ds")
    kwargs = dict(n_features=data.n_features, zero_based=False, rows_per_chunk=700) if streamed else {}
    manifest = await cirrus.load_libsvm_async(text, uri, partition_bytes=20_000, **kwargs)
    assert manifest["n_rows"] == 3000 and len(manifest["partitions"]) > 3
    labels, rows = [], []
    async with await cirrus.open_dataset(uri) as ds:
        assert ds.n_features == data.n_features
        async with cirrus.MinibatchIterator(ds, 64) as it:
            async for batch in it:
                labels.append(np.asarray(batch.labels))
                for i in range(batch.n_rows):
                    lo, hi = batch.indptr[i], batch.indptr[i + 1]
                    rows.append((np.asarray(batch.indices[lo:hi]), np.asarray(batch.values[lo:hi])))
    assert np.array_equal(np.concatenate(labels), data.labels)
    for i, (idx, val) in enumerate(rows):
        want_idx, want_val = data.row(i)
        assert np.array_equal(idx, want_idx) and np.array_equal(val, want_val), f"row {i}"


def test_load_libsvm_blocking_form(tmp_path) -> None:
    data, _ = criteo_like(200, hash_bits=10, seed=1)
    write_libsvm(data, tmp_path / "a.svm")
    manifest = cirrus.load_libsvm(tmp_path / "a.svm", str(tmp_path / "ds"))
    assert manifest["n_rows"] == 200 and manifest["kind"] == "sparse"


@pytest.mark.asyncio
async def test_a_malformed_file_names_its_line_and_writes_no_dataset(tmp_path) -> None:
    (tmp_path / "bad.svm").write_text("1 3:0.5\n0 7:oops\n")
    with pytest.raises(cirrus.LoadError, match=":2:"):
        await cirrus.load_libsvm_async(tmp_path / "bad.svm", str(tmp_path / "ds"))
    with pytest.raises(cirrus.DatasetError):
        await cirrus.open_dataset(str(tmp_path / "ds"))


def test_prefetch_benchmark_runs() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "prefetch.py"), "--rows", "5000",
                          "--reps", "1", "--latency", "0.002", "--partition-bytes", "50000,100000"],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().endswith("x")]
    assert [r[0] for r in rows] == ["0.05MB", "0.10MB"], out.stdout  # one row per partition size
    assert all(float(r[-1].rstrip("x")) > 0 for r in rows), out.stdout


@pytest.mark.parametrize("fmt", ["libsvm", "criteo", "csv"])
def test_cli_load_writes_a_dataset_and_reports_errors(tmp_path, fmt: str) -> None:
    import asyncio
    import subprocess
    import sys

    from cirrus.generators import multiclass, write_criteo_tsv, write_csv

    src = tmp_path / f"in.{fmt}"
    if fmt == "libsvm":
        data, _ = criteo_like(500, hash_bits=8, seed=2)
        write_libsvm(data, src)
    elif fmt == "criteo":
        write_criteo_tsv(500, src, seed=2, hash_bits=8)
    else:
        dense, _, _ = multiclass(500, 6, 3, seed=2)
        write_csv(dense, src)
    extra = ["--hash-bits", "8"] if fmt == "criteo" else []
    out = subprocess.run([sys.executable, "-m", "cirrus", "load", "--format", fmt, str(src), str(tmp_path / "ds"),
                          "--partition-bytes", "10000", *extra], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert "wrote 500 rows" in out.stdout, out.stdout

    async def rows() -> int:
        async with await cirrus.open_dataset(str(tmp_path / "ds")) as ds:
            return ds.n_rows
    assert asyncio.run(rows()) == 500
    bad = subprocess.run([sys.executable, "-m", "cirrus", "load", str(tmp_path / "missing.svm"),
                          str(tmp_path / "ds2")], capture_output=True, text=True, timeout=50)
    assert bad.returncode == 1 and "error:" in bad.stderr
