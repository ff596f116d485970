"""One worker process of a preprocessing job (started by :mod:`cirrus.preprocess`; not a user command).

Reads its job as one JSON line on stdin, then reports on stdout, one JSON object per line:
``{"progress": 1}`` per partition step, ``{"result": {...}}`` at the end, or ``{"error": {...}}``
(exit code 2). It exits at once if its stdin closes (the coordinator is gone), so no worker
outlives its job. Members find each other through the job's zipcomm controller:

* normalize — map: statistics of this worker's partitions; reduce: zipcomm allreduce with
  :func:`cirrus.transforms.combine_stats`; map: normalize each partition and write it.
* hash — map: hash each partition and write it, counting entries per bucket; reduce: zipcomm
  allreduce (SUM) of the counts, reported by rank 0.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from typing import Any

import numpy as np

import zipcomm

from ._child import stdin_closed
from .dataset import open_dataset, write_partition
from .errors import CirrusError
from .storage import open_store
from .transforms import combine_stats, empty_stats, hash_partition, normalize_partition, partition_stats

STATS_KEY = "stats.npy"


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class JobFailed(CirrusError):
    """The job's collective step did not include every worker."""


async def _watch_stdin() -> None:
    await stdin_closed()
    os._exit(3)  # the coordinator closed our stdin or died: nobody wants our result


async def _join_all(rt: Any, spec: dict[str, Any], reduce_f: Any, deadline: float) -> Any:
    """Join the job's reduce channel, then count members on a barrier channel until all
    ``n_workers`` are in (every worker joined the reduce channel before the barrier one)."""
    name, n = spec["channel"], spec["n_workers"]
    red = await rt.reduce_channel(f"{name}-reduce", reduce_f=reduce_f, timeout=_left(deadline))
    bar = await rt.reduce_channel(f"{name}-barrier", reduce_f=zipcomm.SUM, timeout=_left(deadline))
    while True:
        got = await bar.allreduce(np.ones(1, dtype=np.int64), timeout=_left(deadline))
        count = int(np.asarray(got).reshape(-1)[0])
        if count == n:
            return red
        if count > n:
            raise JobFailed(f"{count} members in job channel {name!r}, expected {n}")


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())


async def _allreduce_all(red: Any, value: np.ndarray, n: int, deadline: float) -> np.ndarray:
    result, contributors = await red.allreduce(value, timeout=_left(deadline), with_contributors=True)
    if len(contributors) != n:
        raise JobFailed(f"the reduce step counted {len(contributors)} of {n} workers (one died?)")
    return np.asarray(result)


async def _normalize(spec: dict[str, Any], rt: Any, deadline: float) -> dict[str, Any]:
    async with await open_dataset(spec["in"], check=False) as ds:
        red = await _join_all(rt, spec, combine_stats, deadline)
        local = empty_stats(ds.n_features)
        for i in spec["parts"]:
            p = await ds.read_partition(i)
            local = combine_stats([local, await asyncio.to_thread(partition_stats, p, ds.partition_name(i))])
            _say({"progress": 1})
        stats = await _allreduce_all(red, local, spec["n_workers"], deadline)
        out = open_store(spec["out"])
        try:
            entries = {}
            for i in spec["parts"]:
                p = await ds.read_partition(i)
                q = await asyncio.to_thread(normalize_partition, p, stats, spec["method"],
                                            tuple(spec["feature_range"]))
                entries[i] = await write_partition(out, i, q)
                _say({"progress": 1})
            if spec["rank"] == 0:
                buf = io.BytesIO()
                np.save(buf, stats, allow_pickle=False)
                await out.put(STATS_KEY, buf.getvalue())
        finally:
            await out.aclose()
    return {"entries": entries}


async def _hash(spec: dict[str, Any], rt: Any, deadline: float) -> dict[str, Any]:
    bits = spec["hash_bits"]
    async with await open_dataset(spec["in"], check=False) as ds:
        categorical = np.zeros(ds.n_features, dtype=bool)
        categorical[spec["columns"]] = True
        red = await _join_all(rt, spec, zipcomm.SUM, deadline)
        counts = np.zeros(1 << bits, dtype=np.int64)
        out = open_store(spec["out"])
        try:
            entries = {}
            for i in spec["parts"]:
                p = await ds.read_partition(i)
                q = await asyncio.to_thread(hash_partition, p, categorical, bits)
                counts += np.bincount(q.indices, minlength=counts.size)  # type: ignore[arg-type]
                entries[i] = await write_partition(out, i, q)
                _say({"progress": 1})
        finally:
            await out.aclose()
        total = await _allreduce_all(red, counts, spec["n_workers"], deadline)
    result: dict[str, Any] = {"entries": entries}
    if spec["rank"] == 0:
        result["buckets"] = {"n_buckets": int(total.size), "used": int(np.count_nonzero(total)),
                             "max_load": int(total.max(initial=0)), "stored_entries": int(total.sum())}
    return result


def _report(exc: BaseException) -> None:
    attrs = {k: getattr(exc, k) for k in ("name", "uri", "key") if isinstance(getattr(exc, k, None), str)}
    _say({"error": {"type": type(exc).__name__, "message": str(exc) or repr(exc), "attrs": attrs}})


async def _main() -> int:
    line = sys.stdin.readline()
    spec = json.loads(line)
    watcher = asyncio.create_task(_watch_stdin(), name="stdin-watch")
    deadline = time.monotonic() + float(spec["timeout"])
    try:
        async with await zipcomm.connect(spec["controller"]) as rt:
            job = _normalize if spec["job"] == "normalize" else _hash
            try:
                result = await job(spec, rt, deadline)
            except Exception as exc:  # said before leaving the channels, so it arrives before the echo
                _report(exc)      # of our departure in the other workers
                return 2
        _say({"result": result})
        return 0
    except Exception as exc:  # reported to the coordinator, which raises it in the caller
        _report(exc)
        return 2
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
