"""Softmax, collaborative filtering and LDA trained end to end (PS shard processes, worker
processes) against single-process references on the same held-out data."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cirrus import open_dataset
from cirrus.dataset import write_arrays_sync
from cirrus.training import LDA, CollaborativeFiltering, Softmax


def _train_rows(uri: str, test_fraction: float) -> int:
    """Rows of the partitions a task trains on (the last test_fraction of partitions are held out)."""
    async def go() -> int:
        async with await open_dataset(uri) as ds:
            n = ds.n_partitions
            n_test = min(n - 1, max(1, round(n * test_fraction)))
            return sum(ds.partition_rows(i) for i in range(n - n_test))
    return asyncio.run(go())


def test_softmax_on_digits_matches_sklearn_accuracy(tmp_path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression as SkLR

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    perm = np.random.default_rng(0).permutation(len(y))
    X, y = X[perm], y[perm]
    uri = str(tmp_path / "digits")
    write_arrays_sync(uri, y.astype(np.float32), dense=X.astype(np.float32), partition_bytes=30_000)
    r = Softmax({"dataset": uri, "n_classes": 10, "n_workers": 2, "timeout": 10, "learning_rate": 0.3,
                 "opt_method": "adagrad", "epsilon": 0.0, "test_fraction": 0.2}).run()
    n = _train_rows(uri, 0.2)
    sk = SkLR(max_iter=5000).fit(X[:n], y[:n]).score(X[n:], y[n:])
    print("softmax accuracy", r["final"]["accuracy"], "sklearn", sk)
    assert r["final"]["accuracy"] >= sk - 0.01, (r["final"], sk)


def test_collaborative_filtering_matches_als_rmse(tmp_path) -> None:
    from scipy.sparse import csr_matrix

    from cirrus.generators import ratings
    from cirrus.modelmath import als_reference, cf_rmse
    from cirrus.models import held_out

    R = ratings(600, 400, 5, 0.1, 0.1, seed=1)
    M = csr_matrix((R.ratings, (R.users, R.items)), shape=(600, 400))
    uri = str(tmp_path / "ratings")
    write_arrays_sync(uri, np.zeros(600, np.float32), csr=(M.indptr, M.indices, M.data, 400), partition_bytes=20_000)
    r = CollaborativeFiltering({"dataset": uri, "rank": 5, "n_workers": 2, "timeout": 12, "learning_rate": 0.3,
                                "opt_method": "adagrad", "epsilon": 0.0, "test_fraction": 0.1}).run()
    u, i = R.users.astype(np.int64), R.items.astype(np.int64)
    ho = held_out(u, i, 0.1)   # the same held-out pairs the task never trained on
    P, Q, bu, bi, mu = als_reference(u[~ho], i[~ho], R.ratings[~ho], 600, 400, 5, 0.5, 15, 0)
    als = cf_rmse(u[ho], i[ho], R.ratings[ho], P, Q, bu, bi, mu)
    print("cf rmse", r["final"]["rmse"], "als", als)
    assert r["final"]["held_out_ratings"] == int(ho.sum())
    assert r["final"]["rmse"] <= als * 1.05, (r["final"], als)


def test_lda_perplexity_near_sklearn(tmp_path) -> None:
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import LatentDirichletAllocation

    from cirrus.generators import topic_corpus
    from cirrus.modelmath import lda_perplexity
    from cirrus.models import _tokens
    from cirrus.dataset import Partition

    data, _, _ = topic_corpus(1000, 300, 5, 60, seed=2)
    uri = str(tmp_path / "corpus")
    write_arrays_sync(uri, data.labels, csr=(data.indptr, data.indices, data.values, 300), partition_bytes=15_000)
    alpha, beta = 0.1, 0.01
    n = _train_rows(uri, 0.1)
    X = csr_matrix((data.values, data.indices, data.indptr), shape=(data.n_rows, 300))
    sk = LatentDirichletAllocation(n_components=5, doc_topic_prior=alpha, topic_word_prior=beta,
                                   learning_method="batch", max_iter=50, random_state=0).fit(X[:n])
    # score sklearn's topics with the same held-out estimator the task uses
    held = Partition(data.labels[n:], indptr=data.indptr[n:] - data.indptr[n], n_features=300,
                     indices=data.indices[data.indptr[n]:], values=data.values[data.indptr[n]:])
    doc_ptr, words = _tokens(held)
    wt = np.clip(sk.components_.T - beta, 0, None)
    ref = lda_perplexity(doc_ptr, words, wt, wt.sum(axis=0), alpha, beta, 20, np.random.default_rng(0))
    # train until within 5 % of the reference (a deadline, not a fixed time: the machine may be busy)
    r = LDA({"dataset": uri, "n_topics": 5, "n_workers": 2, "timeout": 90, "epsilon": 0.0, "test_fraction": 0.1,
             "minibatch_size": 50, "alpha": alpha, "beta": beta, "eval_interval": 2.0,
             "target_loss": ref * 1.05}).run()
    print("lda perplexity", r["final"]["perplexity"], "sklearn", ref, r["time_loss"])
    assert r["stop_reason"] == "target loss reached", r["stop_reason"]
    losses = [p for _, p in r["time_loss"]]
    assert losses[-1] < losses[0]
    assert r["final"]["perplexity"] <= ref * 1.10, (r["final"], ref)
