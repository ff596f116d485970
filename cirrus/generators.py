"""Deterministic (seeded) synthetic datasets for tests and benchmarks, and text writers.

Every generator takes ``seed`` and returns the same arrays for the same arguments on any
machine (numpy ``default_rng`` / PCG64). The ground truth (true weights, factors, topics) is
returned too, so a trainer can be checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cirrus.loaders import (CRITEO_CATEGORICAL, CRITEO_NUMERIC, _CAT_BASIS, _FNV_PRIME, DenseData,
                            SparseData)

__all__ = [
    "criteo_like", "multiclass", "ratings", "topic_corpus", "Ratings",
    "write_libsvm", "write_criteo_tsv", "write_csv", "criteo_raw",
]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ----------------------------------------------------------------------------- Criteo-like

@dataclass
class CriteoRaw:
    """Raw Criteo columns: ``numeric`` int64 (n, 13) with ``numeric_present``; ``categorical``
    uint32 category ids (n, 26) with ``categorical_present`` (written as 8-digit hex)."""

    numeric: np.ndarray
    numeric_present: np.ndarray
    categorical: np.ndarray
    categorical_present: np.ndarray


def criteo_raw(n_rows: int, seed: int = 0) -> CriteoRaw:
    rng = np.random.default_rng([seed, 1])
    numeric = np.floor(rng.lognormal(1.0, 1.5, (n_rows, CRITEO_NUMERIC))).astype(np.int64)
    numeric[:, 1] -= 1  # like Criteo's I2, which has -1s
    numeric_present = rng.random((n_rows, CRITEO_NUMERIC)) >= 0.2
    # Zipf-like categories: column c has its own vocabulary of ids
    vocab = np.array([10, 500, 50_000, 2000, 50, 10, 5000, 300, 3, 20_000, 4000, 30_000, 3000, 25,
                      6000, 40_000, 10, 3000, 2000, 4, 40_000, 15, 15, 20_000, 70, 10_000])
    ranks = np.minimum(rng.zipf(1.3, (n_rows, CRITEO_CATEGORICAL)) - 1, vocab - 1)
    salt = rng.integers(0, 2**32, CRITEO_CATEGORICAL, dtype=np.uint64)
    mixed = ranks.astype(np.uint64) * np.uint64(2654435761) + salt
    categorical = (mixed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    categorical_present = rng.random((n_rows, CRITEO_CATEGORICAL)) >= 0.1
    return CriteoRaw(numeric, numeric_present, categorical, categorical_present)


def _hex8(ids: np.ndarray) -> np.ndarray:
    """uint32 ids -> 8-byte lower-case hex (S8 array)."""
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    nib = (ids[..., None] >> shifts) & np.uint32(15)
    return np.ascontiguousarray(digits[nib]).view("S8")[..., 0]


def _hash_hex(tokens: np.ndarray, hash_bits: int) -> np.ndarray:
    """Same FNV-1a as :func:`cirrus.loaders.criteo_hash` for (n, 26) S8 tokens; returns feature ids."""
    b = tokens.view(np.uint8).reshape(*tokens.shape, 8)
    h = np.broadcast_to(_CAT_BASIS, tokens.shape).copy()
    for j in range(8):
        h = (h ^ b[..., j]) * np.uint32(_FNV_PRIME)
    return (h & np.uint32((1 << hash_bits) - 1)).astype(np.int64) + CRITEO_NUMERIC


def criteo_like(n_rows: int, *, hash_bits: int = 20, seed: int = 0):
    """Click data with a known logistic model, in the feature space of :func:`parse_criteo`.

    Returns ``(SparseData, true_weights)``; ``true_weights`` has ``n_features + 1`` entries, the
    last one the bias: ``P(click) = sigmoid(x . w[:-1] + w[-1])``. Labels are 0/1.
    ``write_criteo_tsv(n_rows, path, seed=seed, hash_bits=hash_bits)`` writes the same rows as
    text, so ``parse_criteo(path, hash_bits=hash_bits) == criteo_like(...)[0]``.
    """
    raw = criteo_raw(n_rows, seed)
    nf = CRITEO_NUMERIC + (1 << hash_bits)
    rng = np.random.default_rng([seed, 2])
    w = np.zeros(nf + 1)
    w[:CRITEO_NUMERIC] = rng.normal(0, 0.01, CRITEO_NUMERIC)
    w[CRITEO_NUMERIC:nf] = rng.normal(0, 0.5, nf - CRITEO_NUMERIC)
    w[-1] = -2.0
    feat = np.empty((n_rows, CRITEO_NUMERIC + CRITEO_CATEGORICAL), np.int64)
    feat[:, :CRITEO_NUMERIC] = np.arange(CRITEO_NUMERIC)
    feat[:, CRITEO_NUMERIC:] = _hash_hex(_hex8(raw.categorical), hash_bits)
    vals = np.ones(feat.shape, np.float32)
    vals[:, :CRITEO_NUMERIC] = raw.numeric
    present = np.concatenate([raw.numeric_present, raw.categorical_present], axis=1)
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(present.sum(1), out=indptr[1:])
    margin = (np.where(present, vals * w[feat], 0.0)).sum(1) + w[-1]
    labels = (rng.random(n_rows) < _sigmoid(margin)).astype(np.float64)
    idx_dtype = np.int32 if nf <= np.iinfo(np.int32).max else np.int64
    data = SparseData(labels, indptr, feat[present].astype(idx_dtype), vals[present], nf)
    return data, w


def write_criteo_tsv(n_rows: int, path, seed: int = 0, *, hash_bits: int = 20) -> None:
    """Write ``criteo_like(n_rows, hash_bits=hash_bits, seed=seed)`` as Criteo TSV text."""
    data, _ = criteo_like(n_rows, hash_bits=hash_bits, seed=seed)
    raw = criteo_raw(n_rows, seed)
    hexes = _hex8(raw.categorical)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for i in range(n_rows):
            num = ["%d" % v if p else "" for v, p in zip(raw.numeric[i].tolist(),
                                                          raw.numeric_present[i].tolist())]
            cat = [h.decode() if p else "" for h, p in zip(hexes[i].tolist(),
                                                          raw.categorical_present[i].tolist())]
            f.write("%d\t%s\t%s\n" % (data.labels[i], "\t".join(num), "\t".join(cat)))


# ----------------------------------------------------------------------------- other generators

def multiclass(n_rows: int, n_features: int, n_classes: int, seed: int = 0):
    """Gaussian features, labels from a softmax model. Returns ``(DenseData, W, b)``.

    ``W`` is (n_features, n_classes); labels are class ids 0..n_classes-1 (float64) sampled
    from ``softmax(X @ W + b)``.
    """
    rng = np.random.default_rng([seed, 3])
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    W = rng.normal(0, 2.0 / np.sqrt(max(n_features, 1)), (n_features, n_classes))
    b = rng.normal(0, 0.5, n_classes)
    logits = X.astype(np.float64) @ W + b
    gumbel = -np.log(-np.log(rng.random(logits.shape)))
    labels = np.argmax(logits + gumbel, axis=1).astype(np.float64)
    return DenseData(labels, X), W, b


@dataclass
class Ratings:
    """(user, item, rating) triples of a noisy low-rank matrix, plus the true factors."""

    users: np.ndarray       # int32
    items: np.ndarray       # int32
    ratings: np.ndarray     # float32
    user_factors: np.ndarray
    item_factors: np.ndarray
    n_users: int
    n_items: int


def ratings(n_users: int, n_items: int, rank: int, density: float, noise: float,
            seed: int = 0) -> Ratings:
    """Observe each (user, item) with probability ``density``: rating = u . v + N(0, noise²)."""
    if not 0 < density <= 1:
        raise ValueError("density must be in (0, 1]")
    rng = np.random.default_rng([seed, 4])
    U = rng.normal(0, 1 / np.sqrt(rank), (n_users, rank))
    V = rng.normal(0, 1, (n_items, rank))
    n_obs = rng.binomial(n_users * n_items, density)
    flat = np.sort(rng.choice(n_users * n_items, n_obs, replace=False))
    u, it = np.divmod(flat, n_items)
    r = (U[u] * V[it]).sum(1) + rng.normal(0, noise, n_obs)
    return Ratings(u.astype(np.int32), it.astype(np.int32), r.astype(np.float32), U, V,
                   n_users, n_items)


def topic_corpus(n_docs: int, vocab: int, n_topics: int, doc_len: int, seed: int = 0):
    """LDA generative model: bag-of-words counts as CSR (labels = 0).

    Returns ``(SparseData, topic_word (n_topics, vocab), doc_topic (n_docs, n_topics))``; each
    document has exactly ``doc_len`` tokens; a row's indices are sorted, values are counts.
    """
    rng = np.random.default_rng([seed, 5])
    topic_word = rng.dirichlet(np.full(vocab, 0.05), n_topics)
    doc_topic = rng.dirichlet(np.full(n_topics, 0.3), n_docs)
    cw = np.cumsum(topic_word, axis=1)
    cw[:, -1] = 1.0
    indptr = [0]
    indices, values = [], []
    for d in range(n_docs):
        z = rng.choice(n_topics, doc_len, p=doc_topic[d])
        words = np.minimum(np.array([np.searchsorted(cw[t], x) for t, x in
                                     zip(z, rng.random(doc_len))], np.int64), vocab - 1)
        uw, cnt = np.unique(words, return_counts=True)
        indices.append(uw)
        values.append(cnt)
        indptr.append(indptr[-1] + len(uw))
    data = SparseData(np.zeros(n_docs), np.array(indptr, np.int64),
                      np.concatenate(indices).astype(np.int32) if indices else np.zeros(0, np.int32),
                      np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32),
                      vocab)
    return data, topic_word, doc_topic


# ----------------------------------------------------------------------------- writers

def write_libsvm(data: SparseData, path, *, zero_based: bool = False) -> None:
    """Write ``data`` as LIBSVM text (one-based indices by default).

    Labels use ``%.17g`` and values ``%.9g``: parsing the file back gives the same float64
    labels and float32 values bit for bit.
    """
    off = 0 if zero_based else 1
    ip = data.indptr
    labels = data.labels.tolist()
    idx = (data.indices.astype(np.int64) + off).tolist()
    vals = data.values.astype(np.float64).tolist()
    with open(path, "w", encoding="ascii", newline="\n") as f:
        buf = []
        for i in range(data.n_rows):
            a, b = int(ip[i]), int(ip[i + 1])
            parts = ["%.17g" % labels[i]]
            parts.extend("%d:%.9g" % (j, v) for j, v in zip(idx[a:b], vals[a:b]))
            buf.append(" ".join(parts))
            if len(buf) >= 4096:
                f.write("\n".join(buf) + "\n")
                buf = []
        if buf:
            f.write("\n".join(buf) + "\n")


def write_csv(data: DenseData, path, *, header: bool = True, delimiter: str = ",") -> None:
    """Write labels (first column) and ``X`` as CSV (``%.17g`` labels, ``%.9g`` features)."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        if header:
            f.write(delimiter.join(["label"] + [f"f{j}" for j in range(data.n_features)]) + "\n")
        for y, row in zip(data.labels.tolist(), np.asarray(data.X, np.float64).tolist()):
            f.write(delimiter.join(["%.17g" % y] + ["%.9g" % v for v in row]) + "\n")

