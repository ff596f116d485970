"""Training without a parameter server: synchronous data-parallel SGD over zipcomm allreduce.

Each worker keeps a full replica of the model tables and the same optimizers. A step: the model
pulls rows from the local replica and pushes its gradient into a local buffer (the same calls it
makes against :class:`cirrus.ps.PSClient`); then :meth:`AllreducePS.sync` sends the step's sparse
gradient (touched rows only) through a zipcomm reduce channel — merged up the tree, the result
delivered to every worker — and every replica applies the mean over the round's contributors.
All replicas apply identical updates in identical order, so they stay equal.

Membership: all ``n_workers`` join before the first round (a barrier). A worker that dies is
simply no longer a contributor (zipcomm reports who contributed each round); a replacement would
start from a stale replica, so this mode does not replace workers (the driver refuses ``lifetime``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import zipcomm

from .optim import make_optimizer


def merge_gradients(values: list) -> dict:
    """zipcomm ``reduce_f``: concatenate the sparse gradients of several workers, per table."""
    out: dict[str, dict[str, list]] = {}
    for v in values:
        for name, g in v.items():
            slot = out.setdefault(name, {"rows": [], "grads": []})
            slot["rows"].append(np.asarray(g["rows"]))
            slot["grads"].append(np.asarray(g["grads"]))
    return {name: {"rows": np.concatenate(s["rows"]), "grads": np.concatenate(s["grads"])} for name, s in out.items()}


class AllreducePS:
    def __init__(self, rt: Any, channel: str, n_workers: int, tables: list, *, timeout: float = 60.0) -> None:
        self.rt = rt
        self.channel = channel
        self.n_workers = n_workers
        self.timeout = timeout
        self.tables: dict[str, np.ndarray] = {}
        self.opts: dict[str, Any] = {}
        self._pending: dict[str, tuple[list, list]] = {}
        for name, rows, cols, spec in tables:
            dtype = np.dtype(spec.get("dtype", "float32"))
            if spec.get("init", "zeros") == "normal":
                rng = np.random.default_rng([int(spec.get("seed", 0)), 0])
                self.tables[name] = (rng.standard_normal((rows, cols)) * float(spec.get("scale", 0.01))).astype(dtype)
            else:
                self.tables[name] = np.zeros((rows, cols), dtype=dtype)
            opt = spec.get("optimizer", "sgd")
            self.opts[name] = None if opt == "add" else make_optimizer(opt, (rows, cols), dtype, **spec.get("hyper", {}))
        self.red: Any = None
        self.contributors_min = n_workers

    async def connect(self) -> AllreducePS:
        deadline = time.monotonic() + self.timeout
        self.red = await self.rt.reduce_channel(f"{self.channel}-grad", reduce_f=merge_gradients)
        bar = await self.rt.reduce_channel(f"{self.channel}-barrier", reduce_f=zipcomm.SUM)
        while True:  # every worker joined the gradient channel before the barrier one
            got = await bar.allreduce(np.ones(1, dtype=np.int64), timeout=max(0.1, deadline - time.monotonic()))
            if int(np.asarray(got).reshape(-1)[0]) >= self.n_workers:
                break
        return self

    async def pull(self, table: str, rows: np.ndarray) -> np.ndarray:
        return self.tables[table][np.asarray(rows, dtype=np.int64)].astype(np.float32, copy=False)

    async def push(self, table: str, rows: np.ndarray, grads: np.ndarray, *, wait: bool = False) -> None:
        grads = np.asarray(grads, dtype=np.float32)
        if grads.ndim == 1:
            grads = grads.reshape(-1, 1)
        r, g = self._pending.setdefault(table, ([], []))
        r.append(np.asarray(rows, dtype=np.int64))
        g.append(grads)

    async def sync(self) -> int:
        """Allreduce this step's gradients and apply their mean; returns the contributor count."""
        mine = {name: {"rows": np.concatenate(r), "grads": np.concatenate(g)} for name, (r, g) in self._pending.items()}
        self._pending = {}
        total, contributors = await self.red.allreduce(mine, timeout=self.timeout, with_contributors=True)
        n = max(1, len(contributors))
        self.contributors_min = min(self.contributors_min, n)
        for name in sorted(total):
            rows = np.asarray(total[name]["rows"], dtype=np.int64)
            grads = np.asarray(total[name]["grads"], dtype=np.float64)
            uniq, inv = np.unique(rows, return_inverse=True)
            summed = np.zeros((uniq.size, grads.shape[1]))
            np.add.at(summed, inv, grads)
            opt = self.opts[name]
            if opt is None:
                np.add.at(self.tables[name], uniq, summed.astype(self.tables[name].dtype))
            else:
                opt.apply(self.tables[name], uniq, summed / n)
        return n

    async def kv_get(self, key: str, default: Any = None) -> Any:
        raise NotImplementedError("this model needs a parameter server (its key-value store)")

    async def kv_set(self, key: str, value: Any) -> None:
        raise NotImplementedError("this model needs a parameter server (its key-value store)")
