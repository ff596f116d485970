"""bench/comm.py's s3 backend runs end to end against the moto server it starts (that it runs and
verifies, not how fast), and S3Comm's collectives leave no object behind."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from test_bench import run_bench_ok

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUICK_CELLS = [(op, size) for op in ("broadcast", "reduce", "allreduce") for size in ("100B",)]
QUICK_CELLS += [("shuffle", "10K int64")]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_comm_bench_quick_s3(tmp_path: Path) -> None:
    out = tmp_path / "comm.json"
    proc, report = run_bench_ok("comm.py", ["--quick", "--backends", "zipcomm,s3",
                                            "--out", str(out)], timeout=220)
    data = json.loads(out.read_text())
    assert data["machine"]["moto"] and data["machine"]["aiobotocore"], data["machine"]
    cells = {(c["backend"], c["op"], c["size"]): c for c in data["cells"]}
    assert sorted(cells) == sorted((b, op, size) for b in ("zipcomm", "s3")
                                   for op, size in QUICK_CELLS), report
    for key, cell in cells.items():
        assert cell["status"] == "ok", (key, cell["error"])
        assert cell["median_ms"] > 0 and len(cell["durations_ms"]) == 2, (key, cell)
        if key[0] == "s3":
            assert cell["s3_keys_left"] == 0, f"{key}: S3 objects not deleted after use"
    for entry in data["ratios"]:
        assert isinstance(entry["zipcomm/s3"], float), entry
    header = next(ln for ln in proc.stdout.splitlines() if ln.split()[:3] == ["op", "size", "n"])
    assert "s3 ms" in header and "zipcomm/s3" in header, header


@pytest.mark.timeout(120)
def test_s3comm_collectives_and_cleanup(tmp_path: Path) -> None:
    """Three ranks in one event loop: every collective's answer, and an empty bucket after."""
    from bench._services import S3Server
    from bench.s3_backend import S3Comm, open_s3_store

    server = S3Server(tmp_path)
    server.start()
    try:
        server.create_bucket("s3comm-test")

        async def rank(r: int, n: int) -> list:
            async with open_s3_store("s3comm-test", server.client_settings()) as store:
                async with S3Comm(store, r, n, "t", timeout=60, poll_sleep=0.002) as comm:
                    await comm.barrier()
                    b = await comm.broadcast(np.arange(5) if r == 1 else None, root=1)
                    red = await comm.reduce(np.full(4, r + 1), root=0)
                    allr = await comm.allreduce(np.full(3, r, dtype=np.float64))
                    obj = await comm.broadcast({"k": [1, 2]} if r == 0 else None)
                    sh = await comm.shuffle(np.arange(30, dtype=np.int64) + 100 * r)
                    return [b, red, allr, obj, sh]

        async def main() -> list:
            return await asyncio.gather(*(rank(r, 3) for r in range(3)))

        results = asyncio.run(main())
        for r, (b, red, allr, obj, sh) in enumerate(results):
            assert np.array_equal(b, np.arange(5))
            assert (red is None) if r else np.array_equal(red, np.full(4, 6))
            assert np.array_equal(allr, np.full(3, 3.0))
            assert obj == {"k": [1, 2]}
            want = np.concatenate([np.arange(30) + 100 * s for s in range(3)])
            assert np.array_equal(sh, want[want % 3 == r])
        assert server.keys_left("s3comm-test") == 0
    finally:
        server.stop()
    with pytest.raises(ValueError):
        S3Comm(object(), 3, 3, "t")
