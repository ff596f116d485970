"""Models as the training loop sees them: which parameter-server tables they need, one SGD step
of a worker (pull the rows a minibatch touches, compute the gradient, push it), and the held-out
metric the driver evaluates. The numerics live in :mod:`cirrus.modelmath`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .dataset import Partition
from .modelmath import lr_loss_grad, lr_predict
from .ps.client import PSClient


class SparseLogisticRegression:
    """Logistic regression on sparse (hashed) features: table ``w`` holds ``model_size`` weights
    and, in row ``model_size``, the bias. Labels 0/1 (or -1/1)."""

    name = "logistic_regression"
    metric = "log_loss"

    def __init__(self, model_size: int) -> None:
        self.model_size = int(model_size)
        self.bias_row = np.array([self.model_size], dtype=np.int64)

    def tables(self) -> list[tuple[str, int, int]]:
        return [("w", self.model_size + 1, 1)]

    def check_dataset(self, kind: str, n_features: int) -> None:
        if kind != "sparse":
            raise ValueError(f"logistic regression trains on sparse datasets (this one is {kind}); "
                             "hash it with cirrus.feature_hashing first")
        if n_features > self.model_size:
            raise ValueError(f"the dataset has {n_features} features but model_size is {self.model_size}: "
                             "raise model_size or hash the dataset to fewer features")

    async def step(self, ps: PSClient, mb: Partition) -> float:
        lo = int(mb.indptr[0])  # type: ignore[index]
        indices = mb.indices[lo:int(mb.indptr[-1])]  # type: ignore[index]
        uniq, inv = np.unique(indices, return_inverse=True)
        rows = np.concatenate([uniq.astype(np.int64), self.bias_row])
        w = await ps.pull("w", rows)
        loss, g, gb = lr_loss_grad(mb.indptr - lo, indices, mb.values[lo:int(mb.indptr[-1])],  # type: ignore[index,operator]
                                   mb.labels, w[:-1, 0], inv, float(w[-1, 0]))
        await ps.push("w", rows, np.append(g, gb))
        return loss

    def evaluate(self, tables: dict[str, np.ndarray], test: list[Partition]) -> dict[str, float]:
        w = tables["w"][:, 0]
        losses, correct, n = 0.0, 0, 0
        for p in test:
            if p.n_rows == 0:
                continue
            lo, hi = int(p.indptr[0]), int(p.indptr[-1])  # type: ignore[index]
            idx = np.asarray(p.indices[lo:hi], dtype=np.int64)  # type: ignore[index]
            prob = lr_predict(p.indptr - lo, idx, p.values[lo:hi], w[idx], np.arange(idx.size),  # type: ignore[index,operator]
                              float(w[-1]))
            y = (np.asarray(p.labels) > 0).astype(np.float64)
            eps = 1e-15
            prob = np.clip(prob, eps, 1 - eps)
            losses += float(-(y * np.log(prob) + (1 - y) * np.log(1 - prob)).sum())
            correct += int(((prob >= 0.5) == (y > 0)).sum())
            n += p.n_rows
        if n == 0:
            return {"log_loss": float("nan"), "accuracy": float("nan")}
        return {"log_loss": losses / n, "accuracy": correct / n}


MODELS: dict[str, Any] = {"logistic_regression": SparseLogisticRegression}


def make_model(name: str, **kwargs: Any) -> Any:
    try:
        return MODELS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
