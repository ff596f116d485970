"""Models as the training loop sees them: which parameter-server tables they need, one SGD step
of a worker (pull the rows a minibatch touches, compute the gradient, push it), and the held-out
metric the driver evaluates. The numerics live in :mod:`cirrus.modelmath`."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from .dataset import Partition
from .modelmath import (cf_loss_grad, cf_rmse, lda_gibbs_sweep, lda_init, lda_perplexity, lr_loss_grad,
                        lr_predict, softmax_loss_grad, softmax_loss_grad_dense, softmax_predict,
                        softmax_predict_dense)
from .ps.client import PSClient


def _csr(mb: Partition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A minibatch's CSR arrays rebased to start at 0."""
    lo, hi = int(mb.indptr[0]), int(mb.indptr[-1])  # type: ignore[index]
    return mb.indptr - lo, mb.indices[lo:hi], mb.values[lo:hi]  # type: ignore[index,operator,return-value]


class SparseLogisticRegression:
    """Logistic regression on sparse (hashed) features: table ``w`` holds ``model_size`` weights
    and, in row ``model_size``, the bias. Labels 0/1 (or -1/1)."""

    name = "logistic_regression"
    metric = "log_loss"

    def __init__(self, model_size: int) -> None:
        self.model_size = int(model_size)
        self.bias_row = np.array([self.model_size], dtype=np.int64)

    holdout = "partitions"

    def tables(self) -> list[tuple[str, int, int, dict]]:
        return [("w", self.model_size + 1, 1, {})]

    def check_dataset(self, kind: str, n_features: int) -> None:
        if kind != "sparse":
            raise ValueError(f"logistic regression trains on sparse datasets (this one is {kind}); "
                             "hash it with cirrus.feature_hashing first")
        if n_features > self.model_size:
            raise ValueError(f"the dataset has {n_features} features but model_size is {self.model_size}: "
                             "raise model_size or hash the dataset to fewer features")

    table = "w"  # the one table a step pulls and pushes (see ``rows_of`` / ``gradient``)

    def rows_of(self, mb: Partition) -> tuple[np.ndarray, Any]:
        """The rows of ``w`` minibatch ``mb`` needs, and what :meth:`gradient` needs to know."""
        indptr, indices, values = _csr(mb)
        uniq, inv = np.unique(indices, return_inverse=True)
        return np.concatenate([uniq.astype(np.int64), self.bias_row]), (indptr, indices, values, inv)

    def gradient(self, mb: Partition, ctx: Any, w: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, gradient rows) of ``mb`` given the pulled rows ``w``."""
        indptr, indices, values, inv = ctx
        loss, g, gb = lr_loss_grad(indptr, indices, values, mb.labels, w[:-1, 0], inv, float(w[-1, 0]))
        return loss, np.append(g, gb)

    async def step(self, ps: PSClient, mb: Partition) -> float:
        rows, ctx = self.rows_of(mb)
        loss, g = self.gradient(mb, ctx, await ps.pull("w", rows))
        await ps.push("w", rows, g)
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


class SoftmaxRegression:
    """Multinomial logistic regression, sparse or dense rows, labels 0..n_classes-1: table ``W``
    has one row per feature and, in the last row, the biases (``n_classes`` columns)."""

    name = "softmax"
    metric = "log_loss"
    holdout = "partitions"

    def __init__(self, n_features: int, n_classes: int) -> None:
        self.n_features, self.k = int(n_features), int(n_classes)
        self.bias_row = np.array([self.n_features], dtype=np.int64)
        self.dense_rows = np.arange(self.n_features + 1, dtype=np.int64)

    def tables(self) -> list[tuple[str, int, int, dict]]:
        return [("W", self.n_features + 1, self.k, {})]

    def check_dataset(self, kind: str, n_features: int) -> None:
        if n_features != self.n_features:
            raise ValueError(f"the dataset has {n_features} features, the model {self.n_features}")

    async def step(self, ps: PSClient, mb: Partition) -> float:
        if mb.dense is not None:
            W = await ps.pull("W", self.dense_rows)
            loss, gW, gb = softmax_loss_grad_dense(mb.dense, mb.labels, W[:-1], W[-1])
            await ps.push("W", self.dense_rows, np.vstack([gW, gb]))
            return loss
        indptr, indices, values = _csr(mb)
        uniq, inv = np.unique(indices, return_inverse=True)
        rows = np.concatenate([uniq.astype(np.int64), self.bias_row])
        W = await ps.pull("W", rows)
        loss, gW, gb = softmax_loss_grad(indptr, indices, values, mb.labels, W[:-1], inv, W[-1])
        await ps.push("W", rows, np.vstack([gW, gb]))
        return loss

    def evaluate(self, tables: dict[str, np.ndarray], test: list[Partition]) -> dict[str, float]:
        W = tables["W"]
        nll, correct, n = 0.0, 0, 0
        for p in test:
            if p.n_rows == 0:
                continue
            if p.dense is not None:
                P = softmax_predict_dense(p.dense, W[:-1], W[-1])
            else:
                indptr, indices, values = _csr(p)
                idx = np.asarray(indices, dtype=np.int64)
                P = softmax_predict(indptr, idx, values, W[idx], np.arange(idx.size), W[-1])
            y = np.asarray(p.labels).astype(np.int64)
            nll += float(-np.log(np.clip(P[np.arange(y.size), y], 1e-15, None)).sum())
            correct += int((P.argmax(axis=1) == y).sum())
            n += y.size
        return {"log_loss": nll / n if n else float("nan"), "accuracy": correct / n if n else float("nan")}


def held_out(users: np.ndarray, items: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each rating (user, item) is held out: a fixed hash of the pair, so the driver and
    every worker agree without talking, and a user's other ratings still train."""
    x = (users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ items.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(1_000_000)) < np.uint64(int(round(fraction * 1_000_000)))


class CollaborativeFiltering:
    """Biased matrix factorization on a ratings dataset: row u of the dataset holds user u's
    ratings (indices = item ids, values = ratings). Tables ``P`` (users x rank), ``Q`` (items x
    rank), ``bu``, ``bi``; ``mu`` is the mean training rating. A fixed ``test_fraction`` of the
    (user, item) pairs, chosen by :func:`held_out`, is never trained on and gives the RMSE."""

    name = "collaborative_filtering"
    metric = "rmse"
    holdout = "entries"

    def __init__(self, n_users: int, n_items: int, rank: int, mu: float, row_offsets: list[int],
                 test_fraction: float, init_scale: float = 0.1) -> None:
        self.n_users, self.n_items, self.rank = int(n_users), int(n_items), int(rank)
        self.mu = float(mu)
        self.row_offsets = np.asarray(row_offsets, dtype=np.int64)
        self.test_fraction = float(test_fraction)
        self.init_scale = float(init_scale)

    def tables(self) -> list[tuple[str, int, int, dict]]:
        normal = {"init": "normal", "scale": self.init_scale}
        return [("P", self.n_users, self.rank, dict(normal, seed=1)), ("Q", self.n_items, self.rank, dict(normal, seed=2)),
                ("bu", self.n_users, 1, {}), ("bi", self.n_items, 1, {})]

    def check_dataset(self, kind: str, n_features: int) -> None:
        if kind != "sparse":
            raise ValueError("collaborative filtering needs a sparse ratings dataset (row = user, "
                             "indices = items, values = ratings)")

    def triples(self, mb: Partition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        indptr, items, ratings = _csr(mb)
        first = int(self.row_offsets[getattr(mb, "partition", 0)]) + int(getattr(mb, "start", 0))
        users = first + np.repeat(np.arange(mb.n_rows, dtype=np.int64), np.diff(indptr))
        return users, np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float64)

    async def step(self, ps: PSClient, mb: Partition) -> float:
        users, items, ratings = self.triples(mb)
        keep = ~held_out(users, items, self.test_fraction)
        users, items, ratings = users[keep], items[keep], ratings[keep]
        if ratings.size == 0:
            return 0.0
        uu, inv_u = np.unique(users, return_inverse=True)
        ui, inv_i = np.unique(items, return_inverse=True)
        P, Q, bu, bi = await asyncio.gather(ps.pull("P", uu), ps.pull("Q", ui), ps.pull("bu", uu), ps.pull("bi", ui))
        loss, gP, gQ, gbu, gbi = cf_loss_grad(users, items, ratings, P, Q, bu, bi, inv_u, inv_i, self.mu)
        await asyncio.gather(ps.push("P", uu, gP), ps.push("Q", ui, gQ), ps.push("bu", uu, gbu),
                             ps.push("bi", ui, gbi))
        return loss

    def evaluate(self, tables: dict[str, np.ndarray], test: list[Partition]) -> dict[str, float]:
        parts = [self.triples(p) for p in test]
        users = np.concatenate([t[0] for t in parts]) if parts else np.empty(0, np.int64)
        items = np.concatenate([t[1] for t in parts]) if parts else np.empty(0, np.int64)
        ratings = np.concatenate([t[2] for t in parts]) if parts else np.empty(0)
        sel = held_out(users, items, self.test_fraction)
        rmse = cf_rmse(users[sel], items[sel], ratings[sel], tables["P"], tables["Q"], tables["bu"][:, 0],
                       tables["bi"][:, 0], self.mu)
        return {"rmse": rmse, "held_out_ratings": int(sel.sum())}


def _tokens(p: Partition) -> tuple[np.ndarray, np.ndarray]:
    """A bag-of-words partition (indices = word ids, values = counts) as (doc_ptr, words)."""
    indptr, indices, values = _csr(p)
    counts = np.rint(np.asarray(values)).astype(np.int64)
    if (counts < 0).any():
        raise ValueError("LDA needs non-negative word counts")
    words = np.repeat(np.asarray(indices, dtype=np.int64), counts)
    per_doc = np.add.reduceat(counts, indptr[:-1]) if counts.size else np.zeros(p.n_rows, np.int64)
    per_doc = np.where(np.diff(indptr) > 0, per_doc, 0)
    return np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64), words


class LDA:
    """Latent Dirichlet allocation by collapsed Gibbs sampling. Documents are rows of a sparse
    bag-of-words dataset. The word-topic counts ``nwk`` (vocab x topics) and topic totals ``nk``
    live on the parameter server (pushes are count deltas); each minibatch's token assignments are
    kept in the server's key-value store, so any worker (or a replacement) continues them."""

    name = "lda"
    metric = "perplexity"
    holdout = "partitions"
    # a minibatch's token assignments live in the PS key-value store: one worker (incarnation after
    # incarnation) owns each partition, so no two workers resample the same tokens at once
    owns_partitions = True

    def __init__(self, vocab_size: int, n_topics: int, alpha: float, beta: float, seed: int = 0,
                 fold_in_iters: int = 20) -> None:
        self.v, self.k = int(vocab_size), int(n_topics)
        self.alpha, self.beta = float(alpha), float(beta)
        self.rng = np.random.default_rng(seed)
        self.fold_in_iters = int(fold_in_iters)
        self.totals_row = np.zeros(1, dtype=np.int64)

    def tables(self) -> list[tuple[str, int, int, dict]]:
        return [("nwk", self.v, self.k, {"optimizer": "add"}), ("nk", 1, self.k, {"optimizer": "add"})]

    def check_dataset(self, kind: str, n_features: int) -> None:
        if kind != "sparse" or n_features != self.v:
            raise ValueError(f"LDA needs a sparse bag-of-words dataset with {self.v} words "
                             f"(got {kind}, {n_features})")

    async def step(self, ps: PSClient, mb: Partition) -> float:
        doc_ptr, words = _tokens(mb)
        if words.size == 0:
            return 0.0
        key = f"lda-z/{getattr(mb, 'partition', 0)}/{getattr(mb, 'start', 0)}"
        uniq, winv = np.unique(words, return_inverse=True)
        z = await ps.kv_get(key)
        if z is None:  # first visit: random topics, counts added to the model
            z, _, d_wt, d_tt = lda_init(doc_ptr, words, self.k, self.rng)
            await ps.push("nwk", uniq, d_wt.astype(np.float32))
            await ps.push("nk", self.totals_row, d_tt.reshape(1, -1).astype(np.float32))
            await ps.kv_set(key, z.astype(np.int32))
            return 1.0  # every token got a (new) topic
        z = np.asarray(z, dtype=np.int64)
        doc = np.repeat(np.arange(doc_ptr.size - 1), np.diff(doc_ptr))
        doc_topic = np.bincount(doc * self.k + z, minlength=(doc_ptr.size - 1) * self.k).reshape(-1, self.k)
        wt, tt = await asyncio.gather(ps.pull("nwk", uniq), ps.pull("nk", self.totals_row))
        z_new, _, d_wt, d_tt = lda_gibbs_sweep(doc_ptr, words, z, doc_topic, wt, winv, tt[0], self.alpha,
                                               self.beta, self.v, self.rng)
        await ps.kv_set(key, np.asarray(z_new, dtype=np.int32))
        await ps.push("nwk", uniq, d_wt.astype(np.float32))
        await ps.push("nk", self.totals_row, np.asarray(d_tt, dtype=np.float32).reshape(1, -1))
        return float(np.mean(z_new != z))  # share of tokens that changed topic

    def evaluate(self, tables: dict[str, np.ndarray], test: list[Partition]) -> dict[str, float]:
        docs = [_tokens(p) for p in test if p.n_rows]
        if not docs:
            return {"perplexity": float("nan")}
        shift = np.cumsum([0] + [d[0][-1] for d in docs[:-1]])
        doc_ptr = np.concatenate([[0]] + [d[0][1:] + s for d, s in zip(docs, shift)])
        words = np.concatenate([d[1] for d in docs])
        nwk = np.clip(tables["nwk"], 0, None)
        rng = np.random.default_rng(0)
        return {"perplexity": lda_perplexity(doc_ptr, words, nwk, nwk.sum(axis=0), self.alpha, self.beta,
                                             self.fold_in_iters, rng)}


MODELS: dict[str, Any] = {"logistic_regression": SparseLogisticRegression, "softmax": SoftmaxRegression,
                          "collaborative_filtering": CollaborativeFiltering, "lda": LDA}


def make_model(name: str, **kwargs: Any) -> Any:
    try:
        return MODELS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
