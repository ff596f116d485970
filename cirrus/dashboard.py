"""Live dashboard of a :class:`cirrus.GridSearch` (thesis figure 3.5 (c), the ``UI=True`` view).

::

    async with Dashboard(gs) as dash:      # serves http://127.0.0.1:<free port>/
        print(dash.url)
        await gs.run_async()

or ``gs.run(UI=True)``, which does the same. The page (``cirrus/dashboard_static``: plain HTML, JS
and CSS, no external libraries, works offline) polls ``/api/state`` and draws the held-out loss of
every experiment over time, a control table (hyper-parameters, state, loss, updates/s, cost and a
Kill button per running or queued experiment), the cost of the search over time and the cost saved
by stopping experiments early, and a selector to show all experiments or only the best / worst k.

HTTP API (JSON):

* ``GET /api/state`` -- ``{"experiments": [{"index", "hyper", "state", "reason", "loss", "points",
  "n_points", "updates_per_s", "cost", "saved"}, ...], "totals": {"cost", "savings", "elapsed",
  "counts", "cost_series"}, "hyper_vars"}``; ``points`` is the loss curve ``[[seconds, loss], ...]``
  downsampled to at most :data:`MAX_POINTS`, ``n_points`` the number of evaluations behind it;
  ``cost_series`` is ``[[seconds, cost], ...]`` sampled by the dashboard every ``sample_interval``
  seconds (the most recent ``history`` samples). Non-finite numbers are ``null``.
* ``POST /api/kill/{i}`` -- kill experiment ``i`` (404: no such experiment, 409: not running or
  queued). ``POST /api/kill_all`` -- kill every running or queued experiment.

The server listens on 127.0.0.1 unless ``allow_remote=True`` (there is no authentication: anyone
who can reach the port can kill experiments). Cross-site POSTs (an ``Origin`` header of another
site) are refused.

``python -m cirrus.dashboard --demo`` runs a small demo grid on generated data with the dashboard.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from zipcomm.transport.connection import is_loopback

__all__ = ["Dashboard", "MAX_POINTS", "main"]

MAX_POINTS = 500
STATIC_DIR = Path(__file__).with_name("dashboard_static")
_KILLABLE = ("queued", "running")


def _is_loopback(host: str) -> bool:
    return is_loopback(host)


def _num(v: Any) -> float | None:
    """A JSON-safe number: non-finite (and non-numeric) values become ``None``."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return _num(v)
    return str(v)


def downsample(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ``limit`` points, evenly spread over ``points``, the first and the last kept."""
    n = len(points)
    if n <= limit:
        return list(points)
    if limit <= 1:
        return [points[-1]]
    step = (n - 1) / (limit - 1)
    return [points[round(k * step)] for k in range(limit)]


class Dashboard:
    """The web dashboard of grid search ``gs`` (see the module docstring)."""

    def __init__(self, gs: Any, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False,
                 sample_interval: float = 1.0, history: int = 3600) -> None:
        if not allow_remote and not _is_loopback(host):
            raise ValueError(f"refusing to serve the dashboard on the non-loopback address {host!r}: it has "
                             "no authentication and can kill experiments; pass allow_remote=True to do it anyway")
        if not sample_interval > 0:
            raise ValueError("sample_interval must be > 0 seconds")
        if not isinstance(history, int) or history < 1:
            raise ValueError("history must be an integer >= 1")
        self.gs = gs
        self.host = host
        self.port = port
        self.sample_interval = sample_interval
        self.cost_series: collections.deque[tuple[float, float]] = collections.deque(maxlen=history)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None
        self._t0 = time.monotonic()
        self._url: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the dashboard is not started: await start() first")
        return self._url

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._same_origin])
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC_DIR, show_index=False)
        app.router.add_get("/api/state", self._state)
        app.router.add_post("/api/kill_all", self._kill_all)
        app.router.add_post("/api/kill/{i}", self._kill)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the dashboard is already started")
        self._t0 = time.monotonic()
        runner = web.AppRunner(self.make_app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockname = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        self.port = sockname[1]
        self._url = f"http://{host}:{self.port}/"
        self._sample()
        self._sampler = asyncio.create_task(self._sample_loop(), name="cirrus-dashboard-sampler")

    async def aclose(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> "Dashboard":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- data ------------------------------------------------------------------------------------------
    def _sample(self) -> None:
        self.cost_series.append((round(time.monotonic() - self._t0, 3), self.gs.get_cost()))

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval)
            with contextlib.suppress(Exception):  # a transient error must not end the sampling
                self._sample()

    def state(self) -> dict[str, Any]:
        """What ``/api/state`` returns."""
        exps = []
        counts: dict[str, int] = {}
        for e in self.gs.experiments:
            tl = e.task.get_time_loss()
            counts[e.state] = counts.get(e.state, 0) + 1
            exps.append({
                "index": e.index,
                "hyper": {k: _jsonable(v) for k, v in e.hyper.items()},
                "state": e.state,
                "reason": e.reason or getattr(e.task, "stop_reason", "") or "",
                "loss": _num(tl[-1][1]) if tl else None,
                "points": [[_num(t), _num(loss)] for t, loss in downsample(tl)],
                "n_points": len(tl),
                "updates_per_s": _num(e.task.get_updates_per_second()),
                "cost": _num(e.task.cost()),
                "saved": _num(e.saved),
            })
        return {
            "hyper_vars": list(self.gs.hyper_vars),
            "experiments": exps,
            "totals": {
                "cost": _num(self.gs.get_cost()),
                "savings": _num(self.gs.get_savings()),
                "elapsed": round(time.monotonic() - self._t0, 3),
                "counts": counts,
                "cost_series": [[t, _num(c)] for t, c in self.cost_series],
            },
        }

    # -- handlers --------------------------------------------------------------------------------------
    @web.middleware
    async def _same_origin(self, request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method not in ("GET", "HEAD") and origin is not None and origin != "null" and \
                origin.rstrip("/") != f"{request.scheme}://{request.host}":
            return web.json_response({"error": f"cross-site request from {origin} refused"}, status=403)
        return await handler(request)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state(), headers={"Cache-Control": "no-store"})

    async def _kill(self, request: web.Request) -> web.Response:
        raw = request.match_info["i"]
        n = len(self.gs.experiments)
        if not raw.isdigit() or int(raw) >= n:
            return web.json_response({"error": f"no experiment {raw!r} (there are {n}: 0..{n - 1})"}, status=404)
        i = int(raw)
        e = self.gs.experiments[i]
        if e.state not in _KILLABLE:
            return web.json_response({"error": f"experiment {i} is {e.state}, not running or queued",
                                      "index": i, "state": e.state}, status=409)
        self.gs.kill(i)
        return web.json_response({"index": i, "state": e.state, "reason": e.reason})

    async def _kill_all(self, request: web.Request) -> web.Response:
        killed = [e.index for e in self.gs.experiments if e.state in _KILLABLE]
        self.gs.kill_all()
        return web.json_response({"killed": killed})


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cirrus.dashboard",
        description="The live web dashboard of a cirrus grid search. With --demo: generate a small "
                    "Criteo-like dataset in a temporary folder, run a grid of logistic-regression "
                    "experiments over learning rates and optimizers on local worker processes, and "
                    "serve the dashboard (the URL is printed). In the page you can watch the loss "
                    "curves, costs and savings, and kill experiments. Ctrl-C stops everything (the "
                    "workers, the parameter servers and the server) and removes the temporary data. "
                    "In your own code: GridSearch(...).run(UI=True).")
    p.add_argument("--demo", action="store_true", help="run the demo grid search with the dashboard")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; a non-loopback one needs --allow-remote)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: 0, a free one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (the dashboard has no authentication and can kill "
                        "experiments)")
    p.add_argument("--num-jobs", type=int, default=2, metavar="N",
                   help="experiments running at once (default: %(default)s)")
    p.add_argument("--experiment-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="each experiment's training timeout (default: %(default)s)")
    p.add_argument("--rows", type=int, default=20_000, metavar="N",
                   help="rows of the generated dataset (default: %(default)s)")
    p.add_argument("--no-stop-rules", action="store_true",
                   help="do not stop diverging or lagging experiments automatically")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop serving when the grid search ends (default: keep serving until Ctrl-C)")
    return p


async def _demo(args: argparse.Namespace) -> None:
    import tempfile

    from .dataset import write_arrays
    from .generators import criteo_like
    from .training import LogisticRegression
    from .tuning import GridSearch

    with tempfile.TemporaryDirectory(prefix="cirrus-dashboard-demo-") as tmp:
        print(f"generating {args.rows} rows of Criteo-like data ...", file=sys.stderr, flush=True)
        data, _ = criteo_like(args.rows, hash_bits=10, seed=1)
        uri = os.path.join(tmp, "ds")
        await write_arrays(uri, data.labels, csr=(data.indptr, data.indices, data.values, data.n_features),
                           partition_bytes=100_000)
        base = {"dataset": uri, "n_workers": 1, "model_size": 2 ** 11, "timeout": args.experiment_timeout,
                "eval_interval": 0.5, "epsilon": 0.0}
        gs = GridSearch(task=LogisticRegression, param_base=base, hyper_vars=["learning_rate", "opt_method"],
                        hyper_params=[[0.01, 0.1, 1.0], ["adagrad", "sgd"]], num_jobs=args.num_jobs,
                        stop_rules=not args.no_stop_rules, progress=False)
        async with Dashboard(gs, args.host, args.port, allow_remote=args.allow_remote) as dash:
            print(f"dashboard: {dash.url}  (Ctrl-C to stop)", flush=True)
            await gs.run_async()
            print(gs.table(), flush=True)
            if not args.exit_when_done:
                print("grid search done; still serving the dashboard (Ctrl-C to stop)", flush=True)
                await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("nothing to do: pass --demo (or use GridSearch.run(UI=True) in your own code)")
    if args.num_jobs < 1 or args.rows < 1000 or not args.experiment_timeout > 0:
        parser.error("--num-jobs must be >= 1, --rows >= 1000, --experiment-timeout > 0")
    if not args.allow_remote and not _is_loopback(args.host):
        parser.error(f"--host {args.host} is not a loopback address: add --allow-remote to serve it anyway")
    try:
        stopped = asyncio.run(_until_signal(_demo(args)))
    except KeyboardInterrupt:
        stopped = True
    if stopped:
        print("\nstopped (workers, parameter servers and the dashboard ended)", file=sys.stderr)
        return 130
    return 0


async def _until_signal(work: Any) -> bool:
    """Run ``work``; Ctrl-C (SIGINT) or SIGTERM cancels it, which stops every process it started.
    True if it was stopped so."""
    import signal

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    signals = [signal.SIGINT, signal.SIGTERM]
    got: list[int] = []

    def stop(sig: int) -> None:
        got.append(sig)
        main_task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        await work
    except asyncio.CancelledError:
        if not got:
            raise
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return bool(got)


if __name__ == "__main__":
    sys.exit(main())
