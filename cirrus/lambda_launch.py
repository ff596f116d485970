"""Training workers as AWS Lambda invocations: :class:`LambdaLauncher`.

The same interface as :class:`cirrus.launch.LocalLauncher` (``start``, ``maintain``, ``stop``,
``kill_now``, ``pids``, ``running_worker_seconds`` and the counters ``worker_seconds``,
``started_total``, ``deaths``, ``retirements``), but each worker incarnation is one asynchronous
(``InvocationType="Event"``) invocation of a Lambda function — by default ``cirrus-worker``, whose
handler is :func:`cirrus.lambda_handler.handler` — made with **aiobotocore**. Credentials, region
and endpoint come from the standard AWS settings (environment, config files, instance roles) unless
given explicitly; ``endpoint_url`` points it at :mod:`cirrus.lambda_local` for local runs.

Stopping. An ``Event`` invocation cannot be cancelled, so a worker is stopped by **retiring its
incarnation** at the parameter server (the ``retire`` callback, normally ``PSClient.retire``): its
next pull raises ``Retired`` and the handler returns. Without a ``retire`` callback the launcher
cannot stop workers; they run until ``max_updates`` or the function's timeout.

Liveness is approximated, since nothing reports when an ``Event`` invocation ends: an incarnation
counts as running from its invocation until it is retired — at its ``lifetime``, at :meth:`stop` /
:meth:`kill_now` — or until ``function_timeout`` seconds have passed (by then Lambda has ended it:
the handler stops itself shortly before the timeout). The effective lifetime is therefore
``min(lifetime, function_timeout)``; when it passes, :meth:`maintain` retires the incarnation and
invokes ``inc + 1`` (counted in ``retirements``). A worker that finished early (``max_updates``)
or crashed is not noticed and is still counted as running until then, so ``worker_seconds`` (from
invocation to retirement / timeout) is an upper bound of the billed duration. An invocation the
service refused (throttling, a network error) counts as a death and is retried at the next
:meth:`maintain`. ``deaths`` counts only those.

Deploying on AWS: give the function a timeout of ``function_timeout`` seconds and
``worker_size_mb`` of memory, and set its asynchronous-invocation retries to 0
(``put_function_event_invoke_config(MaximumRetryAttempts=0)``): a retried incarnation would only
have its pushes refused as duplicates or zombies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

Retire = Callable[[str, int], Awaitable[None]]

log = logging.getLogger("cirrus.lambda")

DEFAULT_FUNCTION = "cirrus-worker"
DEFAULT_FUNCTION_TIMEOUT = 900.0  # seconds: AWS Lambda's maximum


@dataclass
class _Slot:
    index: int
    inc: int = -1
    started: float | None = None   # monotonic time of the current incarnation's invocation; None: not running
    request_id: str = ""

    @property
    def worker(self) -> str:
        return f"w{self.index}"


class LambdaLauncher:
    def __init__(self, spec: dict[str, Any], n_workers: int, *, worker_size_mb: int | None = None,
                 lifetime: float | None = None, retire: Retire | None = None,
                 function_name: str = DEFAULT_FUNCTION, function_timeout: float = DEFAULT_FUNCTION_TIMEOUT,
                 endpoint_url: str | None = None, region_name: str | None = None,
                 aws_access_key_id: str | None = None, aws_secret_access_key: str | None = None,
                 aws_session_token: str | None = None, session: Any = None, config: Any = None,
                 retire_timeout: float = 10.0) -> None:
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        if lifetime is not None and lifetime <= 0:
            raise ValueError("lifetime must be > 0 seconds (or None)")
        if function_timeout <= 0:
            raise ValueError("function_timeout must be > 0 seconds")
        self.spec = spec
        self.slots = [_Slot(i) for i in range(n_workers)]
        self.worker_size_mb = worker_size_mb  # the function's memory size is set when it is deployed
        self.lifetime = lifetime
        self.retire = retire
        self.function_name = function_name
        self.function_timeout = float(function_timeout)
        self.effective_lifetime = min(lifetime if lifetime is not None else math.inf, self.function_timeout)
        self.retire_timeout = retire_timeout
        self._client_args = {k: v for k, v in {
            "endpoint_url": endpoint_url, "region_name": region_name, "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key, "aws_session_token": aws_session_token,
            "config": config}.items() if v is not None}
        self._session = session
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self.worker_seconds = 0.0
        self.started_total = 0
        self.deaths = 0
        self.retirements = 0
        self.invoke_errors: list[str] = []
        self._stopped = False
        self._pending: list[asyncio.Task] = []

    # -- the Lambda client ---------------------------------------------------------------------------
    async def _lambda(self) -> Any:
        if self._client is None:
            if self._session is None:
                from aiobotocore.session import get_session
                self._session = get_session()
            self._stack = contextlib.AsyncExitStack()
            self._client = await self._stack.enter_async_context(
                self._session.create_client("lambda", **self._client_args))
        return self._client

    async def _close_client(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- invocations ---------------------------------------------------------------------------------
    async def _invoke(self, slot: _Slot) -> None:
        """Invoke incarnation ``slot.inc + 1`` (Event: returns once Lambda accepted it)."""
        slot.inc += 1
        spec = dict(self.spec, worker=slot.worker, inc=slot.inc)
        client = await self._lambda()
        resp = await client.invoke(FunctionName=self.function_name, InvocationType="Event",
                                   Payload=json.dumps(spec).encode())
        body = resp.get("Payload")
        if body is not None:
            async with body as stream:
                await stream.read()
        status = resp.get("StatusCode")
        if status != 202:
            raise RuntimeError(f"invoking {self.function_name} answered {status}, not 202")
        slot.started = time.monotonic()
        slot.request_id = resp.get("ResponseMetadata", {}).get("RequestId", "")
        self.started_total += 1

    async def start(self) -> None:
        """Invoke every worker's first incarnation (an error here, e.g. an unknown function, is raised)."""
        for slot in self.slots:
            await self._invoke(slot)

    def pids(self) -> list[int]:
        """Lambda workers have no local processes."""
        return []

    def _account(self, slot: _Slot, until: float | None = None) -> None:
        if slot.started is not None:
            end = time.monotonic() if until is None else until
            self.worker_seconds += max(0.0, end - slot.started)
            slot.started = None

    async def _retire(self, slot: _Slot) -> None:
        if self.retire is not None:
            await asyncio.wait_for(self.retire(slot.worker, slot.inc), self.retire_timeout)

    async def maintain(self) -> None:
        """Retire incarnations past their lifetime (or the function timeout) and invoke the next ones;
        retry invocations that failed."""
        if self._stopped:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.started is not None and now - slot.started >= self.effective_lifetime:
                self.retirements += 1
                await self._retire(slot)
                self._account(slot, min(now, slot.started + self.function_timeout))
            if slot.started is None:
                try:
                    await self._invoke(slot)
                except Exception as exc:  # refused / unreachable: a death; try again next time
                    self.deaths += 1
                    self.invoke_errors.append(f"{slot.worker}/{slot.inc}: {exc}")
                    log.warning("invoking %s for %s/%d failed: %s", self.function_name, slot.worker, slot.inc, exc)

    async def _retire_all(self) -> None:
        now = time.monotonic()
        live = [s for s in self.slots if s.started is not None]
        for slot in live:
            self._account(slot, min(now, slot.started + self.function_timeout))
        results = await asyncio.gather(*(self._retire(s) for s in live), return_exceptions=True)
        for slot, r in zip(live, results):
            if isinstance(r, BaseException):
                log.warning("retiring %s/%d failed: %r", slot.worker, slot.inc, r)

    async def stop(self, grace: float = 5.0) -> None:
        """Retire every running incarnation (they stop at their next pull) and close the client.

        ``grace`` bounds the wait for the retirements; the invocations themselves are not waited for
        (they cannot be observed)."""
        self._stopped = True
        self._pending.append(asyncio.get_running_loop().create_task(self._retire_all()))
        pending, self._pending = self._pending, []
        try:
            async with asyncio.timeout(max(grace, 0.001)):
                await asyncio.gather(*pending, return_exceptions=True)
        except TimeoutError:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._close_client()

    def kill_now(self) -> None:
        """Retire every worker at once (in the background; :meth:`stop` waits for it)."""
        self._stopped = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: stop() retires them
        self._pending.append(loop.create_task(self._retire_all()))

    def running_worker_seconds(self) -> float:
        now = time.monotonic()
        return self.worker_seconds + sum(min(now - s.started, self.function_timeout)
                                         for s in self.slots if s.started is not None)
