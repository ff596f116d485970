"""Tests for cirrus.optim: per-coordinate sparse optimizers checked against a scalar reference."""

import math

import numpy as np
import pytest

from cirrus.optim import OPTIMIZERS, Optimizer, coalesce, make_optimizer

SHAPE = (50, 3)
HYPER = dict(lr=0.05, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8)
STATE_NAMES = {"sgd": set(), "momentum": {"velocity"}, "nesterov": {"velocity"},
               "adagrad": {"accum"}, "adam": {"m", "v", "t"}}


# ------------------------------------------------------------------------------------------
# independent scalar reference: one dict of state per coordinate, plain Python floats
# ------------------------------------------------------------------------------------------

class Reference:
    def __init__(self, name, table, lr, l2=0.0, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8,
                 grad_threshold=0.0):
        self.name = name
        self.w = [[float(x) for x in row] for row in table]
        self.lr, self.l2, self.mu = lr, l2, momentum
        self.b1, self.b2, self.eps, self.thr = beta1, beta2, eps, grad_threshold
        self.state = {}  # (r, c) -> dict

    def _st(self, r, c):
        return self.state.setdefault((r, c), {"velocity": 0.0, "accum": 0.0, "m": 0.0, "v": 0.0,
                                              "t": 0})

    def push(self, rows, grads):
        applied = 0
        for i, r in enumerate(rows):
            for c in range(len(self.w[r])):
                g = float(grads[i][c])
                if abs(g) < self.thr:
                    continue
                applied += 1
                w = self.w[r][c]
                gp = g + self.l2 * w
                s = self._st(r, c)
                if self.name == "sgd":
                    w = w - self.lr * gp
                elif self.name == "momentum":
                    s["velocity"] = self.mu * s["velocity"] + gp
                    w = w - self.lr * s["velocity"]
                elif self.name == "nesterov":
                    s["velocity"] = self.mu * s["velocity"] + gp
                    w = w - self.lr * (gp + self.mu * s["velocity"])
                elif self.name == "adagrad":
                    s["accum"] = s["accum"] + gp * gp
                    w = w - self.lr * gp / (math.sqrt(s["accum"]) + self.eps)
                elif self.name == "adam":
                    s["t"] += 1
                    s["m"] = self.b1 * s["m"] + (1 - self.b1) * gp
                    s["v"] = self.b2 * s["v"] + (1 - self.b2) * gp * gp
                    m_hat = s["m"] / (1 - self.b1 ** s["t"])
                    v_hat = s["v"] / (1 - self.b2 ** s["t"])
                    w = w - self.lr * m_hat / (math.sqrt(v_hat) + self.eps)
                else:
                    raise AssertionError(self.name)
                self.w[r][c] = w
        return applied

    def table(self):
        return np.array(self.w, dtype=np.float64)

    def state_array(self, key):
        out = np.zeros((len(self.w), len(self.w[0])))
        for (r, c), s in self.state.items():
            out[r, c] = s[key]
        return out


def make_pushes(seed, n_push=30, small_frac=0.0):
    """Random sparse pushes: unique rows per push, skewed so low rows are pushed far more often."""
    rng = np.random.default_rng(seed)
    p = 1.0 / (1.0 + np.arange(SHAPE[0])) ** 1.5
    p /= p.sum()
    pushes = []
    for _ in range(n_push):
        k = int(rng.integers(1, 12))
        rows = rng.choice(SHAPE[0], size=k, replace=False, p=p).astype(np.int64)
        grads = rng.normal(size=(k, SHAPE[1]))
        if small_frac:
            small = rng.random(size=grads.shape) < small_frac
            grads[small] *= 0.01
        pushes.append((rows, grads))
    return pushes


def initial_table(seed=123, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(dtype)


def run(name, pushes, dtype=np.float64, **hyper):
    table = initial_table(dtype=dtype)
    opt = make_optimizer(name, SHAPE, dtype, **{**HYPER, **hyper})
    counts = [opt.apply(table, rows, grads) for rows, grads in pushes]
    return opt, table, counts


def snapshot(opt, table):
    return table.copy(), opt.state_arrays()


def assert_unchanged(opt, table, snap):
    t0, s0 = snap
    np.testing.assert_array_equal(table, t0)
    s1 = opt.state_arrays()
    assert s1.keys() == s0.keys()
    for k in s0:
        np.testing.assert_array_equal(s1[k], s0[k])


# ------------------------------------------------------------------------------------------
# exact agreement with the reference
# ------------------------------------------------------------------------------------------

CASES = {
    "plain": dict(),
    "l2": dict(l2=0.1),
    "threshold": dict(l2=0.05, grad_threshold=0.1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_reference(name, case):
    hyper = CASES[case]
    pushes = make_pushes(seed=OPTIMIZERS.index(name) * 10 + len(case),
                         small_frac=0.3 if case == "threshold" else 0.0)
    ref = Reference(name, initial_table(), **{**HYPER, **hyper})
    ref_counts = [ref.push(rows, grads) for rows, grads in pushes]
    opt, table, counts = run(name, pushes, **hyper)

    assert counts == ref_counts
    if case == "threshold":
        assert sum(counts) < sum(r.size * SHAPE[1] for r, _ in pushes)  # something was filtered
    else:
        assert sum(counts) == sum(r.size * SHAPE[1] for r, _ in pushes)
    assert not np.allclose(table, initial_table())
    np.testing.assert_allclose(table, ref.table(), rtol=1e-9, atol=1e-12)
    states = opt.state_arrays()
    assert set(states) == STATE_NAMES[name]
    for key, arr in states.items():
        assert arr.shape == SHAPE
        np.testing.assert_allclose(arr, ref.state_array(key), rtol=1e-9, atol=1e-12)
    if name == "adam":
        assert states["t"].dtype == np.int64
        assert states["t"].max() > 5 * max(states["t"][states["t"] > 0].min(), 1)  # skewed pushes
    # rows never pushed keep their initial weights and zero state
    pushed = np.unique(np.concatenate([r for r, _ in pushes]))
    never = np.setdiff1d(np.arange(SHAPE[0]), pushed)
    assert never.size > 0
    np.testing.assert_array_equal(table[never], initial_table()[never])
    for arr in states.values():
        assert not arr[never].any()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_close_to_float64(name):
    pushes = make_pushes(seed=7)
    _, t64, c64 = run(name, pushes, dtype=np.float64, l2=0.01)
    opt32, t32, c32 = run(name, pushes, dtype=np.float32, l2=0.01)
    assert t32.dtype == np.float32
    assert c32 == c64
    np.testing.assert_allclose(t32, t64, rtol=1e-5, atol=1e-6)
    for arr in opt32.state_arrays().values():
        assert arr.shape == SHAPE


# ------------------------------------------------------------------------------------------
# individual semantics
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZERS)
def test_l2_zero_gradient_shrinks_weights(name):
    table = np.array([[1.0, -2.0, 0.5], [-0.7, 1.5, -1.0], [3.0, 3.0, 3.0]])
    start = table.copy()
    opt = make_optimizer(name, (3, 3), np.float64, lr=0.01, l2=0.5)
    rows = np.array([0, 1])
    prev = table.copy()
    for _ in range(3):
        assert opt.apply(table, rows, np.zeros((2, 3))) == 6
        assert (np.abs(table[:2]) < np.abs(prev[:2])).all(), "L2 must shrink |w|"
        assert (np.sign(table[:2]) == np.sign(start[:2])).all(), "small steps must not overshoot 0"
        prev = table.copy()
    np.testing.assert_array_equal(table[2], start[2])  # not pushed -> untouched

    # without L2 a zero gradient leaves the weights where they are
    plain = start.copy()
    opt0 = make_optimizer(name, (3, 3), np.float64, lr=0.01)
    opt0.apply(plain, rows, np.zeros((2, 3)))
    np.testing.assert_array_equal(plain, start)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_threshold_skips_small_gradients(name):
    table = initial_table()
    hyper = dict(lr=0.1, l2=0.2, grad_threshold=0.5)
    opt = make_optimizer(name, SHAPE, np.float64, **hyper)
    ref = Reference(name, table, **hyper)
    rows = np.array([3, 7, 11])
    seed = np.full((3, 3), 2.0)
    assert opt.apply(table, rows, seed) == ref.push(rows, seed) == 9  # non-zero state
    snap = snapshot(opt, table)

    small = np.array([[0.49, -0.3, 0.0], [1e-9, -0.499, 0.2], [0.1, 0.1, -0.1]])
    assert opt.apply(table, rows, small) == ref.push(rows, small) == 0
    assert_unchanged(opt, table, snap)  # weights and state untouched, L2 included

    mixed = small.copy()
    mixed[0, 1] = -0.5   # exactly the threshold: applied
    mixed[2, 2] = 3.0
    assert opt.apply(table, rows, mixed) == ref.push(rows, mixed) == 2
    changed = table != snap[0]
    expected = np.zeros(SHAPE, dtype=bool)
    expected[3, 1] = expected[11, 2] = True
    np.testing.assert_array_equal(changed, expected)
    np.testing.assert_allclose(table, ref.table(), rtol=1e-9, atol=1e-12)
    for key, arr in opt.state_arrays().items():
        np.testing.assert_allclose(arr, ref.state_array(key), rtol=1e-9, atol=1e-12)


def test_adam_step_count_is_per_coordinate():
    lr = 0.01
    table = np.ones((4, 1))
    opt = make_optimizer("adam", (4, 1), np.float64, lr=lr)
    ref = Reference("adam", table, lr=lr)
    for i in range(10):
        rows = np.array([0, 1]) if i == 9 else np.array([0])
        grads = np.full(rows.size, 0.3)  # 1-D grads accepted for a single column
        assert opt.apply(table, rows, grads) == ref.push(rows, grads[:, None]) == rows.size
    st = opt.state_arrays()
    np.testing.assert_array_equal(st["t"][:, 0], [10, 1, 0, 0])
    np.testing.assert_allclose(table, ref.table(), rtol=1e-9)
    np.testing.assert_allclose(st["m"], ref.state_array("m"), rtol=1e-9)
    np.testing.assert_allclose(st["v"], ref.state_array("v"), rtol=1e-9)
    # a coordinate's first step is bias-corrected with its own t=1: a full step of ~lr
    assert table[1, 0] == pytest.approx(1.0 - lr, rel=1e-9)
    # a global t=10 would have given a much smaller step for row 1
    b1, b2 = 0.9, 0.999
    global_step = lr * (0.1 * 0.3 / (1 - b1 ** 10)) / (math.sqrt(0.001 * 0.09 / (1 - b2 ** 10)))
    assert abs(global_step - lr) > 0.5 * lr
    np.testing.assert_array_equal(table[2:], 1.0)


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_momentum_is_per_coordinate(name):
    lr, mu = 0.1, 0.9
    table = np.zeros((5, 2))
    opt = make_optimizer(name, (5, 2), np.float64, lr=lr, momentum=mu)
    for _ in range(5):
        opt.apply(table, np.array([1]), np.array([[5.0, -5.0]]))
    row1 = table[1].copy()
    vel1 = opt.state_arrays()["velocity"][1].copy()
    assert np.abs(vel1).min() > 5.0  # row 1 has built up velocity

    g = np.array([[0.5, 0.25]])
    opt.apply(table, np.array([2]), g)
    first_step = lr * g[0] if name == "momentum" else lr * (g[0] + mu * g[0])
    np.testing.assert_allclose(table[2], -first_step, rtol=1e-12)  # no borrowed velocity
    np.testing.assert_array_equal(table[1], row1)  # row 1 neither moves nor decays
    np.testing.assert_array_equal(opt.state_arrays()["velocity"][1], vel1)
    np.testing.assert_allclose(opt.state_arrays()["velocity"][2], g[0], rtol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trip(name):
    pushes = make_pushes(seed=99, n_push=40)
    opt_a, table_a, _ = run(name, pushes[:20], l2=0.01)
    saved = opt_a.state_arrays()
    assert set(saved) == STATE_NAMES[name]
    for arr in saved.values():  # copies, not views
        arr[...] = 0 if arr.dtype.kind == "i" else 123.0
    saved = opt_a.state_arrays()

    opt_b = make_optimizer(name, SHAPE, np.float64, **HYPER, l2=0.01)
    opt_b.load_state(saved)
    for k, arr in opt_b.state_arrays().items():
        assert arr.dtype == saved[k].dtype
        np.testing.assert_array_equal(arr, saved[k])
    saved_copy = {k: v.copy() for k, v in saved.items()}
    for arr in saved.values():  # load_state copies too
        arr += 1
    table_b = table_a.copy()
    for rows, grads in pushes[20:]:
        assert opt_a.apply(table_a, rows, grads) == opt_b.apply(table_b, rows, grads)
    np.testing.assert_array_equal(table_a, table_b)
    sa, sb = opt_a.state_arrays(), opt_b.state_arrays()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
        if k != "t":
            assert not np.array_equal(sa[k], saved_copy[k])  # state did evolve


@pytest.mark.parametrize("name", ["momentum", "adagrad", "adam"])
def test_load_state_rejects_bad_state(name):
    opt, table, _ = run(name, make_pushes(seed=5, n_push=5))
    good = opt.state_arrays()
    snap = snapshot(opt, table)
    first = sorted(good)[0]
    bad_states = [
        {},
        {**good, "extra": np.zeros(SHAPE)},
        {**{k: v for k, v in good.items() if k != first}, "wrong": good[first]},
        {**good, first: np.zeros((50, 2))},
        {**good, first: np.full(SHAPE, np.nan)},
        {**good, first: np.zeros(SHAPE, dtype=object)},
    ]
    if name == "adam":
        bad_states.append({**good, "t": np.full(SHAPE, -1)})
        bad_states.append({**good, "t": np.full(SHAPE, 1.5)})
    for bad in bad_states:
        with pytest.raises(ValueError):
            opt.load_state(bad)
        assert_unchanged(opt, table, snap)
    with pytest.raises(ValueError):
        make_optimizer("sgd", SHAPE, lr=0.1).load_state({"velocity": np.zeros(SHAPE)})


# ------------------------------------------------------------------------------------------
# coalesce
# ------------------------------------------------------------------------------------------

def test_coalesce_sums_duplicates():
    rows = np.array([5, 2, 5, 9, 2, 5])
    grads = np.arange(18, dtype=np.float64).reshape(6, 3)
    u, s = coalesce(rows, grads)
    assert u.dtype == np.int64
    np.testing.assert_array_equal(u, [2, 5, 9])
    np.testing.assert_array_equal(s, [grads[1] + grads[4], grads[0] + grads[2] + grads[5],
                                      grads[3]])
    assert s.shape == (3, 3)

    u1, s1 = coalesce([3, 1, 3, 3], [1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(u1, [1, 3])
    np.testing.assert_array_equal(s1, [[2.0], [13.0]])

    rng = np.random.default_rng(0)
    r = rng.integers(0, 20, size=200)
    g = rng.normal(size=(200, 4)).astype(np.float32)
    u2, s2 = coalesce(r, g)
    assert s2.dtype == np.float32
    expected = {int(x): g[r == x].astype(np.float64).sum(axis=0) for x in np.unique(r)}
    np.testing.assert_array_equal(u2, sorted(expected))
    np.testing.assert_allclose(s2, np.array([expected[int(x)] for x in u2]), rtol=1e-6, atol=1e-6)

    ue, se = coalesce(np.array([], dtype=np.int64), np.zeros((0, 3)))
    assert ue.shape == (0,) and se.shape == (0, 3)

    with pytest.raises(ValueError):
        coalesce([1, 2], np.zeros((3, 2)))
    with pytest.raises(ValueError):
        coalesce([1.5, 2.0], np.zeros((2, 2)))

    # coalesced pushes are what apply() accepts
    table = np.zeros((10, 3))
    opt = make_optimizer("sgd", (10, 3), np.float64, lr=1.0)
    assert opt.apply(table, *coalesce([4, 4, 1], np.ones((3, 3)))) == 6
    np.testing.assert_array_equal(table[4], [-2.0] * 3)
    np.testing.assert_array_equal(table[1], [-1.0] * 3)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------

BAD_HYPER = [
    ("lr", 0.0), ("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")),
    ("l2", -1e-3), ("momentum", 1.0), ("momentum", -0.1), ("beta1", 1.0), ("beta1", -0.5),
    ("beta2", 1.0), ("beta2", 1.5), ("eps", 0.0), ("eps", -1e-8), ("grad_threshold", -0.1),
]


@pytest.mark.parametrize("key,value", BAD_HYPER)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_invalid_hyper_parameters(name, key, value):
    hyper = {**HYPER, key: value}
    with pytest.raises(ValueError, match=key):
        make_optimizer(name, SHAPE, **hyper)


def test_unknown_name_and_keyword():
    with pytest.raises(ValueError) as exc:
        make_optimizer("rmsprop", SHAPE, lr=0.1)
    for valid in OPTIMIZERS:
        assert valid in str(exc.value)
    with pytest.raises(TypeError, match="learning_rate"):
        make_optimizer("adam", SHAPE, learning_rate=0.1)
    with pytest.raises(TypeError, match="betas"):
        make_optimizer("sgd", SHAPE, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError):
        Optimizer(SHAPE, lr=0.1)  # abstract base


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_hyper_reports_values_in_use(name):
    opt = make_optimizer(name, SHAPE, np.float32, lr=0.2, l2=0.01, momentum=0.5, beta1=0.8,
                         beta2=0.99, eps=1e-6, grad_threshold=0.05)
    assert opt.name == name
    assert opt.hyper["lr"] == 0.2 and opt.hyper["l2"] == 0.01
    assert opt.hyper["grad_threshold"] == 0.05
    if name in ("momentum", "nesterov"):
        assert opt.hyper["momentum"] == 0.5
    if name == "adagrad":
        assert opt.hyper["eps"] == 1e-6
    if name == "adam":
        assert (opt.hyper["beta1"], opt.hyper["beta2"], opt.hyper["eps"]) == (0.8, 0.99, 1e-6)


def _bad_pushes():
    g = np.ones((3, 3))
    nan = g.copy()
    nan[2, 1] = np.nan
    inf = g.copy()
    inf[0, 0] = -np.inf
    return {
        "row_too_large": (np.array([0, 1, 50]), g),
        "row_negative": (np.array([0, -1, 2]), g),
        "duplicate_rows": (np.array([4, 9, 4]), g),
        "grads_too_few_rows": (np.array([0, 1, 2]), np.ones((2, 3))),
        "grads_wrong_cols": (np.array([0, 1, 2]), np.ones((3, 2))),
        "grads_1d_multi_col": (np.array([0, 1, 2]), np.ones(3)),
        "rows_2d": (np.array([[0, 1, 2]]), g),
        "rows_float": (np.array([0.0, 1.0, 2.0]), g),
        "grads_nan": (np.array([0, 1, 2]), nan),
        "grads_inf": (np.array([0, 1, 2]), inf),
    }


@pytest.mark.parametrize("case", sorted(_bad_pushes()))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_apply_rejects_bad_push_atomically(name, case):
    opt, table, _ = run(name, make_pushes(seed=3, n_push=5))
    snap = snapshot(opt, table)
    rows, grads = _bad_pushes()[case]
    with pytest.raises(ValueError):
        opt.apply(table, rows, grads)
    assert_unchanged(opt, table, snap)


def test_apply_rejects_mismatched_table():
    opt = make_optimizer("sgd", SHAPE, np.float32, lr=0.1)
    for table in (np.zeros((49, 3), np.float32), np.zeros(SHAPE, np.float64)):
        before = table.copy()
        with pytest.raises(ValueError):
            opt.apply(table, np.array([0]), np.ones((1, 3)))
        np.testing.assert_array_equal(table, before)
    table = np.zeros(SHAPE, np.float32)
    assert opt.apply(table, np.array([], dtype=np.int64), np.zeros((0, 3))) == 0
    assert not table.any()


def test_each_name_gives_different_updates():
    pushes = make_pushes(seed=11, n_push=10)
    tables = {}
    for name in OPTIMIZERS:
        opt, table, _ = run(name, pushes)
        assert opt.name == name and isinstance(opt, Optimizer)
        tables[name] = table
    for i, a in enumerate(OPTIMIZERS):
        for b in OPTIMIZERS[i + 1:]:
            assert not np.allclose(tables[a], tables[b]), (a, b)
