"""The shuffle's partition (zipcomm/partition.py): the C counting partition and the numpy path
give exactly what a stable sort by bucket gives, for every dtype, row shape and bucket type."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zipcomm import partition as P

IMPLS = ["c", "numpy"]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    if request.param == "c":
        assert P._scatter_c is not None, "zipcomm._scatter_c is not built (pip install -e . builds it)"
    monkeypatch.setattr(P, "IMPLEMENTATION", request.param)
    return request.param


def reference(data: np.ndarray, idx: np.ndarray, n: int) -> list[np.ndarray]:
    return [data[np.flatnonzero(idx == k)] for k in range(n)]


def test_c_is_the_default_when_built() -> None:
    assert P.IMPLEMENTATION == "c"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_equals_a_stable_partition(impl, data) -> None:  # (the fixture holds for every example)
    n = data.draw(st.integers(1, 300))
    rows = data.draw(st.integers(0, 400))
    dtype = data.draw(st.sampled_from([np.int64, np.float32, np.uint8, np.int16, np.complex128]))
    shape = (rows,) + data.draw(st.sampled_from([(), (3,), (2, 5), (100,)]))
    arr = data.draw(hnp.arrays(dtype, shape, elements=st.integers(0, 100)))
    bucket_dtype = data.draw(st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                              np.int64, np.uint64]))
    if np.iinfo(bucket_dtype).max < n - 1:
        bucket_dtype = np.int64
    idx = data.draw(hnp.arrays(bucket_dtype, (rows,), elements=st.integers(0, n - 1)))
    parts = P.partition(arr, lambda a, k: idx, n)
    want = reference(arr, idx, n)
    assert len(parts) == n
    for got, exp in zip(parts, want):
        assert got.dtype == arr.dtype and got.shape == exp.shape
        assert np.array_equal(got, exp)
    if rows:
        assert not any(np.shares_memory(p, arr) for p in parts)  # never the caller's buffer


def test_non_contiguous_input(impl) -> None:
    base = np.arange(40, dtype=np.int64).reshape(20, 2)
    col = base[:, 1]  # strided view
    parts = P.partition(col, lambda a, n: a % n, 3)
    assert [p.tolist() for p in parts] == [[int(x) for x in col if x % 3 == k] for k in range(3)]


@pytest.mark.parametrize("bad", [-1, 4, 2**40])
def test_an_index_outside_the_range_is_a_value_error(impl, bad) -> None:
    arr = np.arange(10, dtype=np.int64)
    idx = np.zeros(10, dtype=np.int64)
    idx[7] = bad
    with pytest.raises(ValueError, match=rf"returned {bad}, an index outside \[0, 4\)"):
        P.partition(arr, lambda a, n: idx, 4)


def test_bad_hash_results_are_type_errors(impl) -> None:
    arr = np.arange(10, dtype=np.int64)
    with pytest.raises(TypeError, match="integer array with one index per row"):
        P.partition(arr, lambda a, n: (a % n).astype(np.float64), 4)
    with pytest.raises(TypeError, match="integer array with one index per row"):
        P.partition(arr, lambda a, n: (a % n)[:5], 4)
    with pytest.raises(TypeError, match="0-d array"):
        P.partition(np.array(3), lambda a, n: a, 2)


def test_lists_go_item_by_item() -> None:
    assert P.partition(["a", "bb", "ccc", "d"], lambda s, n: len(s) % n, 2) == [["bb"], ["a", "ccc", "d"]]
    with pytest.raises(ValueError, match="outside"):
        P.partition([1, 2], lambda s, n: 5, 2)


def test_the_environment_variable_selects_the_implementation() -> None:
    code = "from zipcomm import partition as P; print(P.IMPLEMENTATION)"
    for choice in ("numpy", "c"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, "ZIPCOMM_SCATTER": choice}, timeout=60)
        assert out.stdout.strip() == choice, out.stderr
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "ZIPCOMM_SCATTER": "fortran"}, timeout=60)
    assert bad.returncode != 0 and "must be 'c' or 'numpy'" in bad.stderr
