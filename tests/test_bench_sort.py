"""bench/sort.py runs end to end with every shuffle backend and verifies its output (that it runs,
not how fast); the record helpers it relies on are exact."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from test_bench import run_bench, run_bench_ok

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sort_bench_tiny_all_backends(tmp_path: Path) -> None:
    out = tmp_path / "sort.json"
    # 3 MB over 3 workers in rounds of 300 KB: 4 shuffle rounds, 2 input objects per worker
    proc, report = run_bench_ok("sort.py", ["--size", "3MB", "--workers", "3", "--reps", "2",
                                            "--chunk", "300KB", "--block-size", "600KB",
                                            "--store", str(tmp_path / "store"), "--out", str(out)],
                                timeout=220)
    data = json.loads(out.read_text())
    assert data["unavailable"] == {}, data["unavailable"]
    assert data["layout"]["rounds"] == 4 and data["layout"]["blocks"] == 2, data["layout"]
    for backend in ("zipcomm", "redis", "s3"):
        summary = data["summary"][backend]
        assert summary["ok"] == summary["reps"] == 2 and summary["error"] is None, summary
        for phase in ("load", "shuffle", "sort", "write", "end_to_end"):
            assert summary[phase] > 0, (backend, phase, summary)
        for run in data["runs"][backend]:
            assert run["status"] == "ok" and len(run["workers"]) == 3, run
            assert sum(run["records_per_worker"].values()) == 30_000, run
    for key in ("zipcomm/redis end_to_end", "zipcomm/s3 end_to_end"):
        assert isinstance(data["ratios"][key], float), data["ratios"]
    assert "end_to_end s" in proc.stdout and "zipcomm/redis end_to_end" in proc.stdout, report
    assert list((tmp_path / "store").rglob("part-*")) == [], "input/output objects left behind"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sort_bench_s3_store(tmp_path: Path) -> None:
    """--store s3://...: records read from and written to S3 (the run's own moto server)."""
    out = tmp_path / "sort.json"
    run_bench_ok("sort.py", ["--size", "1MB", "--workers", "2", "--reps", "1", "--backends",
                             "zipcomm", "--store", "s3://sort-data/records", "--out", str(out)],
                 timeout=160)
    data = json.loads(out.read_text())
    assert data["summary"]["zipcomm"]["ok"] == 1, data["summary"]


def test_sort_bench_bad_arguments() -> None:
    for args, message in ((["--backends", "zipcomm,nfs"], "unknown backend"),
                          (["--size", "12parsecs"], "bad size"),
                          (["--workers", "0"], "--workers must be"),
                          (["--store", "ftp://x/y"], "unsupported URI")):
        proc = run_bench("sort.py", args, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_sort_record_helpers() -> None:
    from bench._sort_worker import (RECORD, checksum, generate, is_sorted, key_classes,
                                    partition_records, sort_records)

    recs = generate(7, 0, 0, 1000, 5000)
    assert recs.shape == (5000, RECORD) and recs.dtype == np.uint8
    assert np.array_equal(recs, generate(7, 0, 0, 1000, 5000))  # deterministic
    parts = partition_records(recs, 5)
    assert sum(len(p) for p in parts) == 5000
    for d, part in enumerate(parts):
        assert np.all(key_classes(part, 5) == d)
    out = sort_records(recs)
    assert is_sorted(out) and not is_sorted(recs)
    as_bytes = sorted(bytes(r[:10]) for r in recs)  # the reference: byte-wise key order
    assert [bytes(r[:10]) for r in out] == as_bytes
    assert checksum(out) == checksum(recs) == checksum(np.concatenate(parts[::-1]))
    assert checksum(out[1:]) != checksum(recs)
    ties = recs.copy()
    ties[5:50, :8] = ties[0, :8]  # equal first 8 key bytes: the order comes from bytes 8-9
    assert [bytes(r[:10]) for r in sort_records(ties)] == sorted(bytes(r[:10]) for r in ties)
    dup = out.copy()
    dup[1] = dup[0]  # a duplicated record in place of another changes the checksum
    assert checksum(dup) != checksum(recs)
