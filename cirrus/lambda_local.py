"""A local stand-in for AWS Lambda: a server that speaks the Lambda **Invoke** HTTP API.

``POST /2015-03-31/functions/{FunctionName}/invocations`` with a JSON body (the event) and the
``X-Amz-Invocation-Type`` header answers as AWS does:

* ``RequestResponse`` (the default): 200 and the handler's result as JSON; if the handler raised,
  timed out or its process died, still 200 but with ``X-Amz-Function-Error: Unhandled`` and an
  error document ``{"errorMessage", "errorType", "stackTrace"}``;
* ``Event``: 202 at once, the handler runs in the background;
* ``DryRun``: 204 (the function exists and the request is valid);
* an unknown function: 404 ``ResourceNotFoundException``; a body that is not JSON: 400
  ``InvalidRequestContentException``; an unknown invocation type: 400 ``InvalidParameterValueException``
  (error documents with ``__type`` / ``message`` and the ``x-amzn-ErrorType`` header, so botocore
  raises the same exception classes as against AWS).

``FunctionName`` may also be a function ARN (``arn:aws:lambda:region:account:function:NAME``); a
qualifier (``:alias`` or ``?Qualifier=``) is accepted and ignored. ``X-Amz-Log-Type: Tail`` returns
the last 4 KB of the invocation's stderr base64-encoded in ``X-Amz-Log-Result``. An empty body is the
event ``{}``.

Every invocation runs in its own **subprocess** (a fresh Python, like a cold start): a tiny runner
(:data:`RUNNER`, run with ``python -c``) caps its address space with ``setrlimit(RLIMIT_AS)`` at the
function's memory size, imports the handler (``"module:function"``), reads the event JSON from stdin,
calls ``handler(event, context)`` and writes the result JSON to its own stdout (anything the
handler prints goes to stderr, the function's log). ``context`` has ``function_name``,
``memory_limit_in_mb``, ``aws_request_id``, ``invoked_function_arn`` and
``get_remaining_time_in_millis()``. At the function's timeout the process group is killed and the
invocation fails with ``Task timed out after N seconds``. :meth:`LambdaServer.aclose` kills every
running invocation (no orphans: each runs in its own session / process group).

Limits not modelled: concurrency limits and throttling, payload size limits, warm containers
(every invocation is a cold start), the retries AWS makes of failed ``Event`` invocations.

Command line (``--help`` for details)::

    python -m cirrus.lambda_local --listen 127.0.0.1:0 --function cirrus-worker=cirrus.lambda_handler:handler \\
        --timeout 900 --memory 1024 --ready-file /tmp/lambda.json

The small handlers :func:`echo`, :func:`fail`, :func:`sleep` and :func:`allocate` are for tests and
smoke checks.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

API_PREFIX = "/2015-03-31/functions/"
DEFAULT_TIMEOUT = 3.0      # seconds, as AWS's default
DEFAULT_MEMORY_MB = 1024
LOG_TAIL_BYTES = 4096
_STDERR_KEEP = 64 << 10

# Runs in the invocation's process: python -c RUNNER <handler> <function name> <memory MB> <deadline> <request id>
RUNNER = r"""
import os, resource, sys
_mem = int(sys.argv[3])
if _mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (_mem << 20, _mem << 20))
_out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr
import importlib, json, time, traceback

class Context:
    def __init__(self):
        self.function_name = sys.argv[2]
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = _mem
        self.aws_request_id = sys.argv[5]
        self.invoked_function_arn = "arn:aws:lambda:local:000000000000:function:" + sys.argv[2]
        self._deadline = float(sys.argv[4])
    def get_remaining_time_in_millis(self):
        return max(0, int((self._deadline - time.time()) * 1000))

def _error(exc):
    return {"errorMessage": str(exc), "errorType": type(exc).__name__,
            "stackTrace": traceback.format_tb(exc.__traceback__)}

try:
    _mod, _, _fn = sys.argv[1].partition(":")
    _handler = getattr(importlib.import_module(_mod), _fn)
    _event = json.loads(sys.stdin.read() or "{}")
except BaseException as exc:
    _doc = _error(exc)
    _doc["errorType"] = "Runtime.ImportModuleError"
    _out.write(json.dumps({"error": _doc}) + "\n")
    _out.flush()
    sys.exit(1)
try:
    _result = _handler(_event, Context())
except BaseException as exc:
    _reply = {"error": _error(exc)}
else:
    try:
        _reply = {"result": json.loads(json.dumps(_result))}
    except (TypeError, ValueError) as exc:
        _reply = {"error": {"errorMessage": "Unable to marshal response: " + str(exc),
                            "errorType": "Runtime.MarshalError", "stackTrace": []}}
_out.write(json.dumps(_reply) + "\n")
_out.flush()
sys.exit(0)
"""


@dataclass
class Function:
    """A registered function: its handler (``"module:function"``), timeout (s) and memory size (MB)."""

    handler: str
    timeout: float | None = None
    memory_mb: int | None = None


@dataclass
class Invocation:
    """One invocation (kept in :attr:`LambdaServer.completed` once it ended)."""

    function: str
    kind: str
    request_id: str
    event: Any
    started: float = field(default_factory=time.monotonic)
    pid: int | None = None
    ended: float | None = None
    result: Any = None
    error: dict | None = None
    log: bytes = b""


class LambdaServer:
    """The Invoke API on ``host`` (loopback only by default) for ``functions``.

    ``functions`` maps a function name to a handler string ``"module:function"`` or a
    :class:`Function` (own timeout / memory); ``timeout`` and ``memory_mb`` are the defaults.
    Observability for tests and tools: :attr:`invocations` (total count), :attr:`invocations_by_function`,
    :meth:`running_pids`, :attr:`completed` (finished :class:`Invocation` records, newest last).
    """

    def __init__(self, functions: Mapping[str, str | Function], *, timeout: float = DEFAULT_TIMEOUT,
                 memory_mb: int | None = DEFAULT_MEMORY_MB, host: str = "127.0.0.1", port: int = 0,
                 env: Mapping[str, str] | None = None, keep_completed: int = 1000) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.functions: dict[str, Function] = {}
        for name, f in functions.items():
            fn = f if isinstance(f, Function) else Function(str(f))
            if ":" not in fn.handler:
                raise ValueError(f"function {name!r}: handler must be 'module:function', got {fn.handler!r}")
            self.functions[name] = Function(fn.handler, fn.timeout or timeout,
                                            fn.memory_mb if fn.memory_mb is not None else memory_mb)
        self.host, self.port = host, port
        self.env = dict(env) if env is not None else None
        self.keep_completed = keep_completed
        self.invocations = 0
        self.invocations_by_function: dict[str, int] = {}
        self.completed: list[Invocation] = []
        self._running: dict[str, tuple[Invocation, asyncio.subprocess.Process]] = {}
        self._background: set[asyncio.Task] = set()
        self._runner: Any = None
        self._closing = False
        self.address = ""

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> str:
        """Listen; return ``host:port``."""
        from aiohttp import web

        app = web.Application(client_max_size=8 << 20)
        app.router.add_post(API_PREFIX + "{name}/invocations", self._invoke)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.address = f"{host}:{port}"
        return self.address

    @property
    def endpoint_url(self) -> str:
        """``http://host:port`` for ``endpoint_url=`` of a botocore client."""
        return f"http://{self.address}"

    async def aclose(self) -> None:
        """Kill running invocations, stop listening, wait for background invocations to end."""
        self._closing = True
        self._kill_all()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> LambdaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def running_pids(self) -> list[int]:
        """Process ids of the invocations running now."""
        return [p.pid for _, p in self._running.values() if p.returncode is None]

    def _kill_all(self) -> None:
        for _, proc in list(self._running.values()):
            _kill_group(proc)

    # -- HTTP ---------------------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, kind: str, message: str) -> Any:
        from aiohttp import web

        return web.json_response({"__type": kind, "Type": "User", "message": message}, status=status,
                                 headers={"x-amzn-ErrorType": kind, "x-amzn-RequestId": str(uuid.uuid4())})

    def _lookup(self, raw: str) -> str | None:
        name = raw
        if name.startswith("arn:"):  # arn:aws:lambda:region:account:function:NAME[:qualifier]
            parts = name.split(":")
            name = parts[6] if len(parts) > 6 else ""
        else:
            name = name.split(":", 1)[0]
        return name if name in self.functions else None

    async def _invoke(self, request: Any) -> Any:
        from aiohttp import web

        raw = request.match_info["name"]
        name = self._lookup(raw)
        if name is None:
            return self._error(404, "ResourceNotFoundException", f"Function not found: "
                               f"arn:aws:lambda:local:000000000000:function:{raw}")
        kind = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if kind not in ("RequestResponse", "Event", "DryRun"):
            return self._error(400, "InvalidParameterValueException",
                               f"Invalid invocation type {kind!r}: RequestResponse | Event | DryRun")
        body = await request.read()
        try:
            event = json.loads(body) if body.strip() else {}
        except (UnicodeDecodeError, ValueError) as exc:
            return self._error(400, "InvalidRequestContentException",
                               f"Could not parse request body into json: {exc}")
        if self._closing:
            return self._error(503, "ServiceException", "the server is shutting down")
        request_id = str(uuid.uuid4())
        headers = {"x-amzn-RequestId": request_id, "X-Amz-Executed-Version": "$LATEST"}
        if kind == "DryRun":
            return web.Response(status=204, headers=headers)
        inv = Invocation(name, kind, request_id, event)
        self.invocations += 1
        self.invocations_by_function[name] = self.invocations_by_function.get(name, 0) + 1
        if kind == "Event":
            task = asyncio.get_running_loop().create_task(self._run(inv), name=f"lambda-{name}-{request_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return web.Response(status=202, headers=headers)
        await self._run(inv)
        if request.headers.get("X-Amz-Log-Type") == "Tail":
            headers["X-Amz-Log-Result"] = base64.b64encode(inv.log[-LOG_TAIL_BYTES:]).decode()
        if inv.error is not None:
            headers["X-Amz-Function-Error"] = "Unhandled"
            return web.Response(status=200, body=json.dumps(inv.error).encode(), headers=headers,
                                content_type="application/json")
        return web.Response(status=200, body=json.dumps(inv.result).encode(), headers=headers,
                            content_type="application/json")

    # -- running one invocation ----------------------------------------------------------------------
    async def _run(self, inv: Invocation) -> None:
        fn = self.functions[inv.function]
        timeout = float(fn.timeout or DEFAULT_TIMEOUT)
        env = dict(self.env if self.env is not None else os.environ)
        env.update(AWS_LAMBDA_FUNCTION_NAME=inv.function, AWS_LAMBDA_FUNCTION_MEMORY_SIZE=str(fn.memory_mb or 0),
                   AWS_LAMBDA_FUNCTION_VERSION="$LATEST", PYTHONUNBUFFERED="1")
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        deadline = time.time() + timeout
        proc: asyncio.subprocess.Process | None = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", RUNNER, fn.handler, inv.function, str(fn.memory_mb or 0), repr(deadline),
                inv.request_id, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
            inv.pid = proc.pid
            self._running[inv.request_id] = (inv, proc)
            if self._closing:  # aclose() ran while the process was starting
                _kill_group(proc)
            out, err = await self._communicate(proc, json.dumps(inv.event).encode(), timeout)
            inv.log = err[-_STDERR_KEEP:]
            if out is None:
                inv.error = {"errorMessage": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                                             f"{inv.request_id} Task timed out after {timeout:.2f} seconds"}
            else:
                self._settle(inv, proc, out)
        except asyncio.CancelledError:
            inv.error = {"errorMessage": "the invocation was cancelled (server closing)", "errorType": "Cancelled"}
            raise
        finally:
            if proc is not None:
                if proc.returncode is None:
                    _kill_group(proc)
                    with contextlib.suppress(ProcessLookupError):
                        await asyncio.shield(proc.wait())
                self._running.pop(inv.request_id, None)
            inv.ended = time.monotonic()
            self.completed.append(inv)
            del self.completed[:-self.keep_completed]

    @staticmethod
    async def _communicate(proc: asyncio.subprocess.Process, data: bytes,
                           timeout: float) -> tuple[bytes | None, bytes]:
        """(stdout, stderr), or (None, stderr so far) after killing the process at ``timeout``."""
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        err = bytearray()

        async def drain_stderr() -> None:
            assert proc.stderr is not None
            while chunk := await proc.stderr.read(1 << 16):
                err.extend(chunk)
                del err[:-_STDERR_KEEP]

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(data)
                await proc.stdin.drain()
                proc.stdin.close()

        async def work() -> bytes:
            assert proc.stdout is not None
            out, _, _ = await asyncio.gather(proc.stdout.read(), drain_stderr(), feed())
            await proc.wait()
            return out

        try:
            out = await asyncio.wait_for(work(), timeout)
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            return None, bytes(err)
        return out, bytes(err)

    @staticmethod
    def _settle(inv: Invocation, proc: asyncio.subprocess.Process, out: bytes) -> None:
        reply = None
        for line in out.decode(errors="replace").splitlines()[::-1]:
            with contextlib.suppress(ValueError):
                reply = json.loads(line)
                break
        if isinstance(reply, dict) and "result" in reply:
            inv.result = reply["result"]
        elif isinstance(reply, dict) and "error" in reply:
            inv.error = reply["error"]
        else:
            code = proc.returncode
            why = f"signal: {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
            inv.error = {"errorMessage": f"RequestId: {inv.request_id} Error: Runtime exited with error: {why}",
                         "errorType": "Runtime.ExitError"}


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


# -- handlers for tests and smoke checks ---------------------------------------------------------------
def echo(event: Any, context: Any) -> dict[str, Any]:
    """Return the event with what the context says (and log it)."""
    print("echo", json.dumps(event))
    return {"event": event, "function_name": getattr(context, "function_name", None),
            "memory_limit_in_mb": getattr(context, "memory_limit_in_mb", None),
            "remaining_ms": context.get_remaining_time_in_millis() if context is not None else None,
            "pid": os.getpid()}


def fail(event: Any, context: Any) -> None:
    """Raise ``ValueError(event["message"])``."""
    raise ValueError(str((event or {}).get("message", "failed")))


def sleep(event: Any, context: Any) -> dict[str, Any]:
    """Sleep ``event["seconds"]`` and return them."""
    seconds = float((event or {}).get("seconds", 1.0))
    time.sleep(seconds)
    return {"slept": seconds}


def allocate(event: Any, context: Any) -> dict[str, Any]:
    """Allocate and touch ``event["mb"]`` MB (a MemoryError past the function's memory size)."""
    mb = int((event or {}).get("mb", 1))
    buf = bytearray(mb << 20)
    return {"allocated_mb": len(buf) >> 20}


# -- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cirrus.lambda_local",
        description="Serve the AWS Lambda Invoke API (POST /2015-03-31/functions/NAME/invocations; "
                    "invocation types RequestResponse, Event and DryRun) locally. Every invocation runs "
                    "the function's handler in a fresh Python subprocess with an address-space cap of "
                    "--memory MB, killed at --timeout seconds. Point a botocore / aiobotocore Lambda "
                    "client at it with endpoint_url=http://HOST:PORT (any credentials and region). "
                    "Stops on SIGINT / SIGTERM, killing running invocations.")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free one (default: %(default)s)")
    p.add_argument("--function", action="append", default=[], metavar="NAME=MODULE:FUNCTION", required=True,
                   help="register function NAME served by handler MODULE:FUNCTION, called as "
                        "handler(event, context); repeat for several functions "
                        "(e.g. cirrus-worker=cirrus.lambda_handler:handler)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="per-invocation timeout of every function (default: %(default)s)")
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, metavar="MB",
                   help="memory size of every function: the address-space limit (RLIMIT_AS) of each "
                        "invocation's process; 0 = no limit (default: %(default)s)")
    p.add_argument("--ready-file", metavar="FILE",
                   help='write {"address": "HOST:PORT", "endpoint_url": "http://HOST:PORT"} as JSON to FILE '
                        "once listening (for scripts and tests); without it that JSON is printed as one line on stdout")
    return p


def _parse_functions(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, handler = item.partition("=")
        if not sep or not name or ":" not in handler or handler.startswith(":") or handler.endswith(":"):
            raise ValueError(f"--function {item!r}: expected NAME=MODULE:FUNCTION")
        out[name] = handler
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        functions = _parse_functions(args.function)
    except ValueError as exc:
        parser.error(str(exc))
    host, sep, port = args.listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected HOST:PORT")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.memory < 0:
        parser.error("--memory must be >= 0")

    from zipcomm._entry import run, write_ready_file

    async def serve(stop: asyncio.Event) -> int:
        server = LambdaServer(functions, timeout=args.timeout, memory_mb=args.memory or None,
                              host=host, port=int(port))
        await server.start()
        try:
            if args.ready_file:
                write_ready_file(args.ready_file, json.dumps({"address": server.address,
                                                              "endpoint_url": server.endpoint_url}))
            else:
                print(json.dumps({"address": server.address, "endpoint_url": server.endpoint_url}), flush=True)
            await stop.wait()
        finally:
            await server.aclose()
        return 0

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
