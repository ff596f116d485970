"""Training tasks: the thesis's figure 3.5 (b) API.

::

    params = {"n_workers": 5, "n_ps": 1, "worker_size": 1024, "dataset": "criteo_norm",
              "epsilon": 0.0001, "timeout": 20 * 60, "model_size": 2**19}
    lr_task = cirrus.LogisticRegression(params)
    result = lr_task.run()          # or: await lr_task.run_async()

``run`` starts the parameter server (``n_ps`` shard processes), ``n_workers`` worker processes
(each an async loop: prefetching iterator -> pull -> gradient -> push without waiting) and evaluates
the held-out metric every ``eval_interval`` seconds on the last ``test_fraction`` of the dataset's
partitions (never trained on). It stops at ``timeout``, at ``target_loss``, when the held-out loss
changed by less than ``epsilon`` over ``patience`` evaluations, when every worker reached
``max_updates``, or on :meth:`Task.kill`. Every parameter is validated and used; an unknown one is
an error (with the closest valid name), so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import difflib
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

import zipcomm

from .dataset import open_dataset
from .errors import CirrusError
from .launch import LocalLauncher
from .models import make_model
from .optim import OPTIMIZERS
from .ps.process import PSProcess

LAMBDA_PRICE_PER_GB_SECOND = 0.0000166667  # AWS Lambda x86, per GB-second


class TrainingError(CirrusError):
    """Training could not start or failed (the parameter server or every worker died)."""


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _num(lo: float = -math.inf, lo_open: bool = False, hi: float = math.inf, hi_open: bool = False):
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


def _opt(check):
    return lambda v: v is None or check(v)


# name: (check, default, what a valid value is)
PARAMS: dict[str, tuple[Any, Any, str]] = {
    "dataset": (lambda v: isinstance(v, str) and v != "", None, "a dataset URI (folder or s3://...)"),
    "n_workers": (_pos_int, 2, "an integer >= 1"),
    "n_ps": (_pos_int, 1, "an integer >= 1 (parameter-server shard processes)"),
    "worker_size": (lambda v: _pos_int(v) and v >= 128, 1024, "MB per worker, an integer >= 128"),
    "model_size": (_pos_int, 2 ** 20, "an integer >= 1 (hashed features)"),
    "learning_rate": (_num(0, True), 0.1, "a number > 0"),
    "minibatch_size": (_pos_int, 20, "an integer >= 1"),
    "opt_method": (lambda v: v in OPTIMIZERS, "adagrad", f"one of {OPTIMIZERS}"),
    "l2": (_num(0), 0.0, "a number >= 0 (L2 regularization)"),
    "momentum": (_num(0, hi=1, hi_open=True), 0.9, "a number in [0, 1)"),
    "beta1": (_num(0, hi=1, hi_open=True), 0.9, "a number in [0, 1)"),
    "beta2": (_num(0, hi=1, hi_open=True), 0.999, "a number in [0, 1)"),
    "grad_threshold": (_num(0), 0.0, "a number >= 0 (smaller gradient coordinates are not applied)"),
    "epsilon": (_num(0), 0.0001, "a number >= 0 (stop when the held-out loss changes less)"),
    "patience": (_pos_int, 3, "an integer >= 1 (evaluations within epsilon before stopping)"),
    "timeout": (_num(0, True), 600.0, "seconds > 0"),
    "target_loss": (_opt(_num()), None, "a number, or None"),
    "max_updates": (_opt(_pos_int), None, "updates per worker incarnation, or None"),
    "total_updates": (_opt(_pos_int), None, "stop after this many updates by all workers together, or None"),
    "eval_interval": (_num(0, True), 1.0, "seconds > 0"),
    "test_fraction": (_num(0, True, 1, True), 0.1, "a number in (0, 1): the held-out share of partitions"),
    "lifetime": (_opt(_num(0, True)), None, "seconds > 0 (retire and replace workers), or None"),
    "max_staleness": (_opt(lambda v: isinstance(v, int) and v >= 0), None, "an integer >= 0, or None"),
    "compress": (lambda v: isinstance(v, bool), False, "True or False (float16 pulls and pushes)"),
    "prefetch": (lambda v: isinstance(v, bool), True, "True or False"),
    "checkpoint": (_opt(lambda v: isinstance(v, str) and v != ""), None, "a folder / s3 URI, or None"),
    "checkpoint_every": (_num(0), 0.0, "seconds >= 0"),
    "seed": (lambda v: isinstance(v, int) and v >= 0, 0, "an integer >= 0"),
    "progress": (lambda v: v is None or isinstance(v, bool), None,
                 "True / False: a live status line on stderr at each evaluation (None: when stderr is a terminal)"),
    "ps": (lambda v: v in ("server", "none"), "server", "'server' (a sharded parameter server) or 'none' "
           "(synchronous SGD over zipcomm allreduce, no server process; local workers, no lifetime)"),
    "launcher": (lambda v: v in ("local", "lambda"), "local", "'local' (worker processes here) or 'lambda' "
                 "(AWS Lambda invocations through aiobotocore)"),
    "lambda_function": (lambda v: isinstance(v, str) and v != "", "cirrus-worker",
                        "the Lambda function running cirrus.lambda_handler.handler"),
    "lambda_endpoint": (_opt(lambda v: isinstance(v, str) and v != ""), None,
                        "a Lambda endpoint URL, or None for the standard AWS settings"),
    "lambda_timeout": (_num(0, True), 900.0, "the function's timeout in seconds"),
    "price_per_gb_second": (_num(0), LAMBDA_PRICE_PER_GB_SECOND, "a number >= 0"),
    "ps_price_per_hour": (_num(0), 0.0, "a number >= 0 (per shard)"),
}


def validate_params(params: dict[str, Any], extra: dict[str, tuple[Any, Any, str]] | None = None) -> dict[str, Any]:
    """``params`` with defaults filled in; ValueError for an unknown name or a bad value.
    ``extra``: the model's own parameters (same form as :data:`PARAMS`; default None = required)."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, not {type(params).__name__}")
    known = {**PARAMS, **(extra or {})}
    for k in params:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            raise ValueError(f"unknown parameter {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; valid: {', '.join(sorted(known))}")
    out = {}
    for k, (check, default, what) in known.items():
        v = params.get(k, default)
        if v is None and (k == "dataset" or k in (extra or {})):
            raise ValueError(f"parameter {k!r} is required ({what})")
        if not check(v):
            raise ValueError(f"parameter {k!r} must be {what}, got {v!r}")
        out[k] = v
    return out


class Task:
    """One training run of a model (see the module docstring)."""

    model_name = ""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = validate_params(params, self.extra_params)
        if self.params["ps"] == "none" and (self.params["lifetime"] is not None or self.params["launcher"] != "local"):
            raise ValueError("ps='none' (synchronous allreduce) runs local workers without a lifetime: "
                             "replicas cannot be replaced mid-run")
        self.time_loss: list[tuple[float, float]] = []
        self.metrics: list[dict[str, float]] = []
        self.updates = 0
        self._worker_updates: dict[str, int] = {}
        self._train_loss: collections.deque[tuple[float, float]] = collections.deque(maxlen=10_000)
        self._began: float | None = None
        self._ended: float | None = None
        self._kill: asyncio.Event | None = None
        self._killed = False
        self._launcher: Any = None
        self.stop_reason = ""
        self.ps_stats: list[dict] = []
        self.ps_restarts = 0
        self.events: list[tuple[float, str]] = []  # (seconds, what happened): restarts, ...
        self._ps: Any = None
        self._replica: dict[str, np.ndarray] | None = None

    # -- model-specific ------------------------------------------------------------------------------
    extra_params: dict[str, tuple[Any, Any, str]] = {}

    async def _model_args(self, ds: Any) -> dict[str, Any]:
        """The model's constructor arguments (it may read the dataset's manifest or data)."""
        return {}

    # -- live metrics ----------------------------------------------------------------------------------
    def get_time_loss(self) -> list[tuple[float, float]]:
        """(seconds since start, held-out loss) of every evaluation so far."""
        return list(self.time_loss)

    def get_updates_per_second(self) -> float:
        if self._began is None:
            return 0.0
        secs = (self._ended or time.monotonic()) - self._began
        return self.updates / secs if secs > 0 else 0.0

    def worker_seconds(self) -> float:
        return self._launcher.running_worker_seconds() if self._launcher is not None else 0.0

    def cost(self) -> float:
        """Cost so far: worker-seconds x worker_size x price, plus parameter-server time."""
        p = self.params
        ws = self.worker_seconds() * p["worker_size"] / 1024 * p["price_per_gb_second"]
        secs = ((self._ended or time.monotonic()) - self._began) if self._began is not None else 0.0
        return ws + p["n_ps"] * secs / 3600 * p["ps_price_per_hour"]

    def kill(self) -> None:
        """Stop this experiment now: its workers are killed at once, then the run ends."""
        self._killed = True
        if self._launcher is not None:
            self._launcher.kill_now()
        if self._kill is not None:
            self._kill.set()

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until a stop condition; return the result (blocking)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run_async())
        raise RuntimeError("run() called from a running event loop: await run_async()")

    async def run_async(self) -> dict[str, Any]:
        p = self.params
        self._kill = asyncio.Event()
        if self._killed:
            self._kill.set()
        async with await open_dataset(p["dataset"]) as ds:
            model_args = await self._model_args(ds)
            model = make_model(self.model_name, **model_args)
            model.check_dataset(ds.kind, ds.n_features)
            n = ds.n_partitions
            if model.holdout == "entries":  # held-out entries are spread over every partition
                train_parts, test_parts = list(range(n)), list(range(n))
            else:
                if n < 2:
                    raise ValueError(f"dataset {ds.uri} has {n} partition(s); training needs >= 2 "
                                     "(train + held-out)")
                n_test = min(n - 1, max(1, round(n * p["test_fraction"])))
                train_parts, test_parts = list(range(n - n_test)), list(range(n - n_test, n))
            test = []
            for i in test_parts:
                part = await ds.read_partition(i)
                part.partition, part.start = i, 0  # where its rows are (models that key on row ids)
                test.append(part)
        async with contextlib.AsyncExitStack() as stack:
            server = await zipcomm.serve_rpc("127.0.0.1:0", self._on_report)
            stack.push_async_callback(server.aclose)
            sync = None
            if p["ps"] == "none":
                if model.name == "lda":
                    raise ValueError("LDA keeps its token assignments on the parameter server: use ps='server'")
                ctl = await stack.enter_async_context(zipcomm.Controller("127.0.0.1:0"))
                sync = {"controller": ctl.address, "channel": f"cirrus-sync-{os.getpid()}-{id(self)}",
                        "n_workers": p["n_workers"], "tables": self._table_specs(model),
                        "model_every": p["eval_interval"] / 2}
            else:
                self._ps = PSProcess(p["n_ps"], checkpoint=p["checkpoint"], checkpoint_every=p["checkpoint_every"],
                                     max_staleness=p["max_staleness"],
                                     workdir=stack.enter_context(tempfile.TemporaryDirectory(prefix="cirrus-train-")))
                stack.push_async_callback(self._ps.stop)
                await self._ps.start(self._table_specs(model))
            spec = {"model": self.model_name, "model_args": model_args, "dataset": p["dataset"], "sync": sync,
                    "ps": self._ps.addresses if sync is None else [], "driver": server.address, "seed": p["seed"],
                    "minibatch_size": p["minibatch_size"], "compress": p["compress"], "partitions": train_parts,
                    "max_updates": p["max_updates"], "prefetch_bytes": (32 << 20) if p["prefetch"] else 0,
                    "own_partitions": getattr(model, "owns_partitions", False), "n_workers": p["n_workers"],
                    "prefetch_concurrency": 4 if p["prefetch"] else 1}
            retire = self._ps.retire if sync is None else None
            if p["launcher"] == "lambda":
                from .lambda_launch import LambdaLauncher

                self._launcher = LambdaLauncher(spec, p["n_workers"], worker_size_mb=p["worker_size"],
                                                lifetime=p["lifetime"], retire=retire,
                                                function_name=p["lambda_function"],
                                                function_timeout=p["lambda_timeout"],
                                                endpoint_url=p["lambda_endpoint"])
            else:
                self._launcher = LocalLauncher(spec, p["n_workers"], worker_size_mb=p["worker_size"],
                                               lifetime=p["lifetime"], retire=retire)
            if self._killed:
                self._launcher.kill_now()
            self._began = time.monotonic()
            try:
                await self._launcher.start()
                await self._loop(model, test)
            finally:
                await self._launcher.stop()
                self._ended = time.monotonic()
                if self.time_loss:
                    self._show(model.metric, self.time_loss[-1][1], final=True)
                if sync is None:
                    with contextlib.suppress(Exception):
                        self.ps_stats = await asyncio.wait_for(self._ps.client.stats(), 5)
        return self.result()

    def _table_specs(self, model: Any) -> list[tuple[str, int, int, dict]]:
        p = self.params
        hyper = {"lr": p["learning_rate"], "l2": p["l2"], "grad_threshold": p["grad_threshold"]}
        if p["opt_method"] in ("momentum", "nesterov"):
            hyper["momentum"] = p["momentum"]
        if p["opt_method"] == "adam":
            hyper.update(beta1=p["beta1"], beta2=p["beta2"])
        out = []
        for name, rows, cols, overrides in model.tables():
            table_spec = {"optimizer": p["opt_method"], "hyper": hyper, **overrides}
            if table_spec["optimizer"] == "add":
                table_spec.pop("hyper")
            out.append((name, rows, cols, table_spec))
        return out

    def _on_report(self, method: str, data: Any, peer: Any) -> None:
        if method == "model":  # ps="none": a replica of the model, for evaluation
            self._replica = data["tables"]
            return
        if method != "progress":
            raise ValueError(f"unknown driver call {method!r}")
        key = f"{data['worker']}/{data['inc']}"
        before = self._worker_updates.get(key, 0)
        self._worker_updates[key] = int(data["updates"])
        self.updates += int(data["updates"]) - before
        if data.get("loss_n"):
            self._train_loss.append((self._elapsed(), data["loss_sum"] / data["loss_n"]))

    def _elapsed(self) -> float:
        return time.monotonic() - self._began if self._began is not None else 0.0

    async def _evaluate(self, model: Any, test: list) -> dict[str, float] | None:
        if self._ps is None:  # ps="none": the latest replica worker w0 sent
            if self._replica is None:
                return None
            return await asyncio.to_thread(model.evaluate, self._replica, test)
        tables = {name: await self._ps.client.pull_all(name, rows) for name, rows, _, _ in model.tables()}
        return await asyncio.to_thread(model.evaluate, tables, test)

    async def _ps_failed(self, model: Any, why: str) -> None:
        """The parameter server died: with checkpoints, restart it from the latest one (workers
        of the old one fail and are replaced, pointed at the new one); without, give up."""
        if not self.params["checkpoint"]:
            raise TrainingError(f"the parameter server failed ({why}) and there is no checkpoint to resume")
        self.ps_restarts += 1
        self.events.append((self._elapsed(), f"parameter server restarted from its checkpoint ({why})"))
        await self._ps.stop()
        await self._ps.start(self._table_specs(model))
        assert self._launcher is not None
        self._launcher.spec["ps"] = self._ps.addresses

    async def _loop(self, model: Any, test: list) -> None:
        p = self.params
        assert self._kill is not None and self._launcher is not None
        within = 0
        while True:
            try:
                await asyncio.wait_for(self._kill.wait(), p["eval_interval"])
                self.stop_reason = "killed"
                return
            except TimeoutError:
                pass
            if self._ps is not None and not self._ps.alive():
                await self._ps_failed(model, "its process exited")
                continue
            try:
                m = await self._evaluate(model, test)
            except zipcomm.ZipError as exc:
                await self._ps_failed(model, str(exc))
                continue
            if m is None:  # no model to evaluate yet
                continue
            self.metrics.append({"time": self._elapsed(), **m, "updates": self.updates})
            loss = m[model.metric]
            self.time_loss.append((self._elapsed(), loss))
            self._show(model.metric, loss)
            if len(self.time_loss) >= 2 and abs(self.time_loss[-2][1] - loss) < p["epsilon"]:
                within += 1
            else:
                within = 0
            if not math.isfinite(loss):
                self.stop_reason = "diverged"
                return
            if p["total_updates"] is not None and self.updates >= p["total_updates"]:
                self.stop_reason = "update budget reached"
                return
            if p["target_loss"] is not None and loss <= p["target_loss"]:
                self.stop_reason = "target loss reached"
                return
            if within >= p["patience"]:
                self.stop_reason = "converged (epsilon)"
                return
            if self._elapsed() >= p["timeout"]:
                self.stop_reason = "timeout"
                return
            if p["max_updates"] is not None and p["lifetime"] is None and \
                    all(s.proc is not None and s.proc.returncode is not None for s in self._launcher.slots):
                self.stop_reason = "max_updates reached"
                return
            if p["max_updates"] is None and self._ps is not None:
                await self._launcher.maintain()  # (ps="none" replicas cannot be replaced)

    def _show(self, metric: str, loss: float, final: bool = False) -> None:
        show = self.params["progress"]
        tty = sys.stderr.isatty()
        if not (tty if show is None else show):
            return
        p = self.params
        line = (f"{self.model_name}: {self._elapsed():6.1f}/{p['timeout']:g} s  held-out {metric} {loss:.5g}  "
                f"{self.updates} updates ({self.get_updates_per_second():.0f}/s)  cost ${self.cost():.6f}")
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
        sys.stderr.flush()

    def result(self) -> dict[str, Any]:
        last = self.metrics[-1] if self.metrics else {}
        return {
            "model": self.model_name, "stop_reason": self.stop_reason,
            "seconds": (self._ended or time.monotonic()) - (self._began or time.monotonic()),
            "final": last, "time_loss": self.get_time_loss(), "updates": self.updates,
            "updates_per_second": self.get_updates_per_second(), "cost": self.cost(),
            "worker_seconds": self.worker_seconds(),
            "workers_started": self._launcher.started_total if self._launcher else 0,
            "worker_deaths": self._launcher.deaths if self._launcher else 0,
            "ps": {k: sum(s.get(k, 0) for s in self.ps_stats) for k in
                   ("applied", "refused_zombie", "refused_duplicate", "refused_stale")},
            "staleness_max": max((s.get("staleness_max", 0) for s in self.ps_stats), default=0),
            "ps_restarts": self.ps_restarts, "events": list(self.events),
        }


class LogisticRegression(Task):
    """Sparse logistic regression on hashed features (labels 0/1 or -1/1)."""

    model_name = "logistic_regression"

    async def _model_args(self, ds: Any) -> dict[str, Any]:
        return {"model_size": self.params["model_size"]}


LRegression = LogisticRegression  # the name thesis figure 3.5 (c) uses


class Softmax(Task):
    """Multinomial logistic regression (sparse or dense rows, labels 0..n_classes-1)."""

    model_name = "softmax"
    extra_params = {"n_classes": (lambda v: isinstance(v, int) and v >= 2, None, "an integer >= 2")}

    async def _model_args(self, ds: Any) -> dict[str, Any]:
        return {"n_features": ds.n_features, "n_classes": self.params["n_classes"]}


class CollaborativeFiltering(Task):
    """Biased matrix factorization; dataset rows are users (indices = items, values = ratings).
    RMSE on a fixed ``test_fraction`` of the (user, item) pairs that is never trained on."""

    model_name = "collaborative_filtering"
    extra_params = {"rank": (lambda v: isinstance(v, int) and v >= 1, 10, "an integer >= 1"),
                    "init_scale": (_num(0, True), 0.1, "a number > 0 (std of the initial factors)")}

    async def _model_args(self, ds: Any) -> dict[str, Any]:
        from .models import held_out

        offsets, total, count, row = [], 0.0, 0, 0
        for i in range(ds.n_partitions):  # mu = the mean training rating
            offsets.append(row)
            part = await ds.read_partition(i)
            lo, hi = int(part.indptr[0]), int(part.indptr[-1])
            users = row + np.repeat(np.arange(part.n_rows), np.diff(part.indptr))
            keep = ~held_out(users, np.asarray(part.indices[lo:hi], np.int64), self.params["test_fraction"])
            total += float(np.asarray(part.values[lo:hi], np.float64)[keep].sum())
            count += int(keep.sum())
            row += part.n_rows
        return {"n_users": ds.n_rows, "n_items": ds.n_features, "rank": self.params["rank"],
                "mu": total / max(count, 1), "row_offsets": offsets,
                "test_fraction": self.params["test_fraction"], "init_scale": self.params["init_scale"]}


class LDA(Task):
    """Latent Dirichlet allocation (collapsed Gibbs); dataset rows are documents (indices = word
    ids, values = counts). Metric: held-out perplexity (fold-in on the held-out documents)."""

    model_name = "lda"
    extra_params = {"n_topics": (lambda v: isinstance(v, int) and v >= 2, 10, "an integer >= 2"),
                    "alpha": (_num(0, True), 0.1, "a number > 0 (document-topic prior)"),
                    "beta": (_num(0, True), 0.01, "a number > 0 (topic-word prior)")}

    async def _model_args(self, ds: Any) -> dict[str, Any]:
        p = self.params
        return {"vocab_size": ds.n_features, "n_topics": p["n_topics"], "alpha": p["alpha"], "beta": p["beta"],
                "seed": p["seed"]}
