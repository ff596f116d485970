"""One training worker process (started by a launcher of :mod:`cirrus.training`; not a user command).

Reads its job as one JSON line on stdin, then loops: prefetching minibatch iterator -> pull the
rows the minibatch touches -> gradient -> push without waiting. Every ``report_every`` seconds it
casts ``{"worker", "inc", "updates", "loss_sum", "loss_n"}`` to the driver. It stops when its
stdin closes (the driver is gone or retired it), when the parameter server says its incarnation was
retired (a newer one replaced it), or after ``max_updates``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import zipcomm

from .dataset import open_dataset
from .iterator import MinibatchIterator
from .models import make_model
from .ps.client import PSClient, Retired


async def _watch_stdin(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(1 << 12):
        pass
    stop.set()


async def train(spec: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    worker, inc = str(spec["worker"]), int(spec["inc"])
    args = dict(spec["model_args"])
    if "seed" in args:  # a sampling model: each worker incarnation draws its own random numbers
        args["seed"] = [int(args["seed"]), int(worker.lstrip("w") or 0), inc]
    model = make_model(spec["model"], **args)
    updates, loss_sum, loss_n = 0, 0.0, 0
    driver = await zipcomm.rpc_connect(spec["driver"]) if spec.get("driver") else None
    last_report = time.monotonic()
    reason = "done"
    try:
        async with await open_dataset(spec["dataset"], check=False) as ds, \
                PSClient(spec["ps"], worker=worker, inc=inc, compress=spec.get("compress", False)) as ps, \
                MinibatchIterator(ds, spec["minibatch_size"], order="random", seed=int(spec["seed"]) * 1_000_003 + inc,
                                  epochs=None, prefetch_bytes=spec.get("prefetch_bytes", 32 << 20),
                                  max_concurrency=spec.get("prefetch_concurrency", 4),
                                  partitions=spec.get("partitions")) as it:
            async for mb in it:
                if stop.is_set():
                    reason = "stopped"
                    break
                loss = await model.step(ps, mb)
                updates += 1
                loss_sum += loss
                loss_n += 1
                now = time.monotonic()
                if driver is not None and now - last_report >= spec.get("report_every", 0.25):
                    await driver.cast("progress", {"worker": worker, "inc": inc, "updates": updates,
                                                   "loss_sum": loss_sum, "loss_n": loss_n})
                    loss_sum, loss_n, last_report = 0.0, 0, now
                if spec.get("max_updates") and updates >= spec["max_updates"]:
                    break
    except Retired:
        reason = "retired"
    finally:
        if driver is not None:
            try:
                await driver.cast("progress", {"worker": worker, "inc": inc, "updates": updates,
                                               "loss_sum": loss_sum, "loss_n": loss_n, "final": reason})
            except zipcomm.ZipError:
                pass
            await driver.aclose()
    return {"updates": updates, "reason": reason}


async def _main() -> int:
    spec = json.loads(sys.stdin.readline())
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_stdin(stop), name="stdin-watch")
    trainer = asyncio.create_task(train(spec, stop), name="train")
    try:
        done, _ = await asyncio.wait([watcher, trainer], return_when=asyncio.FIRST_COMPLETED)
        if trainer not in done:  # stdin closed: stop at the next minibatch, bounded
            try:
                await asyncio.wait_for(trainer, 5.0)
            except TimeoutError:
                pass
        if trainer.done() and not trainer.cancelled() and trainer.exception() is not None:
            exc = trainer.exception()
            print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}), flush=True)
            return 2
        return 0
    finally:
        for t in (watcher, trainer):
            t.cancel()
        await asyncio.gather(watcher, trainer, return_exceptions=True)


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(asyncio.run(_main()))
