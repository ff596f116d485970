"""Reduce functions.

A ``reduce_f`` takes a list of values and returns one (thesis figure 4.2b uses
the builtin ``sum``). The built-ins :data:`SUM`, :data:`MIN`, :data:`MAX` and
:data:`PROD` combine numpy arrays in place into a buffer zipcomm owns (a received
one), never into the application's own array.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["FastOp", "SUM", "MIN", "MAX", "PROD", "resolve_reduce"]


class FastOp:
    def __init__(self, name: str, ufunc: np.ufunc, scalar: Callable[[Any, Any], Any]) -> None:
        self.name = name
        self._ufunc = ufunc
        self._scalar = scalar

    def __repr__(self) -> str:
        return f"zipcomm.{self.name}"

    @property
    def ufunc(self) -> np.ufunc:
        """The elementwise numpy function (for callers that slice the work)."""
        return self._ufunc

    def __call__(self, values: list) -> Any:
        return self.combine(list(values), reuse_first=False)

    def combine(self, values: list, *, reuse_first: bool) -> Any:
        if not values:
            raise ValueError(f"{self.name} of no values")
        first = values[0]
        if not isinstance(first, np.ndarray):
            acc = first
            for v in values[1:]:
                acc = self._scalar(acc, v)
            return acc
        if reuse_first and first.flags.writeable and first.flags.c_contiguous:
            acc = first
        else:
            acc = np.array(first, copy=True)
        for v in values[1:]:
            self._ufunc(acc, v, out=acc)
        return acc


SUM = FastOp("SUM", np.add, lambda a, b: a + b)
PROD = FastOp("PROD", np.multiply, lambda a, b: a * b)
MIN = FastOp("MIN", np.minimum, lambda a, b: min(a, b))
MAX = FastOp("MAX", np.maximum, lambda a, b: max(a, b))


def resolve_reduce(reduce_f: Any) -> Callable[[list], Any]:
    """Validate a reduce function: a FastOp, or any callable over a list of values."""
    if isinstance(reduce_f, FastOp):
        return reduce_f
    if not callable(reduce_f):
        raise TypeError(f"reduce_f must be callable over a list of values, got {type(reduce_f).__name__}")
    return reduce_f


_BY_NAME: dict[str, Callable[[list], Any]] = {
    "sum": sum, "min": min, "max": max,
    "zipcomm.SUM": SUM, "zipcomm.MIN": MIN, "zipcomm.MAX": MAX, "zipcomm.PROD": PROD,
}


def reduce_name(reduce_f: Any) -> str:
    """The wire name of a well-known reduce function ("" for any other callable), so
    that a member without a reduce_f (a handler-only receiver) can still combine."""
    for name, f in _BY_NAME.items():
        if f is reduce_f:
            return name
    return ""


def reduce_by_name(name: str) -> Callable[[list], Any] | None:
    return _BY_NAME.get(name)


def freeze(obj: Any) -> Any:
    """Make received arrays read-only: they may still be on their way to other members."""
    if isinstance(obj, np.ndarray):
        obj.flags.writeable = False
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            freeze(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            freeze(v)
    return obj
