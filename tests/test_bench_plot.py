"""bench/plot.py draws a bench/comm.py result (the figures' content, not the benchmark)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cell(backend: str, op: str, size: str, n: int, ms: float | None) -> dict:
    if ms is None:
        return {"backend": backend, "op": op, "size": size, "n": n, "status": "error",
                "error": "rank 1 in round: boom", "median_ms": None}
    return {"backend": backend, "op": op, "size": size, "n": n, "status": "ok", "error": None,
            "median_ms": ms, "min_ms": ms * 0.9, "max_ms": ms * 1.2}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_one_png_per_op_and_size_plus_a_summary(tmp_path: Path) -> None:
    cells = [_cell(b, op, size, n, 1.0 + n * (i + 1))
             for i, b in enumerate(("zipcomm", "mpi"))
             for op, size in (("broadcast", "100B"), ("shuffle", "1M int64")) for n in (2, 4, 8)]
    cells.append(_cell("redis", "broadcast", "100B", 8, None))  # a failed cell is left out
    result = tmp_path / "comm-x.json"
    result.write_text(json.dumps({"cells": cells}))
    proc = _run(str(result), "--out-dir", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["comm-x-all.png", "comm-x-broadcast-100B.png", "comm-x-shuffle-1M_int64.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert proc.stdout.count("wrote ") == 3


def test_bad_inputs_get_a_clear_error(tmp_path: Path) -> None:
    missing = _run(str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    notjson = tmp_path / "x.json"
    notjson.write_text("{")
    assert "is not JSON" in _run(str(notjson)).stderr
    other = tmp_path / "y.json"
    other.write_text(json.dumps({"rows": []}))
    proc = _run(str(other))
    assert proc.returncode == 2 and "not a bench/comm.py result" in proc.stderr
