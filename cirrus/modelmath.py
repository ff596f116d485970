"""Numerical kernels of the models trained by asynchronous SGD against a sparse parameter server.

A worker takes a minibatch, finds the unique parameter rows it touches, pulls exactly those rows,
computes gradients (or count deltas) for exactly those rows and pushes them back. Everything here
is pure numpy and works on the pulled rows only.

Conventions
-----------
* A sparse minibatch of ``n`` examples is given in CSR form: ``indptr`` (n+1, starting at 0),
  ``indices`` (nnz global feature ids) and ``values`` (nnz floats). Example ``j`` owns the nonzeros
  ``indptr[j]:indptr[j+1]``. The same feature id may appear several times within a row; such
  repeats are summed (x_jf = sum of the values carrying id f in row j).
* ``uniq, inv = np.unique(indices, return_inverse=True)``: ``uniq`` are the rows to pull and
  ``inv[k]`` is the pulled row used by nonzero ``k``. Gradients are returned for the pulled rows,
  in the same order, and accumulate every nonzero that maps to a row.
* All losses are means over the minibatch and all gradients are the gradients of that mean
  (i.e. divided by ``n``). Results are float64. No regularization term is included anywhere:
  L2 penalties (if any) are applied by the optimizer on the pulled rows.

Models
------
1. Sparse logistic regression. Margin ``m_j = bias + sum_k values_k * w[inv_k]`` over the
   nonzeros of example j; ``p_j = sigmoid(m_j)``. With labels ``y_j`` in {0, 1} (labels in
   {-1, +1} are accepted and mapped -1 -> 0, +1 -> 1) the loss is the mean log loss
   ``L = (1/n) sum_j [log(1 + exp(m_j)) - y_j m_j]``, evaluated as ``logaddexp(0, m) - y m`` so it
   stays finite for huge margins. ``dL/dm_j = (p_j - y_j)/n``; ``dL/dw_r = sum over nonzeros k
   with inv_k = r of values_k * dL/dm_{row(k)}``; ``dL/dbias = sum_j dL/dm_j``.
2. Softmax (multinomial logistic) regression with K classes and labels 0..K-1 (anything else
   raises ValueError). Scores ``s_j = b + sum_k values_k * W[inv_k]`` (a K-vector per example),
   ``P_j = softmax(s_j)`` computed after subtracting the row maximum, loss
   ``L = (1/n) sum_j [logsumexp(s_j) - s_j[y_j]]``. ``dL/ds_j = (P_j - onehot(y_j))/n``;
   ``dL/dW_r = sum over nonzeros k with inv_k = r of values_k * dL/ds_{row(k)}``;
   ``dL/db = sum_j dL/ds_j``. A dense variant takes X (n x d) and W (d x K).
3. Collaborative filtering, biased matrix factorization. For a rating (u, i, r) the prediction is
   ``rhat = mu + bu[u] + bi[i] + P[u] . Q[i]`` and the loss is ``L = (1/n) sum (r - rhat)^2 / 2``.
   The L2 term ``(l2/2)(|P[u]|^2 + |Q[i]|^2)`` is NOT part of this loss (nor of its gradient): it is
   applied by the optimizer. With ``e = rhat - r``: ``dL/dP[u] = (1/n) sum over the minibatch
   ratings of user u of e * Q[i]``, ``dL/dQ[i] = (1/n) sum over ratings of item i of e * P[u]``,
   ``dL/dbu[u] = (1/n) sum e``, ``dL/dbi[i] = (1/n) sum e`` (repeated users/items accumulate).
   ``mu`` is a fixed global offset (not learned). ``als_reference`` minimizes, for the same model
   with mu = mean rating, ``sum (r - rhat)^2 / 2 + (l2/2)(sum |P_u|^2 + |Q_i|^2 + bu_u^2 + bi_i^2)``
   by alternating exact ridge solves per user and per item.
4. LDA by collapsed Gibbs sampling. Counts ``doc_topic`` (D x K), ``word_topic`` (V x K) and
   ``topic_totals`` (K,) where topic_totals[k] = sum_w word_topic[w, k]. For a token of word w in
   document d currently in topic k, the token's own assignment is removed from the three counts and
   a new topic is drawn with probability proportional to
   ``(doc_topic[d] + alpha) * (word_topic[w] + beta) / (topic_totals + V * beta)``, then added back.
   The word-topic and topic-total counts live on the parameter server, the worker pulls the rows of
   the words in its documents and pushes the count *deltas* of its reassignments.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "lr_loss_grad", "lr_predict",
    "softmax_loss_grad", "softmax_predict", "softmax_loss_grad_dense", "softmax_predict_dense",
    "cf_loss_grad", "cf_predict", "cf_rmse", "als_reference",
    "lda_init", "lda_gibbs_sweep", "lda_perplexity",
]


# -- helpers ---------------------------------------------------------------------------------------

def _csr(indptr, indices, values, inv):
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices)
    values = np.asarray(values, dtype=np.float64)
    inv = np.asarray(inv, dtype=np.int64).reshape(-1)
    if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0:
        raise ValueError("indptr must be 1-D and start at 0")
    nnz = int(indptr[-1])
    if np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must be non-decreasing")
    if indices.shape[0] != nnz or values.shape[0] != nnz or inv.shape[0] != nnz:
        raise ValueError("indices, values and inv must each have indptr[-1] entries")
    n = indptr.size - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    return n, rows, values, inv


def _sigmoid(m):
    # exp(-log(1 + exp(-m))) is stable for both signs of m
    return np.exp(-np.logaddexp(0.0, -m))


def _lr_labels(labels, n):
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError("labels must have one entry per example")
    neg = y == -1
    zero = y == 0
    if not np.all(neg | zero | (y == 1)):
        raise ValueError("logistic regression labels must be in {0, 1} or {-1, 1}")
    if neg.any() and zero.any():
        raise ValueError("labels mix -1 and 0")
    return (y == 1).astype(np.float64)


def _softmax_labels(labels, n, K):
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError("labels must have one entry per example")
    if y.dtype.kind not in "iub":
        yf = y.astype(np.float64)
        if not np.all(np.isfinite(yf)) or not np.all(yf == np.round(yf)):
            raise ValueError("softmax labels must be integers")
        y = yf
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"softmax labels must be in 0..{K - 1}")
    return y


def _softmax_rows(S):
    S = S - S.max(axis=1, keepdims=True)
    E = np.exp(S)
    Z = E.sum(axis=1, keepdims=True)
    return E / Z, S, np.log(Z)[:, 0]


# -- 1. logistic regression -------------------------------------------------------------------------

def _lr_margins(n, rows, values, w_rows, inv, bias):
    w_rows = np.asarray(w_rows, dtype=np.float64).reshape(-1)
    return float(bias) + np.bincount(rows, weights=values * w_rows[inv], minlength=n), w_rows


def lr_loss_grad(indptr, indices, values, labels, w_rows, inv, bias):
    """Mean log loss of a sparse minibatch and its gradient w.r.t. the pulled weights and the bias.

    Returns ``(loss, g_rows, g_bias)``; ``g_rows`` has the shape of ``w_rows``.
    """
    n, rows, values, inv = _csr(indptr, indices, values, inv)
    y = _lr_labels(labels, n)
    m, w_rows = _lr_margins(n, rows, values, w_rows, inv, bias)
    if n == 0:
        return 0.0, np.zeros_like(w_rows), 0.0
    loss = float(np.mean(np.logaddexp(0.0, m) - y * m))
    dm = (_sigmoid(m) - y) / n
    g_rows = np.bincount(inv, weights=values * dm[rows], minlength=w_rows.shape[0])
    return loss, g_rows.astype(np.float64), float(dm.sum())


def lr_predict(indptr, indices, values, w_rows, inv, bias):
    """P(y = 1) for every example of a sparse minibatch."""
    n, rows, values, inv = _csr(indptr, indices, values, inv)
    m, _ = _lr_margins(n, rows, values, w_rows, inv, bias)
    return _sigmoid(m)


# -- 2. softmax regression --------------------------------------------------------------------------

def _softmax_scores(n, rows, values, W_rows, inv, b):
    W_rows = np.asarray(W_rows, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if W_rows.ndim != 2 or W_rows.shape[1] != b.shape[0]:
        raise ValueError("W_rows must be (rows, K) and b (K,)")
    S = np.tile(b, (n, 1))
    np.add.at(S, rows, values[:, None] * W_rows[inv])
    return S, W_rows, b


def softmax_loss_grad(indptr, indices, values, labels, W_rows, inv, b):
    """Mean cross-entropy of a sparse minibatch and its gradient w.r.t. the pulled rows and b.

    Returns ``(loss, gW_rows, gb)`` with ``gW_rows`` shaped like ``W_rows`` (rows x K).
    """
    n, rows, values, inv = _csr(indptr, indices, values, inv)
    S, W_rows, b = _softmax_scores(n, rows, values, W_rows, inv, b)
    K = b.shape[0]
    y = _softmax_labels(labels, n, K)
    if n == 0:
        return 0.0, np.zeros_like(W_rows), np.zeros_like(b)
    P, Sc, logZ = _softmax_rows(S)
    ar = np.arange(n)
    loss = float(np.mean(logZ - Sc[ar, y]))
    dS = P
    dS[ar, y] -= 1.0
    dS /= n
    gW = np.zeros_like(W_rows)
    np.add.at(gW, inv, values[:, None] * dS[rows])
    return loss, gW, dS.sum(axis=0)


def softmax_predict(indptr, indices, values, W_rows, inv, b):
    """(n, K) class probabilities of a sparse minibatch."""
    n, rows, values, inv = _csr(indptr, indices, values, inv)
    S, _, _ = _softmax_scores(n, rows, values, W_rows, inv, b)
    return _softmax_rows(S)[0]


def softmax_loss_grad_dense(X, labels, W, b):
    """Dense convenience: X (n x d), W (d x K), b (K,). Returns ``(loss, gW, gb)``."""
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or W.ndim != 2 or X.shape[1] != W.shape[0] or W.shape[1] != b.shape[0]:
        raise ValueError("shapes must be X (n, d), W (d, K), b (K,)")
    n = X.shape[0]
    y = _softmax_labels(labels, n, b.shape[0])
    if n == 0:
        return 0.0, np.zeros_like(W), np.zeros_like(b)
    P, Sc, logZ = _softmax_rows(X @ W + b)
    ar = np.arange(n)
    loss = float(np.mean(logZ - Sc[ar, y]))
    dS = P
    dS[ar, y] -= 1.0
    dS /= n
    return loss, X.T @ dS, dS.sum(axis=0)


def softmax_predict_dense(X, W, b):
    """(n, K) class probabilities for a dense X (n x d)."""
    X = np.asarray(X, dtype=np.float64)
    return _softmax_rows(X @ np.asarray(W, dtype=np.float64) + np.asarray(b, dtype=np.float64))[0]


# -- 3. collaborative filtering ---------------------------------------------------------------------

def cf_predict(P_rows, Q_rows, bu_rows, bi_rows, inv_u, inv_i, mu):
    """Predictions mu + bu + bi + P.Q for the minibatch, from pulled rows."""
    P_rows = np.asarray(P_rows, dtype=np.float64)
    Q_rows = np.asarray(Q_rows, dtype=np.float64)
    inv_u = np.asarray(inv_u, dtype=np.int64).reshape(-1)
    inv_i = np.asarray(inv_i, dtype=np.int64).reshape(-1)
    bu = np.asarray(bu_rows, dtype=np.float64).reshape(-1)
    bi = np.asarray(bi_rows, dtype=np.float64).reshape(-1)
    return float(mu) + bu[inv_u] + bi[inv_i] + np.einsum("nr,nr->n", P_rows[inv_u], Q_rows[inv_i])


def cf_loss_grad(users, items, ratings, P_rows, Q_rows, bu_rows, bi_rows, inv_u, inv_i, mu):
    """Mean squared-error/2 of a minibatch of ratings and its gradients for the pulled rows.

    ``users``/``items`` are the global ids (only their count is used; the mapping to pulled rows is
    ``inv_u``/``inv_i``). Returns ``(loss, gP_rows, gQ_rows, gbu_rows, gbi_rows)``.
    """
    r = np.asarray(ratings, dtype=np.float64).reshape(-1)
    n = r.shape[0]
    inv_u = np.asarray(inv_u, dtype=np.int64).reshape(-1)
    inv_i = np.asarray(inv_i, dtype=np.int64).reshape(-1)
    if np.asarray(users).reshape(-1).shape[0] != n or np.asarray(items).reshape(-1).shape[0] != n \
            or inv_u.shape[0] != n or inv_i.shape[0] != n:
        raise ValueError("users, items, ratings, inv_u and inv_i must have the same length")
    P_rows = np.asarray(P_rows, dtype=np.float64)
    Q_rows = np.asarray(Q_rows, dtype=np.float64)
    bu_rows = np.asarray(bu_rows, dtype=np.float64).reshape(-1)
    bi_rows = np.asarray(bi_rows, dtype=np.float64).reshape(-1)
    if n == 0:
        return (0.0, np.zeros_like(P_rows), np.zeros_like(Q_rows), np.zeros_like(bu_rows),
                np.zeros_like(bi_rows))
    Pu = P_rows[inv_u]
    Qi = Q_rows[inv_i]
    e = float(mu) + bu_rows[inv_u] + bi_rows[inv_i] + np.einsum("nr,nr->n", Pu, Qi) - r
    loss = float(np.mean(e * e) / 2.0)
    d = e / n
    gP = np.zeros_like(P_rows)
    gQ = np.zeros_like(Q_rows)
    np.add.at(gP, inv_u, d[:, None] * Qi)
    np.add.at(gQ, inv_i, d[:, None] * Pu)
    gbu = np.bincount(inv_u, weights=d, minlength=bu_rows.shape[0])
    gbi = np.bincount(inv_i, weights=d, minlength=bi_rows.shape[0])
    return loss, gP, gQ, gbu.astype(np.float64), gbi.astype(np.float64)


def cf_rmse(users, items, ratings, P, Q, bu, bi, mu):
    """Root mean squared error of the biased MF model (full tables indexed by global ids)."""
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    r = np.asarray(ratings, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return 0.0
    pred = cf_predict(P, Q, bu, bi, users, items, mu)
    return float(np.sqrt(np.mean((pred - r) ** 2)))


def _ridge_side(own, other, r_resid, n_own, F, b_other, l2):
    """Solve, for every id of one side, the ridge problem over [F (rank), bias] given the other
    side fixed. r_resid = r - mu. Returns (F_new, b_new)."""
    rank = F.shape[1]
    F_new = np.zeros((n_own, rank))
    b_new = np.zeros(n_own)
    order = np.argsort(own, kind="stable")
    counts = np.bincount(own, minlength=n_own)
    starts = np.concatenate(([0], np.cumsum(counts)))
    reg = l2 * np.eye(rank + 1)
    for a in range(n_own):
        if counts[a] == 0:
            continue
        sel = order[starts[a]:starts[a + 1]]
        o = other[sel]
        A = np.empty((sel.size, rank + 1))
        A[:, :rank] = F[o]
        A[:, rank] = 1.0
        t = r_resid[sel] - b_other[o]
        x = np.linalg.solve(A.T @ A + reg, A.T @ t)
        F_new[a] = x[:rank]
        b_new[a] = x[rank]
    return F_new, b_new


def als_reference(users, items, ratings, n_users, n_items, rank, l2, iters, seed):
    """Alternating least squares for the biased MF model (accuracy reference, not for speed).

    mu is the mean training rating (fixed); each half-step solves, for every user (resp. item), the
    exact ridge regression for [P_u, bu_u] (resp. [Q_i, bi_i]) with the other side fixed and
    penalty l2 on both the factors and the bias. Returns ``(P, Q, bu, bi, mu)``.
    """
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    r = np.asarray(ratings, dtype=np.float64).reshape(-1)
    rng = np.random.default_rng(seed)
    mu = float(r.mean()) if r.size else 0.0
    P = rng.normal(0.0, 0.1, (n_users, rank))
    Q = rng.normal(0.0, 0.1, (n_items, rank))
    bu = np.zeros(n_users)
    bi = np.zeros(n_items)
    resid = r - mu
    for _ in range(int(iters)):
        P, bu = _ridge_side(users, items, resid, n_users, Q, bi, l2)
        Q, bi = _ridge_side(items, users, resid, n_items, P, bu, l2)
    return P, Q, bu, bi, mu


# -- 4. LDA (collapsed Gibbs) -----------------------------------------------------------------------

def _doc_of_tokens(doc_ptr, n_tokens):
    doc_ptr = np.asarray(doc_ptr, dtype=np.int64)
    if doc_ptr.ndim != 1 or doc_ptr.size < 1 or doc_ptr[0] != 0 or doc_ptr[-1] != n_tokens \
            or np.any(np.diff(doc_ptr) < 0):
        raise ValueError("doc_ptr must be non-decreasing, start at 0 and end at the token count")
    return doc_ptr, np.repeat(np.arange(doc_ptr.size - 1), np.diff(doc_ptr))


def lda_init(doc_ptr, words, K, rng):
    """Random initial topics for a batch of documents.

    Returns ``(z, doc_topic, word_topic_delta_rows, topic_totals_delta)``: z (tokens,) uniform in
    0..K-1, doc_topic (n_docs x K) counts, and the deltas to push to the server: word-topic rows in
    the order of ``np.unique(words)`` (the same rows a sweep pulls with
    ``uniq, winv = np.unique(words, return_inverse=True)``) and the topic totals (K,).
    """
    words = np.asarray(words, dtype=np.int64).reshape(-1)
    doc_ptr, doc = _doc_of_tokens(doc_ptr, words.size)
    K = int(K)
    z = rng.integers(0, K, size=words.size)
    n_docs = doc_ptr.size - 1
    doc_topic = np.bincount(doc * K + z, minlength=n_docs * K).reshape(n_docs, K).astype(np.int64)
    _, winv = np.unique(words, return_inverse=True)
    n_rows = int(winv.max()) + 1 if words.size else 0
    wt = np.bincount(winv.reshape(-1) * K + z, minlength=n_rows * K).reshape(n_rows, K)
    return z.astype(np.int64), doc_topic, wt.astype(np.int64), np.bincount(z, minlength=K).astype(np.int64)


def lda_gibbs_sweep(doc_ptr, words, z, doc_topic, word_topic_rows, winv, topic_totals, alpha, beta,
                    vocab_size, rng):
    """One collapsed-Gibbs sweep over the tokens of a batch of documents.

    Tokens are visited in order with a Python loop (each draw depends on the counts left by the
    previous one, so the sweep is inherently sequential); the per-token work is a few K-vector numpy
    operations and the uniforms are drawn up front. The sampler works on local copies of the pulled
    counts. Because other workers push concurrently, pulled word-topic/topic-total counts may be
    stale and may not contain this token's own assignment; removing it is therefore clipped at zero
    so the counts used for sampling never go negative. The returned deltas are exact (-1 on the old
    topic, +1 on the new one for every reassigned token), independent of the clipping, so pushing
    them keeps the server consistent with the assignments.

    Returns ``(z_new, doc_topic_new, word_topic_delta_rows, topic_totals_delta)``; the deltas are
    int64 with the shapes of ``word_topic_rows`` and ``topic_totals``.
    """
    words = np.asarray(words, dtype=np.int64).reshape(-1)
    T = words.size
    doc_ptr, doc = _doc_of_tokens(doc_ptr, T)
    z_new = np.asarray(z, dtype=np.int64).reshape(-1).copy()
    winv = np.asarray(winv, dtype=np.int64).reshape(-1)
    if z_new.size != T or winv.size != T:
        raise ValueError("z and winv must have one entry per token")
    dt = np.array(doc_topic, dtype=np.float64, copy=True)
    wt = np.array(word_topic_rows, dtype=np.float64, copy=True)
    tt = np.array(topic_totals, dtype=np.float64, copy=True).reshape(-1)
    K = tt.shape[0]
    if dt.shape != (doc_ptr.size - 1, K) or wt.ndim != 2 or wt.shape[1] != K:
        raise ValueError("doc_topic must be (n_docs, K) and word_topic_rows (rows, K)")
    np.maximum(dt, 0.0, out=dt)
    np.maximum(wt, 0.0, out=wt)
    np.maximum(tt, 0.0, out=tt)
    d_wt = np.zeros(wt.shape, dtype=np.int64)
    d_tt = np.zeros(K, dtype=np.int64)
    alpha = float(alpha)
    beta = float(beta)
    vbeta = float(vocab_size) * beta
    u = rng.random(T)
    for t in range(T):
        d = doc[t]
        r = winv[t]
        k = z_new[t]
        dtd = dt[d]
        wtr = wt[r]
        if dtd[k] >= 1.0:
            dtd[k] -= 1.0
        else:
            dtd[k] = 0.0
        if wtr[k] >= 1.0:
            wtr[k] -= 1.0
        else:
            wtr[k] = 0.0
        if tt[k] >= 1.0:
            tt[k] -= 1.0
        else:
            tt[k] = 0.0
        c = np.cumsum((dtd + alpha) * (wtr + beta) / (tt + vbeta))
        kn = int(np.searchsorted(c, u[t] * c[-1], side="right"))
        if kn >= K:
            kn = K - 1
        dtd[kn] += 1.0
        wtr[kn] += 1.0
        tt[kn] += 1.0
        if kn != k:
            d_wt[r, k] -= 1
            d_wt[r, kn] += 1
            d_tt[k] -= 1
            d_tt[kn] += 1
            z_new[t] = kn
    doc_topic_new = np.rint(dt).astype(np.int64)
    return z_new, doc_topic_new, d_wt, d_tt


def lda_perplexity(doc_ptr, words, word_topic, topic_totals, alpha, beta, n_iter_fold_in, rng):
    """Held-out perplexity with the documents' topic mixtures folded in by Gibbs sampling.

    Estimator: the model's topics are fixed at their posterior-mean estimate
    ``phi[k, w] = (word_topic[w, k] + beta) / (topic_totals[k] + V * beta)`` (V = word_topic rows).
    For the held-out documents only their own token assignments are resampled for
    ``n_iter_fold_in`` sweeps with ``p(z = k) ∝ (doc_topic[d, k] + alpha) * phi[k, w]`` (model counts
    never change), starting from a random assignment. After each sweep of the second half of the
    run (at least the last one) the mixture ``theta[d] = (doc_topic[d] + alpha) / (N_d + K alpha)``
    is recorded, and the recorded mixtures are averaged. The result is
    ``exp(- sum over tokens of log sum_k theta[d, k] phi[k, w] / n_tokens)``. The mixture is fitted
    on the same tokens that are scored, so this is the usual (slightly optimistic) fold-in
    estimate; a uniform model scores exactly V.

    Documents are independent given fixed topics, so each fold-in sweep loops over token
    *positions* and samples position j of every document at once.
    """
    words = np.asarray(words, dtype=np.int64).reshape(-1)
    T = words.size
    doc_ptr, doc = _doc_of_tokens(doc_ptr, T)
    if T == 0:
        raise ValueError("no tokens to score")
    wt = np.asarray(word_topic, dtype=np.float64)
    tt = np.asarray(topic_totals, dtype=np.float64).reshape(-1)
    V, K = wt.shape
    alpha = float(alpha)
    beta = float(beta)
    phi_w = (np.maximum(wt, 0.0) + beta) / (np.maximum(tt, 0.0) + V * beta)  # (V, K), phi transposed
    n_docs = doc_ptr.size - 1
    lens = np.diff(doc_ptr)
    z = rng.integers(0, K, size=T)
    dt = np.bincount(doc * K + z, minlength=n_docs * K).reshape(n_docs, K).astype(np.float64)
    n_iter = max(int(n_iter_fold_in), 1)
    first_recorded = n_iter // 2
    theta_sum = np.zeros((n_docs, K))
    n_rec = 0
    maxlen = int(lens.max()) if n_docs else 0
    for it in range(n_iter):
        for j in range(maxlen):
            ds = np.flatnonzero(lens > j)
            tok = doc_ptr[ds] + j
            old = z[tok]
            dt[ds, old] -= 1.0
            p = (dt[ds] + alpha) * phi_w[words[tok]]
            c = np.cumsum(p, axis=1)
            uu = rng.random(ds.size) * c[:, -1]
            new = np.minimum((c <= uu[:, None]).sum(axis=1), K - 1)
            dt[ds, new] += 1.0
            z[tok] = new
        if it >= first_recorded:
            theta_sum += (dt + alpha) / (lens[:, None] + K * alpha)
            n_rec += 1
    theta = theta_sum / n_rec
    lik = np.einsum("tk,tk->t", theta[doc], phi_w[words])
    return float(np.exp(-np.mean(np.log(lik))))
