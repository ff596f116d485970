"""Model kernels (cirrus.modelmath): gradients against central finite differences, numerical edge
cases, and small end-to-end trainings checked against independent references (sklearn's
LogisticRegression, a plain ALS solver, known synthetic LDA topics)."""

from __future__ import annotations

import numpy as np
import pytest

from cirrus.modelmath import (als_reference, cf_loss_grad, cf_rmse, lda_gibbs_sweep, lda_init,
                              lda_perplexity, lr_loss_grad, lr_predict, softmax_loss_grad,
                              softmax_loss_grad_dense, softmax_predict, softmax_predict_dense)


# -- helpers ---------------------------------------------------------------------------------------

def _fd(f, x, eps=1e-6):
    """Central finite-difference gradient of scalar f at array x (x is perturbed in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def _sparse_batch(rng, n=7, d=12, max_nnz=5):
    """Random CSR minibatch; row 0 repeats a feature id, and one row is empty."""
    lens = rng.integers(1, max_nnz + 1, size=n)
    lens[-1] = 0
    indptr = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
    indices = rng.integers(0, d, size=indptr[-1])
    indices[1] = indices[0]  # a repeated id (made to sit inside row 0 by _batch_with_repeat)
    values = rng.normal(size=indptr[-1])
    return indptr, indices, values


def _batch_with_repeat(rng):
    indptr, indices, values = _sparse_batch(rng)
    # make sure row 0 has at least two nonzeros so the repeat is inside one row
    if indptr[1] < 2:
        indptr = indptr.copy()
        indices = np.concatenate(([indices[0]], indices))
        values = np.concatenate(([0.7], values))
        indptr[1:] += 1
    indices[1] = indices[0]
    uniq, inv = np.unique(indices, return_inverse=True)
    assert np.bincount(inv).max() >= 2
    return indptr, indices, values, uniq, inv


def _dense_from_csr(indptr, indices, values, d):
    n = indptr.size - 1
    X = np.zeros((n, d))
    for j in range(n):
        for k in range(indptr[j], indptr[j + 1]):
            X[j, indices[k]] += values[k]
    return X


# -- logistic regression ---------------------------------------------------------------------------

def test_lr_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    indptr, indices, values, uniq, inv = _batch_with_repeat(rng)
    n = indptr.size - 1
    labels = rng.integers(0, 2, size=n)
    w = rng.normal(size=uniq.size)
    b = np.array([0.3])
    loss, g, gb = lr_loss_grad(indptr, indices, values, labels, w, inv, b[0])
    assert g.shape == w.shape and g.dtype == np.float64
    f = lambda: lr_loss_grad(indptr, indices, values, labels, w, inv, b[0])[0]
    np.testing.assert_allclose(g, _fd(f, w), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gb, _fd(f, b)[0], rtol=1e-6, atol=1e-8)
    # loss agrees with a direct dense computation
    X = _dense_from_csr(indptr, indices, values, indices.max() + 1)
    wfull = np.zeros(indices.max() + 1)
    wfull[uniq] = w
    p = 1 / (1 + np.exp(-(X @ wfull + b[0])))
    np.testing.assert_allclose(loss, -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    np.testing.assert_allclose(lr_predict(indptr, indices, values, w, inv, b[0]), p)


def test_lr_huge_margins_and_pm1_labels():
    indptr = np.array([0, 1, 2, 3, 4])
    indices = np.array([0, 1, 0, 1])
    values = np.array([1.0, 1.0, 1.0, 1.0])
    uniq, inv = np.unique(indices, return_inverse=True)
    w = np.array([1e4, -1e4])
    y01 = np.array([0, 1, 0, 1])  # margins +1e4 with label 0, -1e4 with label 1: loss 1e4 each
    loss, g, gb = lr_loss_grad(indptr, indices, values, y01, w, inv, 0.0)
    assert np.isfinite(loss) and np.all(np.isfinite(g)) and np.isfinite(gb)
    np.testing.assert_allclose(loss, 1e4)
    loss_ok, _, _ = lr_loss_grad(indptr, indices, values, 1 - y01, w, inv, 0.0)
    assert loss_ok == pytest.approx(0.0, abs=1e-300)
    p = lr_predict(indptr, indices, values, w, inv, 0.0)
    np.testing.assert_array_equal(p, [1.0, 0.0, 1.0, 0.0])

    rng = np.random.default_rng(1)
    indptr, indices, values, uniq, inv = _batch_with_repeat(rng)
    n = indptr.size - 1
    y = rng.integers(0, 2, size=n)
    y[:2] = [0, 1]
    wr = rng.normal(size=uniq.size)
    a = lr_loss_grad(indptr, indices, values, y, wr, inv, -0.2)
    b = lr_loss_grad(indptr, indices, values, 2 * y - 1, wr, inv, -0.2)
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError):
        lr_loss_grad(indptr, indices, values, y + 1, wr, inv, 0.0)


# -- softmax regression ----------------------------------------------------------------------------

def test_softmax_gradient_matches_finite_differences_and_dense():
    rng = np.random.default_rng(2)
    indptr, indices, values, uniq, inv = _batch_with_repeat(rng)
    n, K = indptr.size - 1, 4
    labels = rng.integers(0, K, size=n)
    W = rng.normal(size=(uniq.size, K))
    b = rng.normal(size=K)
    loss, gW, gb = softmax_loss_grad(indptr, indices, values, labels, W, inv, b)
    assert gW.shape == W.shape and gb.shape == (K,)
    f = lambda: softmax_loss_grad(indptr, indices, values, labels, W, inv, b)[0]
    np.testing.assert_allclose(gW, _fd(f, W), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gb, _fd(f, b), rtol=1e-6, atol=1e-8)

    # the dense variant on the same data (columns = pulled rows) gives the same numbers
    X = _dense_from_csr(indptr, inv, values, uniq.size)
    dl, dgW, dgb = softmax_loss_grad_dense(X, labels, W, b)
    np.testing.assert_allclose(dl, loss)
    np.testing.assert_allclose(dgW, gW, atol=1e-12)
    np.testing.assert_allclose(dgb, gb, atol=1e-12)
    fd = lambda: softmax_loss_grad_dense(X, labels, W, b)[0]
    np.testing.assert_allclose(dgW, _fd(fd, W), rtol=1e-6, atol=1e-8)

    P = softmax_predict(indptr, indices, values, W, inv, b)
    assert P.shape == (n, K)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    np.testing.assert_allclose(P, softmax_predict_dense(X, W, b))
    np.testing.assert_allclose(loss, -np.mean(np.log(P[np.arange(n), labels])))


def test_softmax_stable_and_rejects_bad_labels():
    indptr = np.array([0, 1, 2])
    indices = np.array([0, 0])
    values = np.array([1.0, -1.0])
    inv = np.array([0, 0])
    W = np.array([[1000.0, -1000.0, 0.0]])
    b = np.zeros(3)
    loss, gW, gb = softmax_loss_grad(indptr, indices, values, [0, 1], W, inv, b)
    assert np.isfinite(loss) and np.all(np.isfinite(gW))
    np.testing.assert_allclose(loss, 0.0, atol=1e-12)
    P = softmax_predict(indptr, indices, values, W, inv, b)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    for bad in ([0, 3], [-1, 0], [0.5, 1]):
        with pytest.raises(ValueError):
            softmax_loss_grad(indptr, indices, values, bad, W, inv, b)
    with pytest.raises(ValueError):
        softmax_loss_grad_dense(np.ones((2, 1)), [0, 3], W, b)


def test_softmax_gd_on_digits_close_to_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    ref = LogisticRegression(max_iter=2000).fit(Xtr, ytr)
    ref_acc = ref.score(Xte, yte)

    K = 10
    W = np.zeros((X.shape[1], K))
    b = np.zeros(K)
    losses = []
    for _ in range(300):
        loss, gW, gb = softmax_loss_grad_dense(Xtr, ytr, W, b)
        losses.append(loss)
        W -= 2.0 * gW
        b -= 2.0 * gb
    assert losses[-1] < 0.25 * losses[0]
    acc = np.mean(softmax_predict_dense(Xte, W, b).argmax(axis=1) == yte)
    assert acc >= ref_acc - 0.03, (acc, ref_acc)

    # the sparse path on the same (sparsified) test data predicts identically
    rows, cols = np.nonzero(Xte)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=Xte.shape[0]))))
    uniq, inv = np.unique(cols, return_inverse=True)
    Ps = softmax_predict(indptr, cols, Xte[rows, cols], W[uniq], inv, b)
    np.testing.assert_allclose(Ps, softmax_predict_dense(Xte, W, b), atol=1e-12)


# -- collaborative filtering -----------------------------------------------------------------------

def test_cf_gradient_matches_finite_differences_with_repeats():
    rng = np.random.default_rng(3)
    users = np.array([5, 2, 5, 9, 2, 5, 7])
    items = np.array([1, 1, 4, 1, 3, 4, 0])  # (5, 4) appears twice
    ratings = rng.normal(3.0, 1.0, size=users.size)
    uq_u, inv_u = np.unique(users, return_inverse=True)
    uq_i, inv_i = np.unique(items, return_inverse=True)
    rank = 3
    P = rng.normal(size=(uq_u.size, rank))
    Q = rng.normal(size=(uq_i.size, rank))
    bu = rng.normal(size=uq_u.size)
    bi = rng.normal(size=uq_i.size)
    mu = 3.1
    out = cf_loss_grad(users, items, ratings, P, Q, bu, bi, inv_u, inv_i, mu)
    loss, gP, gQ, gbu, gbi = out
    f = lambda: cf_loss_grad(users, items, ratings, P, Q, bu, bi, inv_u, inv_i, mu)[0]
    for param, g in ((P, gP), (Q, gQ), (bu, gbu), (bi, gbi)):
        assert g.shape == param.shape and g.dtype == np.float64
        np.testing.assert_allclose(g, _fd(f, param), rtol=1e-6, atol=1e-8)
    pred = mu + bu[inv_u] + bi[inv_i] + (P[inv_u] * Q[inv_i]).sum(axis=1)
    np.testing.assert_allclose(loss, np.mean((ratings - pred) ** 2) / 2)
    # full-table RMSE agrees with the minibatch loss
    Pf = np.zeros((10, rank)); Pf[uq_u] = P
    Qf = np.zeros((5, rank)); Qf[uq_i] = Q
    buf = np.zeros(10); buf[uq_u] = bu
    bif = np.zeros(5); bif[uq_i] = bi
    np.testing.assert_allclose(cf_rmse(users, items, ratings, Pf, Qf, buf, bif, mu) ** 2 / 2, loss)


@pytest.fixture(scope="module")
def lowrank_ratings():
    rng = np.random.default_rng(4)
    nu, ni, rank, noise = 200, 150, 3, 0.1
    P = rng.normal(size=(nu, rank))
    Q = rng.normal(size=(ni, rank))
    bu = rng.normal(0, 0.5, nu)
    bi = rng.normal(0, 0.5, ni)
    mask = rng.random((nu, ni)) < 0.3
    u, i = np.nonzero(mask)
    r = 3.0 + bu[u] + bi[i] + (P[u] * Q[i]).sum(axis=1) + rng.normal(0, noise, u.size)
    perm = rng.permutation(u.size)
    n_te = u.size // 10
    te, tr = perm[:n_te], perm[n_te:]
    return dict(nu=nu, ni=ni, rank=rank, noise=noise, tr=(u[tr], i[tr], r[tr]),
                te=(u[te], i[te], r[te]))


def test_cf_als_reference_reaches_noise_level(lowrank_ratings):
    d = lowrank_ratings
    P, Q, bu, bi, mu = als_reference(*d["tr"], d["nu"], d["ni"], d["rank"], l2=0.5, iters=15, seed=0)
    rmse_te = cf_rmse(*d["te"], P, Q, bu, bi, mu)
    rmse_tr = cf_rmse(*d["tr"], P, Q, bu, bi, mu)
    assert rmse_tr < 1.1 * d["noise"]
    assert rmse_te < 1.3 * d["noise"], rmse_te
    d["als_rmse"] = rmse_te


def test_cf_sgd_with_pulled_rows_close_to_als(lowrank_ratings):
    d = lowrank_ratings
    if "als_rmse" not in d:
        P, Q, bu, bi, mu = als_reference(*d["tr"], d["nu"], d["ni"], d["rank"], l2=0.5, iters=15,
                                         seed=0)
        d["als_rmse"] = cf_rmse(*d["te"], P, Q, bu, bi, mu)
    u, i, r = d["tr"]
    rng = np.random.default_rng(5)
    rank = d["rank"]
    # server tables
    P = rng.normal(0, 0.1, (d["nu"], rank))
    Q = rng.normal(0, 0.1, (d["ni"], rank))
    bu = np.zeros(d["nu"])
    bi = np.zeros(d["ni"])
    mu = float(r.mean())
    batch, lr, l2 = 100, 2.0, 1e-4
    rmse0 = cf_rmse(*d["te"], P, Q, bu, bi, mu)
    for epoch in range(60):
        perm = rng.permutation(u.size)
        step = lr / (1 + epoch / 20)
        for s in range(0, u.size, batch):
            sel = perm[s:s + batch]
            uu, ii, rr = u[sel], i[sel], r[sel]
            uq_u, inv_u = np.unique(uu, return_inverse=True)
            uq_i, inv_i = np.unique(ii, return_inverse=True)
            Pr, Qr, bur, bir = P[uq_u], Q[uq_i], bu[uq_u], bi[uq_i]  # pull
            _, gP, gQ, gbu, gbi = cf_loss_grad(uu, ii, rr, Pr, Qr, bur, bir, inv_u, inv_i, mu)
            # optimizer-side L2 on the pulled factor rows, then push
            P[uq_u] -= step * (gP + l2 * Pr)
            Q[uq_i] -= step * (gQ + l2 * Qr)
            bu[uq_u] -= step * gbu
            bi[uq_i] -= step * gbi
    rmse = cf_rmse(*d["te"], P, Q, bu, bi, mu)
    assert rmse < 0.2 * rmse0
    assert rmse <= 1.10 * d["als_rmse"], (rmse, d["als_rmse"])


# -- LDA -------------------------------------------------------------------------------------------

def _lda_corpus(rng, n_docs, doc_len, V=30, K=3):
    """K topics over disjoint blocks of V/K words; each document is dominated by one topic."""
    block = V // K
    doc_ptr = np.arange(n_docs + 1) * doc_len
    words = np.empty(n_docs * doc_len, dtype=np.int64)
    for d_ in range(n_docs):
        theta = rng.dirichlet(np.full(K, 0.1))
        t = rng.choice(K, size=doc_len, p=theta)
        words[doc_ptr[d_]:doc_ptr[d_ + 1]] = t * block + rng.integers(0, block, size=doc_len)
    return doc_ptr, words


def test_lda_init_and_stale_counts_consistency():
    rng = np.random.default_rng(6)
    doc_ptr, words = _lda_corpus(rng, 10, 20)
    K, V = 3, 30
    z, dt, dwt, dtt = lda_init(doc_ptr, words, K, rng)
    uniq, winv = np.unique(words, return_inverse=True)
    assert dt.sum() == words.size and np.all(dt.sum(axis=1) == np.diff(doc_ptr))
    np.testing.assert_array_equal(dwt.sum(axis=1), np.bincount(winv))
    np.testing.assert_array_equal(dtt, dwt.sum(axis=0))
    np.testing.assert_array_equal(dtt, np.bincount(z, minlength=K))

    # consistent pulled counts: the sweep's deltas keep the counts equal to the recount
    z2, dt2, dwt2, dtt2 = lda_gibbs_sweep(doc_ptr, words, z, dt, dwt, winv, dtt, 0.1, 0.01, V, rng)
    assert dt2.sum() == words.size and dt2.min() >= 0
    assert dwt2.sum(axis=1).tolist() == [0] * uniq.size and dtt2.sum() == 0
    np.testing.assert_array_equal(dtt2, dwt2.sum(axis=0))
    np.testing.assert_array_equal(dwt + dwt2, np.bincount(winv * K + z2, minlength=uniq.size * K)
                                  .reshape(-1, K))
    np.testing.assert_array_equal(dt2, np.bincount(np.repeat(np.arange(10), 20) * K + z2,
                                                   minlength=10 * K).reshape(-1, K))

    # stale (all-zero) server counts: sampling still works, nothing negative, deltas still exact
    z3, dt3, dwt3, dtt3 = lda_gibbs_sweep(doc_ptr, words, z, dt, np.zeros_like(dwt), winv,
                                          np.zeros(K, dtype=np.int64), 0.1, 0.01, V, rng)
    assert dt3.min() >= 0 and dt3.sum() == words.size
    assert np.all(dwt3.sum(axis=1) == 0) and dtt3.sum() == 0
    assert np.all(dwt + dwt3 >= 0)
    cnt = lambda zz: np.bincount(winv * K + zz, minlength=uniq.size * K).reshape(-1, K)
    np.testing.assert_array_equal(dwt3, cnt(z3) - cnt(z))
    np.testing.assert_array_equal(dtt3, np.bincount(z3, minlength=K) - np.bincount(z, minlength=K))
    assert np.any(z3 != z)


def test_lda_recovers_separated_topics():
    rng = np.random.default_rng(7)
    V, K, alpha, beta = 30, 3, 0.1, 0.01
    doc_ptr, words = _lda_corpus(rng, 80, 40, V, K)
    hdoc_ptr, hwords = _lda_corpus(rng, 20, 40, V, K)
    # two workers, each owning half of the documents; the "server" holds word_topic/topic_totals
    halves = [(0, 40), (40, 80)]
    parts = []
    word_topic = np.zeros((V, K), dtype=np.int64)
    topic_totals = np.zeros(K, dtype=np.int64)
    for lo, hi in halves:
        ptr = doc_ptr[lo:hi + 1] - doc_ptr[lo]
        w = words[doc_ptr[lo]:doc_ptr[hi]]
        z, dt, dwt, dtt = lda_init(ptr, w, K, rng)
        uniq, winv = np.unique(w, return_inverse=True)
        word_topic[uniq] += dwt
        topic_totals += dtt
        parts.append([ptr, w, z, dt, uniq, winv])
    perp = [lda_perplexity(hdoc_ptr, hwords, word_topic, topic_totals, alpha, beta, 10, rng)]
    for sweep in range(30):
        for part in parts:
            ptr, w, z, dt, uniq, winv = part
            rows = word_topic[uniq].copy()  # pull
            z, dt, dwt, dtt = lda_gibbs_sweep(ptr, w, z, dt, rows, winv, topic_totals, alpha, beta,
                                              V, rng)
            word_topic[uniq] += dwt  # push
            topic_totals += dtt
            part[2], part[3] = z, dt
        assert word_topic.min() >= 0 and word_topic.sum() == words.size
        np.testing.assert_array_equal(topic_totals, word_topic.sum(axis=0))
        if sweep in (4, 29):
            perp.append(lda_perplexity(hdoc_ptr, hwords, word_topic, topic_totals, alpha, beta, 10,
                                       rng))
    assert sum(p[3].sum() for p in parts) == words.size
    assert perp[0] > perp[1] > perp[2] * 0.98 and perp[0] > perp[2] * 1.3, perp
    assert perp[2] < 0.6 * V, perp  # a uniform model scores exactly V
    # each learned topic concentrates on one true block, and the blocks are a permutation
    block = V // K
    mass = np.stack([word_topic[t * block:(t + 1) * block].sum(axis=0) for t in range(K)])  # true x learned
    frac = mass / mass.sum(axis=0, keepdims=True)
    best = frac.argmax(axis=0)
    assert sorted(best.tolist()) == list(range(K)), frac
    assert frac.max(axis=0).min() > 0.9, frac
