"""bench/comm.py runs end to end (a test checks that the benchmark runs, not how fast)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_SIZES = ("100B",)  # what --quick uses
QUICK_N = 2
QUICK_SHUFFLE = "10K int64"
BACKENDS = ("zipcomm", "zipcomm-daemon", "redis", "mpi", "gloo")
BASES = ("zipcomm", "zipcomm-daemon")
PEERS = ("redis", "mpi", "gloo")


def run_bench(script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``python bench/<script> <args>`` in the repository, its output captured as text; the test
    fails if it does not finish within ``timeout`` seconds."""
    try:
        return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench/{script} {' '.join(args)} did not finish within {timeout:.0f} s; "
                    f"output so far:\n{exc.stdout}\n{exc.stderr}")


def run_bench_ok(script: str, args: list[str],
                 timeout: float) -> tuple[subprocess.CompletedProcess, str]:
    """:func:`run_bench`, and the test fails unless it exits with 0; returns the process and its
    stdout and stderr as one text (for assertion messages)."""
    proc = run_bench(script, args, timeout)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    return proc, report


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_comm_bench_quick_all_backends(tmp_path: Path) -> None:
    # Not skips: .ci/run installs the peers, and a benchmark that silently does not run is a bug.
    missing = [hint for ok, hint in (
        (shutil.which("redis-server"), "redis-server (apt-get install redis-server)"),
        (shutil.which("mpirun"), "Open MPI's mpirun (apt-get install openmpi-bin libopenmpi-dev)"),
        (importlib.util.find_spec("mpi4py"), "mpi4py (pip install mpi4py)"),
        (importlib.util.find_spec("torch"), "torch (pip install torch==2.13.0)"),
    ) if not ok]
    assert not missing, f"bench/comm.py's peers are not installed: {', '.join(missing)} " \
                        f"(.ci/run installs them)"
    out = tmp_path / "comm.json"
    proc, report = run_bench_ok("comm.py", ["--quick", "--backends", ",".join(BACKENDS),
                                            "--out", str(out)], timeout=200)

    data = json.loads(out.read_text())
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"], machine
    assert "Open MPI" in machine["mpi_library"] and machine["torch"], machine
    cells = {(c["backend"], c["op"], c["size"], c["n"]): c for c in data["cells"]}
    expected = [(backend, op, size, QUICK_N) for backend in BACKENDS
                for op in ("broadcast", "reduce", "allreduce") for size in QUICK_SIZES]
    expected += [(backend, "shuffle", QUICK_SHUFFLE, QUICK_N) for backend in BACKENDS]
    assert sorted(cells) == sorted(expected), report
    for key, cell in cells.items():
        assert cell["status"] == "ok", (key, cell["error"])
        assert isinstance(cell["median_ms"], float) and cell["median_ms"] > 0, (key, cell)
        assert len(cell["durations_ms"]) == cell["reps"] == 2, (key, cell)
        for rnd in cell["rounds"]:
            assert len(rnd["start"]) == len(rnd["end"]) == QUICK_N, (key, rnd)
        if key[0] == "redis":
            assert cell["redis_keys_left"] == 0, f"{key}: Redis keys not deleted after use"
    assert len(data["ratios"]) == 3 * len(QUICK_SIZES) + 1, data["ratios"]
    for entry in data["ratios"]:
        for base in BASES:
            for peer in PEERS:
                assert isinstance(entry[f"{base}/{peer}"], float), entry

    lines = proc.stdout.splitlines()
    header = next((ln for ln in lines if ln.split()[:3] == ["op", "size", "n"]), None)
    assert header is not None, report
    columns = [f"{b} ms" for b in BACKENDS] + [f"{b}/{p}" for b in BASES for p in PEERS]
    assert all(col in header for col in columns), header
    for op in ("broadcast", "reduce", "allreduce", "shuffle"):
        rows = [ln.split() for ln in lines if ln.startswith(op + " ")]
        assert rows, (op, report)
        for row in rows:  # every cell has every backend's median and a numeric ratio per peer
            assert all(_number(x) for x in row[-len(columns):]), (op, row)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.timeout(300)
def test_train_bench_quick_mode_runs() -> None:
    """bench/train.py in its quick mode: every section ran and printed its table (not how fast)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "train.py"), "--rows", "20000", "--hash-bits", "10",
                          "--seconds", "2", "--workers", "1", "--skip-ablation"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "baseline updates/s" in out.stdout and "target held-out log loss" in out.stdout, out.stdout
