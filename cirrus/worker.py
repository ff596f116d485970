"""One training worker process (started by a launcher of :mod:`cirrus.training`; not a user command).

Reads its job as one JSON line on stdin, then loops: prefetching minibatch iterator -> pull the
rows the minibatch touches -> gradient -> push without waiting. Every ``report_every`` seconds it
casts ``{"worker", "inc", "updates", "loss_sum", "loss_n"}`` to the driver. It stops when its
stdin closes (the driver is gone or retired it), when the parameter server says its incarnation was
retired (a newer one replaced it), or after ``max_updates``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import zipcomm

from ._child import stdin_closed
from .dataset import open_dataset
from .iterator import MinibatchIterator
from .models import make_model
from .ps.client import PSClient, Retired
from .syncps import AllreducePS


async def _watch_stdin(stop: asyncio.Event) -> None:
    await stdin_closed()
    stop.set()


async def train(spec: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    worker, inc = str(spec["worker"]), int(spec["inc"])
    args = dict(spec["model_args"])
    if "seed" in args:  # a sampling model: each worker incarnation draws its own random numbers
        args["seed"] = [int(args["seed"]), int(worker.lstrip("w") or 0), inc]
    model = make_model(spec["model"], **args)
    driver = await zipcomm.rpc_connect(spec["driver"]) if spec.get("driver") else None
    counters: list = [0, 0.0, 0, time.monotonic()]  # updates, loss sum, loss count, last report
    reason = "done"
    sync = spec.get("sync")
    try:
        async with contextlib.AsyncExitStack() as stack:
            if sync:  # no parameter server: synchronous SGD over zipcomm allreduce
                rt = await stack.enter_async_context(await zipcomm.connect(sync["controller"]))
                ps: Any = await AllreducePS(rt, sync["channel"], sync["n_workers"], sync["tables"]).connect()
            else:
                ps = await stack.enter_async_context(
                    PSClient(spec["ps"], worker=worker, inc=inc, compress=spec.get("compress", False)))
            await _loop(spec, model, ps, stack, stop, driver, worker, inc, counters)
            reason = "stopped" if stop.is_set() else "done"
    except Retired:
        reason = "retired"
    finally:
        if driver is not None:
            try:
                await driver.cast("progress", {"worker": worker, "inc": inc, "updates": counters[0],
                                               "loss_sum": counters[1], "loss_n": counters[2], "final": reason})
            except zipcomm.ZipError:
                pass
            await driver.aclose()
    return {"updates": counters[0], "reason": reason}


async def _loop(spec: dict[str, Any], model: Any, ps: Any, stack: contextlib.AsyncExitStack, stop: asyncio.Event,
                driver: Any, worker: str, inc: int, counters: list) -> None:
    """The training loop; ``counters`` = [updates, loss_sum, loss_n, last_report] (kept up to date
    so the caller can report them however the loop ends)."""
    sync = spec.get("sync")
    last_model = time.monotonic()
    ds = await stack.enter_async_context(await open_dataset(spec["dataset"], check=False))
    parts = spec.get("partitions")
    if spec.get("own_partitions"):  # the model keeps per-partition state: each worker has its share
        parts = (parts if parts is not None else list(range(ds.n_partitions)))[
            int(worker.lstrip("w") or 0)::int(spec["n_workers"])]
        if not parts:  # more workers than partitions: nothing to do until told to stop
            await stop.wait()
            return
    it = await stack.enter_async_context(MinibatchIterator(ds, spec["minibatch_size"], order="random", seed=int(spec["seed"]) * 1_000_003 + inc,
                                  epochs=None, prefetch_bytes=spec.get("prefetch_bytes", 32 << 20),
                                  max_concurrency=spec.get("prefetch_concurrency", 4),
                                  partitions=parts))
    pending = None  # pipelined models: (minibatch, rows, context, pulled rows) of the next step
    pipelined = not sync and hasattr(model, "rows_of")
    async for mb in it:
        if stop.is_set():
            break
        if pipelined:  # one round trip per update: push this step's gradient with the next pull
            rows, ctx = model.rows_of(mb)
            if pending is None:
                pending = (mb, rows, ctx, await ps.pull(model.table, rows))
                continue
            pmb, prows, pctx, pw = pending
            loss, g = model.gradient(pmb, pctx, pw)
            pending = (mb, rows, ctx, await ps.push_pull(model.table, prows, g, rows))
        else:
            loss = await model.step(ps, mb)
            if sync:
                await ps.sync()
        counters[0] += 1
        counters[1] += loss
        counters[2] += 1
        now = time.monotonic()
        if driver is not None and now - counters[3] >= spec.get("report_every", 0.25):
            await driver.cast("progress", {"worker": worker, "inc": inc, "updates": counters[0],
                                           "loss_sum": counters[1], "loss_n": counters[2]})
            counters[1], counters[2], counters[3] = 0.0, 0, now
        if sync and driver is not None and worker == "w0" and now - last_model >= sync.get("model_every", 1.0):
            await driver.cast("model", {"tables": ps.tables, "updates": counters[0]})
            last_model = now
        if spec.get("max_updates") and counters[0] >= spec["max_updates"]:
            break
    if pending is not None and not stop.is_set():
        pmb, prows, pctx, pw = pending
        await ps.push(model.table, prows, model.gradient(pmb, pctx, pw)[1])


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
