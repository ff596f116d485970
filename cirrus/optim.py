"""Per-coordinate optimizers for a sparse parameter server.

A parameter table is a 2-D array of shape ``(rows, cols)``.  Workers push sparse gradients: a set
of unique row indices together with one gradient row per index.  An :class:`Optimizer` applies such
a push to the table in place, keeping any optimizer state (velocities, accumulators, moments, step
counts) *per coordinate*, i.e. in arrays with the table's shape.

Exact update rules
------------------
For every pushed coordinate ``(r, c)`` let ``w = table[r, c]`` before the update and ``g`` the pushed
gradient for it.

* **Gradient filtering.**  If ``|g| < grad_threshold`` the coordinate is skipped entirely: neither
  ``w`` nor any of its state changes and it is not counted in the return value of
  :meth:`Optimizer.apply`.  ``grad_threshold = 0`` skips nothing (a zero gradient is applied, which
  matters when ``l2 > 0``).
* **L2 regularisation.**  The effective gradient is ``g' = g + l2 * w``, the gradient of
  ``loss + (l2 / 2) * w**2``; a zero gradient with ``l2 > 0`` therefore shrinks ``|w|``.
* ``sgd``:       ``w -= lr * g'``
* ``momentum``:  ``v = momentum * v + g'`` ;  ``w -= lr * v``
* ``nesterov``:  ``v = momentum * v + g'`` ;  ``w -= lr * (g' + momentum * v)`` (with the new ``v``)
* ``adagrad``:   ``G += g'**2`` ;  ``w -= lr * g' / (sqrt(G) + eps)``
* ``adam``:      ``t += 1`` ;  ``m = beta1 * m + (1 - beta1) * g'`` ;
  ``v = beta2 * v + (1 - beta2) * g'**2`` ;
  ``w -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)``

The updates are *lazy*: coordinates that are not pushed (or are filtered out) are left untouched and
their state does not decay.  In particular Adam's step count ``t`` is kept per coordinate, so each
coordinate gets bias corrections matching the number of times it was actually updated.

State and precision
-------------------
All arithmetic is done in float64 on the gathered pushed rows only (vectorised with numpy, no
per-row or per-coordinate Python loop); the new weights are cast back to the table's dtype when
stored.  Floating state (``velocity``, ``accum``, ``m``, ``v``) is kept in float64 regardless of the
table dtype; Adam's ``t`` is int64.  State names per optimizer:

==========  ======================
sgd         (none)
momentum    ``velocity``
nesterov    ``velocity``
adagrad     ``accum``
adam        ``m``, ``v``, ``t``
==========  ======================

:meth:`Optimizer.state_arrays` returns copies of these arrays (for checkpoints) and
:meth:`Optimizer.load_state` is its exact inverse.

Errors
------
Invalid hyper-parameters, unknown optimizer names, bad pushes (rows out of range, duplicate rows,
wrong gradient shape, non-finite gradients) and bad state raise :class:`ValueError`; an unknown
hyper-parameter keyword raises :class:`TypeError`.  A rejected push or state load leaves the table and
the optimizer state completely unchanged: everything is validated before anything is written.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

__all__ = ["OPTIMIZERS", "Optimizer", "SGD", "Momentum", "Nesterov", "Adagrad", "Adam",
           "coalesce", "make_optimizer"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam")

_HYPER_NAMES = ("lr", "l2", "momentum", "beta1", "beta2", "eps", "grad_threshold")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _as_rows(rows) -> np.ndarray:
    """Validate a 1-D integer index array and return it as int64."""
    arr = np.asarray(rows)
    if arr.ndim != 1:
        raise ValueError(f"rows must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"rows must have an integer dtype, got {arr.dtype}")
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("rows contain indices too large for int64")
    return arr.astype(np.int64, copy=False)


def _as_grads(grads, n: int, cols: int) -> np.ndarray:
    """Validate gradients for ``n`` rows of ``cols`` columns; return an (n, cols) array."""
    arr = np.asarray(grads)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating)
                                     or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"grads must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1 and cols == 1 and arr.shape[0] == n:
        arr = arr.reshape(n, 1)
    if arr.shape != (n, cols):
        raise ValueError(f"grads must have shape ({n}, {cols})"
                         + (f" or ({n},)" if cols == 1 else "") + f", got {arr.shape}")
    return arr


def coalesce(rows, grads) -> tuple[np.ndarray, np.ndarray]:
    """Sum the gradient rows of repeated row indices.

    ``rows`` is a 1-D integer array; ``grads`` has shape ``(len(rows), cols)`` or is 1-D of length
    ``len(rows)`` (meaning ``cols == 1``).  Returns ``(unique_rows, summed)`` where ``unique_rows`` is
    sorted int64 and ``summed`` has shape ``(len(unique_rows), cols)``; ``summed[i]`` is the sum of
    every gradient row whose index equals ``unique_rows[i]``.  Sums are accumulated in float64 and
    returned in the gradients' floating dtype (float64 for integer gradients).
    """
    r = _as_rows(rows)
    g = np.asarray(grads)
    if g.ndim == 1:
        g = g.reshape(-1, 1)
    if g.ndim != 2 or g.shape[0] != r.shape[0]:
        raise ValueError(f"grads must have shape ({r.shape[0]}, cols) or ({r.shape[0]},), "
                         f"got {np.asarray(grads).shape}")
    if g.dtype == np.bool_ or not (np.issubdtype(g.dtype, np.floating)
                                   or np.issubdtype(g.dtype, np.integer)):
        raise ValueError(f"grads must be numeric, got dtype {g.dtype}")
    out_dtype = g.dtype if np.issubdtype(g.dtype, np.floating) else np.dtype(np.float64)
    cols = g.shape[1]
    if r.size == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, cols), dtype=out_dtype)
    order = np.argsort(r, kind="stable")
    sorted_rows = r[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    summed = np.add.reduceat(g[order].astype(np.float64), starts, axis=0)
    return sorted_rows[starts].copy(), summed.astype(out_dtype, copy=False)


def _index(x) -> int:
    """``operator.index`` (accepts Python and numpy integers) that also rejects bools."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError("bool is not a valid size")
    return operator.index(x)


def _real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------

class Optimizer:
    """Base class: validation, filtering, L2 and the gather/scatter around a per-row update.

    Subclasses define ``name``, ``_state_spec`` (state name -> dtype), ``_used`` (the optimizer
    specific hyper-parameter names) and ``_update(w, g, state) -> (new_w, new_state)`` working on
    float64 copies of the pushed rows.
    """

    name: str = ""
    _state_spec: dict = {}
    _used: tuple = ()

    def __init__(self, shape: tuple[int, int], dtype=np.float32, *, lr: float, l2: float = 0.0,
                 momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, grad_threshold: float = 0.0):
        if type(self) is Optimizer:
            raise TypeError("Optimizer is abstract; use make_optimizer() or a subclass")
        try:
            shp = tuple(int(_index(s)) for s in shape)
        except TypeError:
            raise ValueError(f"shape must be a pair of non-negative ints, got {shape!r}") from None
        if len(shp) != 2 or shp[0] < 0 or shp[1] < 1:
            raise ValueError(f"shape must be (rows >= 0, cols >= 1), got {shape!r}")
        dt = np.dtype(dtype)
        if not np.issubdtype(dt, np.floating):
            raise ValueError(f"dtype must be a floating dtype, got {dt}")

        lr, l2 = _real("lr", lr), _real("l2", l2)
        momentum, beta1, beta2 = _real("momentum", momentum), _real("beta1", beta1), _real("beta2", beta2)
        eps, grad_threshold = _real("eps", eps), _real("grad_threshold", grad_threshold)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {lr}")
        if not (math.isfinite(l2) and l2 >= 0):
            raise ValueError(f"l2 must be finite and >= 0, got {l2}")
        for nm, val in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not (0.0 <= val < 1.0):
                raise ValueError(f"{nm} must be in [0, 1), got {val}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        if not (math.isfinite(grad_threshold) and grad_threshold >= 0):
            raise ValueError(f"grad_threshold must be finite and >= 0, got {grad_threshold}")

        self.shape = shp
        self.dtype = dt
        self.lr, self.l2, self.grad_threshold = lr, l2, grad_threshold
        self.momentum, self.beta1, self.beta2, self.eps = momentum, beta1, beta2, eps
        self.hyper = {"lr": lr, "l2": l2, "grad_threshold": grad_threshold}
        for nm in self._used:
            self.hyper[nm] = getattr(self, nm)
        self._state = {nm: np.zeros(shp, dtype=sdt) for nm, sdt in self._state_spec.items()}

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"<{type(self).__name__} {self.name} shape={self.shape} dtype={self.dtype} {hp}>"

    # -- push ---------------------------------------------------------------------------------
    def apply(self, table: np.ndarray, rows: np.ndarray, grads: np.ndarray) -> int:
        """Update ``table[rows]`` in place with the pushed ``grads``.

        ``table`` must have this optimizer's shape and dtype; ``rows`` are unique in-range integer
        indices; ``grads`` has shape ``(len(rows), cols)`` (1-D accepted when ``cols == 1``) and
        must be finite.  Returns the number of coordinates actually updated (those not filtered by
        ``grad_threshold``).  On any validation error nothing is modified.
        """
        if not isinstance(table, np.ndarray):
            raise ValueError("table must be a numpy array")
        if table.shape != self.shape:
            raise ValueError(f"table shape {table.shape} does not match optimizer shape {self.shape}")
        if table.dtype != self.dtype:
            raise ValueError(f"table dtype {table.dtype} does not match optimizer dtype {self.dtype}")
        if not table.flags.writeable:
            raise ValueError("table is read-only")
        r = _as_rows(rows)
        n_rows, cols = self.shape
        g = _as_grads(grads, r.shape[0], cols)
        if r.size == 0:
            return 0
        if r.min() < 0 or r.max() >= n_rows:
            bad = r[(r < 0) | (r >= n_rows)]
            raise ValueError(f"rows out of range [0, {n_rows}): {bad[:5].tolist()}")
        sr = np.sort(r)
        dup = sr[1:][sr[1:] == sr[:-1]]
        if dup.size:
            raise ValueError(f"duplicate rows in push (coalesce first): {np.unique(dup)[:5].tolist()}")
        g = g.astype(np.float64)
        if not np.isfinite(g).all():
            raise ValueError("grads contain non-finite values")

        # --- all checks passed; from here on nothing can fail half-way -----------------------
        w_old = table[r].astype(np.float64)
        mask = np.abs(g) >= self.grad_threshold
        count = int(np.count_nonzero(mask))
        if count == 0:
            return 0
        gp = g + self.l2 * w_old if self.l2 else g
        old_state = {nm: arr[r] for nm, arr in self._state.items()}
        new_w, new_state = self._update(w_old, gp, old_state)
        if count != mask.size:
            new_w = np.where(mask, new_w, w_old)
            new_state = {nm: np.where(mask, new_state[nm], old_state[nm]) for nm in new_state}
        table[r] = new_w.astype(self.dtype, copy=False)
        for nm, val in new_state.items():
            self._state[nm][r] = val
        return count

    def _update(self, w, g, state):  # pragma: no cover - overridden
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Copies of the named per-coordinate state arrays (empty for sgd)."""
        return {nm: arr.copy() for nm, arr in self._state.items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the state by ``arrays`` (as returned by :meth:`state_arrays`).

        Names must match exactly and each array must have the table's shape and finite values
        (``t`` must be non-negative integers).  Raises ValueError and changes nothing otherwise.
        """
        if not hasattr(arrays, "keys"):
            raise ValueError("state must be a mapping of name -> array")
        got, want = set(arrays.keys()), set(self._state_spec)
        if got != want:
            raise ValueError(f"{self.name} state names must be {sorted(want)}, got {sorted(got)}")
        new = {}
        for nm, sdt in self._state_spec.items():
            a = np.asarray(arrays[nm])
            if a.shape != self.shape:
                raise ValueError(f"state {nm!r} has shape {a.shape}, expected {self.shape}")
            if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.floating)
                                           or np.issubdtype(a.dtype, np.integer)):
                raise ValueError(f"state {nm!r} must be numeric, got dtype {a.dtype}")
            if not np.isfinite(a).all():
                raise ValueError(f"state {nm!r} contains non-finite values")
            if np.issubdtype(np.dtype(sdt), np.integer):
                if (a < 0).any() or (a != np.round(a)).any():
                    raise ValueError(f"state {nm!r} must hold non-negative integers")
            new[nm] = a.astype(sdt, copy=True)
        self._state = new


class SGD(Optimizer):
    """``w -= lr * g'``"""
    name = "sgd"

    def _update(self, w, g, state):
        return w - self.lr * g, {}


class Momentum(Optimizer):
    """``v = momentum * v + g'``; ``w -= lr * v`` (per-coordinate ``v``)."""
    name = "momentum"
    _state_spec = {"velocity": np.float64}
    _used = ("momentum",)

    def _update(self, w, g, state):
        v = self.momentum * state["velocity"] + g
        return w - self.lr * v, {"velocity": v}


class Nesterov(Optimizer):
    """``v = momentum * v + g'``; ``w -= lr * (g' + momentum * v)``."""
    name = "nesterov"
    _state_spec = {"velocity": np.float64}
    _used = ("momentum",)

    def _update(self, w, g, state):
        v = self.momentum * state["velocity"] + g
        return w - self.lr * (g + self.momentum * v), {"velocity": v}


class Adagrad(Optimizer):
    """``G += g'**2``; ``w -= lr * g' / (sqrt(G) + eps)``."""
    name = "adagrad"
    _state_spec = {"accum": np.float64}
    _used = ("eps",)

    def _update(self, w, g, state):
        acc = state["accum"] + g * g
        return w - self.lr * g / (np.sqrt(acc) + self.eps), {"accum": acc}


class Adam(Optimizer):
    """Adam with a per-coordinate step count ``t`` (see the module docstring)."""
    name = "adam"
    _state_spec = {"m": np.float64, "v": np.float64, "t": np.int64}
    _used = ("beta1", "beta2", "eps")

    def _update(self, w, g, state):
        b1, b2 = self.beta1, self.beta2
        t = state["t"] + 1
        m = b1 * state["m"] + (1.0 - b1) * g
        v = b2 * state["v"] + (1.0 - b2) * (g * g)
        tf = t.astype(np.float64)
        m_hat = m / (1.0 - np.power(b1, tf))
        v_hat = v / (1.0 - np.power(b2, tf))
        return w - self.lr * m_hat / (np.sqrt(v_hat) + self.eps), {"m": m, "v": v, "t": t}


_CLASSES = {cls.name: cls for cls in (SGD, Momentum, Nesterov, Adagrad, Adam)}


def make_optimizer(name: str, shape, dtype=np.float32, **hyper) -> Optimizer:
    """Build the optimizer called ``name`` (one of :data:`OPTIMIZERS`) for a table of ``shape``.

    ``hyper`` are the keyword hyper-parameters of :class:`Optimizer` (``lr`` is required); an
    unknown keyword raises TypeError naming it, an unknown name raises ValueError listing the valid
    names.
    """
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    unknown = sorted(set(hyper) - set(_HYPER_NAMES))
    if unknown:
        raise TypeError(f"unknown hyper-parameter(s) for {name!r}: {', '.join(unknown)}; "
                        f"valid: {', '.join(_HYPER_NAMES)}")
    if "lr" not in hyper:
        raise TypeError(f"make_optimizer({name!r}) requires the hyper-parameter 'lr'")
    return cls(shape, dtype, **hyper)
