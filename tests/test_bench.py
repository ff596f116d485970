"""bench/comm.py runs end to end (a test checks that the benchmark runs, not how fast)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_SIZES = ("100B", "4KB")  # what --quick uses
QUICK_N = 2
QUICK_SHUFFLE = "10K int64"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_comm_bench_quick_zipcomm_and_redis(tmp_path: Path) -> None:
    # Not a skip: CI installs redis-server, and a benchmark that silently does not run is a bug.
    assert shutil.which("redis-server"), (
        "redis-server is not installed (not on PATH): bench/comm.py needs it for the Redis "
        "baseline; install it, e.g. `apt-get install redis-server`")
    out = tmp_path / "comm.json"
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "comm.py"), "--quick", "--backends", "zipcomm,redis",
             "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench/comm.py --quick did not finish within 120 s; output so far:\n"
                    f"{exc.stdout}\n{exc.stderr}")
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report

    data = json.loads(out.read_text())
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["python"], data["machine"]
    cells = {(c["backend"], c["op"], c["size"], c["n"]): c for c in data["cells"]}
    expected = [(backend, op, size, QUICK_N) for backend in ("zipcomm", "redis")
                for op in ("broadcast", "reduce", "allreduce") for size in QUICK_SIZES]
    expected += [(backend, "shuffle", QUICK_SHUFFLE, QUICK_N) for backend in ("zipcomm", "redis")]
    assert sorted(cells) == sorted(expected), report
    for key, cell in cells.items():
        assert cell["status"] == "ok", (key, cell["error"])
        assert isinstance(cell["median_ms"], float) and cell["median_ms"] > 0, (key, cell)
        assert len(cell["durations_ms"]) == cell["reps"] == 2, (key, cell)
        for rnd in cell["rounds"]:
            assert len(rnd["start"]) == len(rnd["end"]) == QUICK_N, (key, rnd)
        if key[0] == "redis":
            assert cell["redis_keys_left"] == 0, f"{key}: Redis keys not deleted after use"

    lines = proc.stdout.splitlines()
    header = next((ln for ln in lines if ln.split()[:3] == ["op", "size", "n"]), None)
    assert header is not None, report
    assert "redis ms" in header and "zipcomm/redis" in header, header
    for op in ("broadcast", "reduce", "allreduce", "shuffle"):
        rows = [ln.split() for ln in lines if ln.startswith(op + " ")]
        assert rows, (op, report)
        for row in rows:  # every cell has both medians and a numeric ratio
            assert all(_number(x) for x in row[-3:]), (op, row)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
