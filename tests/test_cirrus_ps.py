"""cirrus.ps: sharded parameter server over zipcomm rpc — routing, optimizers, at-most-once pushes,
retired incarnations, staleness bound, key-value store, checkpoints across a real kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cirrus.optim import make_optimizer
from cirrus.ps import PSClient, Retired, Shard
from zipcomm import RemoteError
from zipcomm.testing.cluster import wait_for_file


async def _shards(k: int, **kw) -> tuple[list[Shard], list[str]]:
    shards = [Shard(i, k, **kw) for i in range(k)]
    return shards, [await s.start() for s in shards]


@pytest.mark.asyncio
@pytest.mark.parametrize("k", [1, 3])
async def test_sharded_pull_push_equals_one_optimizer_over_the_whole_table(k) -> None:
    shards, addrs = await _shards(k)
    try:
        async with PSClient(addrs, worker="w0") as ps:
            await ps.create("w", 1000, 2, optimizer="adagrad", hyper={"lr": 0.5, "l2": 0.01})
            ref = np.zeros((1000, 2), np.float32)
            opt = make_optimizer("adagrad", (1000, 2), np.float32, lr=0.5, l2=0.01)
            rng = np.random.default_rng(0)
            for _ in range(20):
                rows = np.unique(rng.integers(0, 1000, 60))
                np.testing.assert_allclose(await ps.pull("w", rows), ref[rows], rtol=1e-6, atol=1e-7)
                g = rng.standard_normal((rows.size, 2)).astype(np.float32)
                replies = await ps.push("w", rows, g, wait=True)
                assert all(r["applied"] for r in replies)
                opt.apply(ref, rows, g)
            np.testing.assert_allclose(await ps.pull_all("w", 1000), ref, rtol=1e-6, atol=1e-7)
            stats = await ps.stats()
            assert sum(s["applied"] for s in stats) >= 20 and all(s["n_shards"] == k for s in stats)
    finally:
        for s in shards:
            await s.aclose()


@pytest.mark.asyncio
async def test_at_most_once_retired_incarnations_and_staleness() -> None:
    shards, addrs = await _shards(2, max_staleness=3)
    try:
        async with PSClient(addrs, worker="a", inc=0) as a, PSClient(addrs, worker="b", inc=0) as b:
            await a.create("w", 10, 1, optimizer="sgd", hyper={"lr": 1.0})
            rows = np.array([0, 1])
            await a.pull("w", rows)
            assert [r["applied"] for r in await a.push("w", rows, np.ones(2), wait=True)] == [True, True]
            a.step -= 1  # the same step again (a retried push): refused, not applied twice
            assert {r["reason"] for r in await a.push("w", rows, np.ones(2), wait=True)} == {"duplicate"}
            np.testing.assert_array_equal((await b.pull("w", rows)).ravel(), [-1.0, -1.0])
            # b computes on an old model while a moves on: beyond 3 versions it is refused
            for _ in range(4):
                await a.pull("w", rows)
                await a.push("w", rows, np.ones(2), wait=True)
            replies = await b.push("w", rows, np.ones(2), wait=True)
            assert {r["reason"] for r in replies} == {"stale"} and all(r["staleness"] > 3 for r in replies)
            # a replaced by incarnation 1: incarnation 0's pushes are refused, its pulls say stop
            await a.retire("a", 0)
            replies = await a.push("w", rows, np.ones(2), wait=True)
            assert {r["reason"] for r in replies} == {"retired"}
            with pytest.raises(Retired):
                await a.pull("w", rows)
            async with PSClient(addrs, worker="a", inc=1) as a1:
                await a1.pull("w", rows)
                assert all(r["applied"] for r in await a1.push("w", rows, np.ones(2), wait=True))
            stats = await b.stats()
            assert sum(s["refused_duplicate"] for s in stats) == 2
            assert sum(s["refused_zombie"] for s in stats) == 2
            assert sum(s["refused_stale"] for s in stats) == 2
            assert max(s["staleness_max"] for s in stats) <= 3
            # key-value store; bad calls are typed errors and the server keeps going
            await b.kv_set("phase", {"epoch": 3})
            await b.kv_set("vec", np.arange(5.0))
            assert await b.kv_get("phase") == {"epoch": 3}
            np.testing.assert_array_equal(await b.kv_get("vec"), np.arange(5.0))
            assert await b.kv_get("missing", 7) == 7
            with pytest.raises(RemoteError, match="no table"):
                await b.pull("nope", rows)
            with pytest.raises(RemoteError, match="out of range"):
                await b.pull("w", np.array([999]))
            with pytest.raises(RemoteError, match="another spec"):
                await b.create("w", 10, 1, optimizer="adam", hyper={"lr": 1.0})
    finally:
        for s in shards:
            await s.aclose()


@pytest.mark.asyncio
async def test_kill9_and_resume_from_checkpoint(tmp_path) -> None:
    ckpt, ready = str(tmp_path / "ckpt"), str(tmp_path / "ready.json")
    cmd = [sys.executable, "-m", "cirrus.ps", "--shards", "2", "--checkpoint", ckpt, "--ready-file", ready]

    async def start(*extra: str) -> tuple[asyncio.subprocess.Process, list[str]]:
        if os.path.exists(ready):
            os.unlink(ready)
        proc = await asyncio.create_subprocess_exec(*cmd, *extra, stdout=asyncio.subprocess.DEVNULL,
                                                    start_new_session=True)
        await wait_for_file(ready, proc, "parameter server")
        with open(ready) as f:
            return proc, json.load(f)["shards"]

    proc, addrs = await start()
    rows = np.arange(0, 100, 7)
    try:
        async with PSClient(addrs, worker="w", inc=0) as ps:
            await ps.create("w", 100, 1, optimizer="momentum", hyper={"lr": 0.1, "momentum": 0.9})
            for _ in range(5):
                await ps.pull("w", rows)
                await ps.push("w", rows, np.ones(rows.size), wait=True)
            before = await ps.pull_all("w", 100)
            await ps.checkpoint()
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and both shards, without warning
        await proc.wait()
        proc, addrs = await start("--resume")
        async with PSClient(addrs, worker="w", inc=0) as ps:
            np.testing.assert_array_equal(await ps.pull_all("w", 100), before)
            await ps.create("w", 100, 1, optimizer="momentum", hyper={"lr": 0.1, "momentum": 0.9})  # idempotent
            ps.step = 3  # a push the old server applied (step 3) is not applied again ...
            assert {r["reason"] for r in await ps.push("w", rows, np.ones(rows.size), wait=True)} == {"duplicate"}
            ps.step = 5  # ... and the next step continues with the saved momentum
            await ps.pull("w", rows)
            await ps.push("w", rows, np.ones(rows.size), wait=True)
            after = await ps.pull_all("w", 100)
        ref = np.zeros((100, 1), np.float32)
        opt = make_optimizer("momentum", (100, 1), np.float32, lr=0.1, momentum=0.9)
        for _ in range(6):
            opt.apply(ref, rows, np.ones((rows.size, 1)))
        np.testing.assert_allclose(after, ref, rtol=1e-6)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)
            await proc.wait()


def test_cli_help_and_bad_arguments() -> None:
    h = subprocess.run([sys.executable, "-m", "cirrus.ps", "--help"], capture_output=True, text=True, timeout=60)
    for opt in ("--shards", "--checkpoint", "--checkpoint-every", "--resume", "--max-staleness", "--ready-file"):
        assert opt in h.stdout
    bad = subprocess.run([sys.executable, "-m", "cirrus.ps", "--resume"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--resume needs --checkpoint" in bad.stderr
