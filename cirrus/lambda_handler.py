"""The AWS Lambda entry point of a cirrus training worker: ``cirrus.lambda_handler.handler``.

Deploy the cirrus package as a Lambda function with this handler (or serve it locally with
:mod:`cirrus.lambda_local`) and start workers with :class:`cirrus.lambda_launch.LambdaLauncher`.
The event is the worker spec (the same dict ``python -m cirrus.worker`` reads on stdin, with
``worker`` and ``inc``); the handler runs :func:`cirrus.worker.train` until

* the parameter server says this incarnation was retired (how a launcher stops a Lambda worker),
* ``max_updates`` is reached, or
* less than ``stop_margin`` seconds (event key, default :data:`STOP_MARGIN_S`) of the invocation's
  time are left (``context.get_remaining_time_in_millis()``, checked every
  :data:`CHECK_EVERY_S` by a watcher task; the worker stops at its next minibatch), so it returns
  cleanly instead of being killed by the timeout,

and returns train's result ``{"updates": N, "reason": "done" | "retired" | "stopped"}``. With
``context=None`` there is no time limit.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

STOP_MARGIN_S = 2.0
CHECK_EVERY_S = 0.1

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


async def _watch_deadline(context: Any, stop: asyncio.Event, margin_ms: float) -> None:
    while context.get_remaining_time_in_millis() > margin_ms:
        await asyncio.sleep(CHECK_EVERY_S)
    stop.set()


async def run_worker(spec: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Train as worker ``spec["worker"]`` incarnation ``spec["inc"]`` until a stop condition."""
    from .worker import train

    stop = asyncio.Event()
    watcher = None
    if context is not None:
        margin = float(spec.get("stop_margin", STOP_MARGIN_S)) * 1000.0
        watcher = asyncio.create_task(_watch_deadline(context, stop, margin), name="deadline-watch")
    try:
        return await train(spec, stop)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


def handler(event: Any, context: Any) -> dict[str, Any]:
    """Lambda handler: ``event`` is the worker spec (a dict, or its JSON text)."""
    spec = json.loads(event) if isinstance(event, (str, bytes)) else event
    if not isinstance(spec, dict):
        raise TypeError(f"the event must be a worker spec (a JSON object), not {type(spec).__name__}")
    for key in ("worker", "inc", "ps", "dataset", "model"):
        if key not in spec:
            raise ValueError(f"the worker spec has no {key!r}")
    return asyncio.run(run_worker(spec, context))
