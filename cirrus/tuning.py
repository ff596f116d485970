"""Hyper-parameter grid search (thesis figure 3.5 (c))::

    gs = cirrus.GridSearch(task=cirrus.LogisticRegression, param_base=params,
                           hyper_vars=["learning_rate", "minibatch_size"],
                           hyper_params=[[0.01, 0.1, 1.0], [20, 100]], num_jobs=2)
    gs.run()                   # blocking; await gs.run_async() inside asyncio
    print(gs.table())          # one row per experiment
    gs.get_top(3)              # the best three by final held-out loss

Every combination of the ``hyper_params`` lists becomes one experiment (``param_base`` updated with
those values). At most ``num_jobs`` experiments run at once and their workers never exceed
``worker_budget`` (default: no limit beyond num_jobs); the rest wait in a queue and start as others
end or are killed. ``timeout`` bounds the whole search (running experiments are killed at it).

Automatic stopping (``stop_rules``, on by default): an experiment is stopped — its workers killed at
once, reported as "stopped by rule: ..." — when its held-out loss is not finite, has risen for
``rising`` consecutive evaluations, or, after ``grace`` seconds, is worse than the best loss of any
experiment so far by more than ``margin`` (a fraction). The cost of each experiment is its
worker-seconds x worker size x price (plus parameter-server time); the cost a kill saved is estimated
as what the experiment would have cost running on to its own timeout at its rate so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .training import Task, validate_params

__all__ = ["GridSearch", "Experiment", "DEFAULT_RULES"]

DEFAULT_RULES = {"rising": 3, "grace": 5.0, "margin": 0.5}


@dataclass
class Experiment:
    index: int
    params: dict[str, Any]
    hyper: dict[str, Any]
    task: Task
    state: str = "queued"          # queued | running | done | killed | stopped | failed
    reason: str = ""
    started: float | None = None
    ended: float | None = None
    result: dict[str, Any] | None = None
    error: str = ""
    saved: float = 0.0             # estimated cost avoided by stopping early
    runner: asyncio.Task | None = field(default=None, repr=False)

    @property
    def final_loss(self) -> float:
        tl = self.task.get_time_loss()
        return tl[-1][1] if tl else math.nan

    @property
    def n_workers(self) -> int:
        return int(self.params["n_workers"])


class GridSearch:
    def __init__(self, task: type[Task], param_base: dict[str, Any], hyper_vars: list[str],
                 hyper_params: list[list[Any]], *, num_jobs: int = 1, worker_budget: int | None = None,
                 timeout: float | None = None, stop_rules: dict[str, Any] | bool = True,
                 progress: bool | None = None) -> None:
        if not (isinstance(task, type) and issubclass(task, Task)):
            raise TypeError(f"task must be a cirrus task class (e.g. cirrus.LogisticRegression), got {task!r}")
        if len(hyper_vars) != len(hyper_params):
            raise ValueError(f"{len(hyper_vars)} hyper_vars but {len(hyper_params)} value lists")
        if not hyper_vars or any(len(list(v)) == 0 for v in hyper_params):
            raise ValueError("give at least one hyper-parameter with at least one value")
        if not isinstance(num_jobs, int) or num_jobs < 1:
            raise ValueError("num_jobs must be an integer >= 1")
        if worker_budget is not None and (not isinstance(worker_budget, int) or worker_budget < 1):
            raise ValueError("worker_budget must be an integer >= 1 or None")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be > 0 seconds or None")
        self.task_class = task
        self.hyper_vars = list(hyper_vars)
        self.num_jobs = num_jobs
        self.worker_budget = worker_budget
        self.timeout = timeout
        if stop_rules is True:
            self.rules: dict[str, Any] | None = dict(DEFAULT_RULES)
        elif stop_rules is False:
            self.rules = None
        else:
            unknown = set(stop_rules) - set(DEFAULT_RULES)
            if unknown:
                raise ValueError(f"unknown stop rule(s) {sorted(unknown)}; known: {sorted(DEFAULT_RULES)}")
            self.rules = {**DEFAULT_RULES, **stop_rules}
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.experiments: list[Experiment] = []
        for i, combo in enumerate(itertools.product(*[list(v) for v in hyper_params])):
            hyper = {k: (v.item() if hasattr(v, "item") else v) for k, v in zip(self.hyper_vars, combo)}
            params = {**param_base, **hyper}
            params.setdefault("progress", False)  # the grid draws its own status line
            validate_params(params, task.extra_params)  # a bad grid fails here, before anything runs
            self.experiments.append(Experiment(i, params, hyper, task(params)))
        for e in self.experiments:
            if worker_budget is not None and e.n_workers > worker_budget:
                raise ValueError(f"experiment {e.index} needs {e.n_workers} workers, over the budget of {worker_budget}")
        self._began: float | None = None
        self._wake: asyncio.Event | None = None
        self.max_running = 0  # the most experiments seen running at once
        self.max_workers = 0  # the most workers of running experiments at once

    # -- control ---------------------------------------------------------------------------------------
    def kill(self, i: int, reason: str = "killed by the user") -> None:
        """Stop experiment ``i`` now (its workers are killed at once); a queued one never starts."""
        e = self.experiments[i]
        if e.state == "queued":
            e.state, e.reason = "killed", reason
        elif e.state == "running":
            e.state, e.reason = ("stopped" if reason.startswith("stopped by rule") else "killed"), reason
            e.saved = self._projected_saving(e)
            e.task.kill()
        if self._wake is not None:
            self._wake.set()

    def kill_all(self) -> None:
        for e in self.experiments:
            self.kill(e.index)

    def _projected_saving(self, e: Experiment) -> float:
        if e.started is None:
            return 0.0
        ran = time.monotonic() - e.started
        rate = e.task.cost() / ran if ran > 0 else 0.0
        return max(0.0, float(e.params.get("timeout", 600.0)) - ran) * rate

    # -- results ---------------------------------------------------------------------------------------
    def get_cost(self) -> float:
        """Cost so far of every experiment."""
        return sum(e.task.cost() for e in self.experiments)

    def get_savings(self) -> float:
        """Estimated cost avoided by kills and automatic stops."""
        return sum(e.saved for e in self.experiments)

    def get_top(self, n: int) -> list[Experiment]:
        """The ``n`` experiments with the lowest final held-out loss (finite ones first)."""
        ranked = sorted(self.experiments, key=lambda e: (not math.isfinite(e.final_loss), e.final_loss))
        return ranked[:n]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for e in self.experiments:
            out.append({"index": e.index, **e.hyper, "state": e.state, "loss": e.final_loss,
                        "updates_per_s": e.task.get_updates_per_second(), "cost": e.task.cost(),
                        "saved": e.saved, "reason": e.reason or e.task.stop_reason})
        return out

    def table(self) -> str:
        """The experiments as a text table."""
        rows = self.rows()
        cols = ["index", *self.hyper_vars, "state", "loss", "updates_per_s", "cost", "saved", "reason"]

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return "nan" if math.isnan(v) else (f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}")
            return str(v)

        cells = [[fmt(r[c]) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        lines.append(f"cost {self.get_cost():.6f}  saved by stopping early {self.get_savings():.6f}")
        return "\n".join(lines)

    # -- running ---------------------------------------------------------------------------------------
    def run(self, UI: bool = False) -> list[dict[str, Any]]:  # noqa: N803  (the thesis's spelling)
        """Run the whole grid (blocking); ``UI=True`` also serves the live dashboard."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run_async(UI=UI))
        raise RuntimeError("run() called from a running event loop: await run_async()")

    async def run_async(self, UI: bool = False) -> list[dict[str, Any]]:  # noqa: N803
        self._wake = asyncio.Event()
        self._began = time.monotonic()
        dashboard = None
        if UI:
            from .dashboard import Dashboard

            dashboard = Dashboard(self)
            await dashboard.start()
            print(f"dashboard: {dashboard.url}", file=sys.stderr, flush=True)
        try:
            await self._schedule()
        finally:
            for e in self.experiments:
                if e.runner is not None and not e.runner.done():
                    e.task.kill()
            await asyncio.gather(*(e.runner for e in self.experiments if e.runner is not None),
                                 return_exceptions=True)
            if dashboard is not None:
                await dashboard.aclose()
            self._draw(final=True)
        return self.rows()

    def _running(self) -> list[Experiment]:
        return [e for e in self.experiments if e.state == "running"]

    def _fits(self, e: Experiment) -> bool:
        running = self._running()
        if len(running) >= self.num_jobs:
            return False
        if self.worker_budget is not None and sum(r.n_workers for r in running) + e.n_workers > self.worker_budget:
            return False
        return True

    async def _run_one(self, e: Experiment) -> None:
        try:
            e.result = await e.task.run_async()
            if e.state == "running":
                e.state = "done"
        except Exception as exc:  # one failed experiment does not end the search
            e.state, e.error = "failed", f"{type(exc).__name__}: {exc}"
            e.reason = e.error
        finally:
            e.ended = time.monotonic()
            assert self._wake is not None
            self._wake.set()

    async def _schedule(self) -> None:
        assert self._wake is not None and self._began is not None
        while True:
            for e in self.experiments:
                if e.state == "queued" and self._fits(e):
                    e.state, e.started = "running", time.monotonic()
                    e.runner = asyncio.create_task(self._run_one(e), name=f"cirrus-experiment-{e.index}")
            if all(e.state not in ("queued", "running") for e in self.experiments) and \
                    all(e.runner is None or e.runner.done() for e in self.experiments):
                return
            if self.timeout is not None and time.monotonic() - self._began > self.timeout:
                for e in self.experiments:
                    if e.state in ("queued", "running"):
                        self.kill(e.index, "grid search timeout")
            running = self._running()
            self.max_running = max(self.max_running, len(running))
            self.max_workers = max(self.max_workers, sum(e.n_workers for e in running))
            self._apply_rules()
            self._draw()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.25)

    def _apply_rules(self) -> None:
        if self.rules is None:
            return
        finals = [loss for e in self.experiments for _, loss in e.task.get_time_loss()[-1:] if math.isfinite(loss)]
        best = min(finals) if finals else math.inf
        for e in self._running():
            tl = e.task.get_time_loss()
            if not tl:
                continue
            losses = [loss for _, loss in tl]
            k = int(self.rules["rising"])
            if not math.isfinite(losses[-1]):
                self.kill(e.index, "stopped by rule: loss is not finite")
            elif k and len(losses) > k and all(losses[-j] > losses[-j - 1] for j in range(1, k + 1)):
                self.kill(e.index, f"stopped by rule: loss rose for {k} evaluations")
            elif tl[-1][0] >= self.rules["grace"] and math.isfinite(best) and \
                    losses[-1] > best * (1 + self.rules["margin"]):
                self.kill(e.index, f"stopped by rule: loss {losses[-1]:.4g} worse than the best {best:.4g} "
                                   f"by more than {self.rules['margin']:.0%}")

    def _draw(self, final: bool = False) -> None:
        if not self.progress:
            return
        counts = {s: sum(e.state == s for e in self.experiments) for s in
                  ("queued", "running", "done", "killed", "stopped", "failed")}
        line = " ".join(f"{k} {v}" for k, v in counts.items() if v) + \
            f" | cost {self.get_cost():.5f} saved {self.get_savings():.5f}"
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if sys.stderr.isatty() else
                         (line + "\n" if final else ""))
        sys.stderr.flush()
