"""cirrus.loaders (LIBSVM / CSV / Criteo parsers) and cirrus.generators."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cirrus import generators as gen
from cirrus.loaders import (DenseData, LoadError, SparseData, criteo_hash, iter_libsvm,
                            parse_criteo, parse_csv, parse_libsvm)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str | bytes, name: str = "f.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


# ----------------------------------------------------------------------------- LIBSVM

def test_libsvm_round_trip_criteo_like(tmp_path):
    data, _ = gen.criteo_like(3000, hash_bits=12, seed=3)
    p = tmp_path / "d.svm"
    gen.write_libsvm(data, p)
    back = parse_libsvm(p, n_features=data.n_features)
    assert back == data
    assert back.labels.dtype == np.float64 and back.values.dtype == np.float32
    assert back.indptr.dtype == np.int64 and back.indices.dtype == np.int32
    # default n_features = largest index + 1, everything else the same
    auto = parse_libsvm(p)
    assert auto.n_features == int(data.indices.max()) + 1
    assert np.array_equal(auto.indices, data.indices) and np.array_equal(auto.labels, data.labels)
    # file objects work too
    with open(p, "rb") as f:
        assert parse_libsvm(f, n_features=data.n_features) == data


def test_libsvm_round_trip_float_values_and_labels_exact(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    counts = rng.integers(0, 12, n)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(1000, c, replace=False)) for c in counts]).astype(np.int32)
    values = (rng.normal(size=indptr[-1]) * 10.0 ** rng.integers(-8, 8, indptr[-1])).astype(np.float32)
    labels = rng.normal(size=n) * 1e3
    labels[:4] = [1.0, -1.0, 0.0, 1e-300]
    data = SparseData(labels, indptr, indices, values, 1000)
    p = tmp_path / "v.svm"
    gen.write_libsvm(data, p)
    assert parse_libsvm(p, n_features=1000) == data
    gen.write_libsvm(data, p, zero_based=True)
    assert parse_libsvm(p, n_features=1000, zero_based=True) == data


def test_libsvm_large_multiblock_file_and_iter(tmp_path, monkeypatch):
    import cirrus.loaders as L
    monkeypatch.setattr(L, "BLOCK_BYTES", 4096)  # many blocks, lines cut at block borders
    data, _ = gen.criteo_like(1500, hash_bits=10, seed=1)
    p = tmp_path / "d.svm"
    gen.write_libsvm(data, p)
    assert parse_libsvm(p, n_features=data.n_features) == data
    chunks = list(iter_libsvm(p, 400, n_features=data.n_features))
    assert [c.n_rows for c in chunks] == [400, 400, 400, 300]
    assert np.array_equal(np.concatenate([c.labels for c in chunks]), data.labels)
    assert np.array_equal(np.concatenate([c.indices for c in chunks]), data.indices)
    assert np.array_equal(np.concatenate([c.values for c in chunks]), data.values)
    for c, a in zip(chunks, range(0, 1500, 400)):
        assert np.array_equal(c.indptr, data.indptr[a:a + c.n_rows + 1] - data.indptr[a])


def test_libsvm_labels_comments_qid_blank_lines(tmp_path):
    text = ("# a header comment\n"
            "+1 qid:3 1:2 3:4.5 # trailing comment\n"
            "\n"
            "   \n"
            "-1\t2:1e-3   7:-0.25\r\n"
            "0\n"
            "1 qid:1 2:1\n"
            "2.75 1:1\n"
            "-3.5e2 4:0\n")
    d = parse_libsvm(write(tmp_path, text))
    assert d.labels.tolist() == [1.0, -1.0, 0.0, 1.0, 2.75, -350.0]
    assert d.indptr.tolist() == [0, 2, 4, 4, 5, 6, 7]
    assert d.indices.tolist() == [0, 2, 1, 6, 1, 0, 3]          # one-based in the file
    assert d.values.tolist() == [2.0, 4.5, np.float32(1e-3), -0.25, 1.0, 1.0, 0.0]
    assert d.n_features == 7


def test_libsvm_zero_based(tmp_path):
    p = write(tmp_path, "1 0:1 3:2\n0 2:5\n")
    auto = parse_libsvm(p)
    assert auto.indices.tolist() == [0, 3, 2] and auto.n_features == 4
    assert parse_libsvm(p, zero_based=True) == auto
    with pytest.raises(LoadError) as ei:
        parse_libsvm(p, zero_based=False)
    assert ei.value.line == 1 and "index 0" in str(ei.value)
    with pytest.raises(ValueError):
        parse_libsvm(p, zero_based="yes")


def test_libsvm_n_features_too_small_names_line(tmp_path):
    p = write(tmp_path, "1 1:1\n1 2:1\n0 9:1\n")
    assert parse_libsvm(p, n_features=9).n_features == 9
    with pytest.raises(LoadError) as ei:
        parse_libsvm(p, n_features=5)
    assert ei.value.line == 3 and "out of range" in str(ei.value)


@pytest.mark.parametrize("bad", [
    "1 3:4:5 6",        # a word with two colons
    "3:4 1 2:5",        # label is a feature
    "1 3 4:5",          # index without value
    "1 3: 4",           # space after colon
    "1 :3",             # missing index
    "1 3:",             # missing value
    "x 1:2",            # bad label
    "1 a:2",            # bad index
    "1 2.5:1",          # non-integer index
    "1 -2:1",           # negative index
    "1 2:abc",          # bad value
    "1 2:1x",           # trailing garbage
    "1 1:2 3",          # dangling token
])
@pytest.mark.parametrize("sep", [" ", "\t"])   # canonical (fast path) and general path
def test_libsvm_malformed_line_number(tmp_path, bad, sep):
    good = "1 1:1 2:2\n-1 3:0.5\n\n# comment\n"
    p = write(tmp_path, good + "0 4:1\n" + bad.replace(" ", sep) + "\n" + good)
    with pytest.raises(LoadError) as ei:
        parse_libsvm(p)
    assert ei.value.line == 6, str(ei.value)
    assert str(p) in str(ei.value) and ":6:" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_load_error_is_a_cirrus_error():
    try:
        from cirrus.errors import CirrusError
    except ImportError:  # pragma: no cover
        pytest.skip("cirrus.errors not present")
    assert issubclass(LoadError, CirrusError)


def _reference_libsvm(text: str):
    """Obviously-correct line-by-line parser (one-based unless an index 0 appears)."""
    labels, rows = [], []
    for line in text.split("\n"):
        line = line.split("#", 1)[0]
        toks = [t for t in line.split() if not t.startswith("qid:")]
        if not toks:
            continue
        labels.append(float(toks[0]))
        rows.append([(int(t.split(":")[0]), float(t.split(":")[1])) for t in toks[1:]])
    return labels, rows


ws = st.sampled_from([" ", "  ", "\t", " \t"])
number = st.one_of(st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
                   st.sampled_from(["+1", "-1", "0", "1", "1e-5", "-0", "3.", ".5"]))


@st.composite
def libsvm_text(draw):
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.sampled_from(["", "   ", "# only a comment"])))
            continue
        parts = [draw(number)]
        if draw(st.booleans()) and kind == 1:
            parts.append(f"qid:{draw(st.integers(0, 9))}")
        for _ in range(draw(st.integers(0, 6))):
            parts.append(f"{draw(st.integers(1, 60))}:{draw(number)}")
        line = draw(ws).join(parts)
        if kind == 2:
            line += draw(ws) + "# c:1 2"
        if kind == 3:
            line = draw(ws) + line + draw(ws)
        lines.append(line)
    end = draw(st.sampled_from(["\n", "", "\r\n"]))
    return (end if end else "\n").join(lines) + end


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=libsvm_text())
def test_libsvm_matches_reference_parser(tmp_path, text):
    labels, rows = _reference_libsvm(text)
    d = parse_libsvm(io.BytesIO(text.encode()), zero_based=True)
    assert d.labels.tolist() == labels
    assert d.n_rows == len(rows)
    for i, row in enumerate(rows):
        idx, val = d.row(i)
        assert idx.tolist() == [j for j, _ in row]
        assert val.tolist() == [float(np.float32(v)) for _, v in row]


# ----------------------------------------------------------------------------- Criteo

def test_criteo_round_trip(tmp_path):
    data, w = gen.criteo_like(2000, hash_bits=14, seed=5)
    assert len(w) == data.n_features + 1 == 13 + 2**14 + 1
    p = tmp_path / "c.tsv"
    gen.write_criteo_tsv(2000, p, seed=5, hash_bits=14)
    assert parse_criteo(p, hash_bits=14) == data
    assert set(np.unique(data.labels)) == {0.0, 1.0}


def test_criteo_columns_and_empty_fields(tmp_path):
    num = ["5", "", "-1", "0"] + [""] * 9
    cat = ["68fd1e64", ""] + [""] * 23 + ["e5ba7672"]
    line1 = "\t".join(["1"] + num + cat)
    line2 = "\t".join(["0"] + [""] * 13 + [""] * 26)       # every column empty
    p = write(tmp_path, line1 + "\n" + line2 + "\n")
    d = parse_criteo(p, hash_bits=10)
    assert d.n_features == 13 + 1024
    assert d.labels.tolist() == [1.0, 0.0]
    assert d.indptr.tolist() == [0, 5, 5]
    assert d.indices.tolist() == [0, 2, 3, criteo_hash(0, b"68fd1e64", 10), criteo_hash(25, b"e5ba7672", 10)]
    assert d.values.tolist() == [5.0, -1.0, 0.0, 1.0, 1.0]
    assert all(13 <= j < 13 + 1024 for j in d.indices[3:])
    # the same token in another column lands elsewhere (column-salted hash), deterministically
    assert criteo_hash(0, b"68fd1e64", 20) != criteo_hash(1, b"68fd1e64", 20)
    assert criteo_hash(0, b"68fd1e64", 20) == criteo_hash(0, b"68fd1e64", 20)


def test_criteo_hash_stable_across_processes(tmp_path):
    p = tmp_path / "c.tsv"
    gen.write_criteo_tsv(300, p, seed=2, hash_bits=16)
    here = parse_criteo(p, hash_bits=16)
    code = (
        "import sys, json\n"
        "from cirrus.loaders import parse_criteo, criteo_hash\n"
        "d = parse_criteo(sys.argv[1], hash_bits=16)\n"
        "print(json.dumps([d.indices.tolist(), criteo_hash(3, b'abc', 20)]))\n")
    outs = []
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                           env=env, timeout=60, check=True)
        outs.append(json.loads(r.stdout))
    assert outs[0] == outs[1]
    assert outs[0][0] == here.indices.tolist()
    assert outs[0][1] == criteo_hash(3, b"abc", 20)
    # pinned value: FNV-1a 32 of bytes([3]) + b"abc", low 20 bits, + 13
    h = 2166136261
    for b in bytes([3]) + b"abc":
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    assert criteo_hash(3, b"abc", 20) == 13 + (h & 0xFFFFF)


@pytest.mark.parametrize("line,msg", [
    ("1\t2\t3", "expected 40"),
    ("\t".join(["1"] + ["x"] + [""] * 38), "numeric column 1"),
    ("\t".join(["y"] + [""] * 39), "bad label"),
])
def test_criteo_malformed_line_number(tmp_path, line, msg):
    ok = "\t".join(["0"] + ["1"] * 13 + ["aa"] * 26)
    p = write(tmp_path, ok + "\n" + ok + "\n" + line + "\n" + ok + "\n")
    with pytest.raises(LoadError) as ei:
        parse_criteo(p, hash_bits=8)
    assert ei.value.line == 3 and msg in str(ei.value)


# ----------------------------------------------------------------------------- CSV

def test_csv_round_trip_with_header(tmp_path):
    data, _, _ = gen.multiclass(300, 6, 4, seed=2)
    p = tmp_path / "m.csv"
    gen.write_csv(data, p)
    back = parse_csv(p)
    assert isinstance(back, DenseData)
    assert back.columns == [f"f{j}" for j in range(6)]
    assert np.array_equal(back.labels, data.labels) and np.array_equal(back.X, data.X)
    gen.write_csv(data, p, header=False, delimiter=";")
    back = parse_csv(p, delimiter=";")
    assert back.columns is None and np.array_equal(back.X, data.X)


def test_csv_options(tmp_path):
    p = write(tmp_path, "1,2,3\n\n4,,6\r\n7,8,9")
    d = parse_csv(p, label_column=-1)
    assert d.labels.tolist() == [3.0, 6.0, 9.0]
    assert d.X[0].tolist() == [1.0, 2.0] and np.isnan(d.X[1, 1])
    d = parse_csv(p, header=True, label_column=None)
    assert d.columns == ["1", "2", "3"] and d.X.shape == (2, 3)
    with pytest.raises(LoadError):
        parse_csv(p, label_column=3)


@pytest.mark.parametrize("bad,msg", [("1,2", "ragged"), ("1,2,3,4", "ragged"), ("1,zz,3", "field 2")])
def test_csv_malformed_line_number(tmp_path, bad, msg):
    p = write(tmp_path, "y,a,b\n1,2,3\n4,5,6\n" + bad + "\n7,8,9\n")
    with pytest.raises(LoadError) as ei:
        parse_csv(p)
    assert ei.value.line == 4 and msg in str(ei.value)


# ----------------------------------------------------------------------------- generators

def test_generators_deterministic_and_shaped():
    a, wa = gen.criteo_like(500, hash_bits=12, seed=7)
    b, wb = gen.criteo_like(500, hash_bits=12, seed=7)
    c, _ = gen.criteo_like(500, hash_bits=12, seed=8)
    assert a == b and np.array_equal(wa, wb) and not a == c
    assert 0.05 < a.labels.mean() < 0.6

    m, W, bias = gen.multiclass(400, 5, 3, seed=1)
    assert m.X.shape == (400, 5) and W.shape == (5, 3) and bias.shape == (3,)
    assert set(np.unique(m.labels)) == {0.0, 1.0, 2.0}
    assert np.array_equal(gen.multiclass(400, 5, 3, seed=1)[0].X, m.X)

    r = gen.ratings(60, 50, 3, 0.2, 0.01, seed=0)
    assert 0.1 < len(r.ratings) / 3000 < 0.3
    assert r.users.max() < 60 and r.items.max() < 50
    pred = (r.user_factors[r.users] * r.item_factors[r.items]).sum(1)
    assert np.abs(pred - r.ratings).max() < 0.1
    pairs = r.users.astype(np.int64) * 50 + r.items
    assert len(np.unique(pairs)) == len(pairs)

    docs, tw, dt = gen.topic_corpus(30, 200, 5, 40, seed=0)
    assert docs.n_rows == 30 and docs.n_features == 200 and tw.shape == (5, 200) and dt.shape == (30, 5)
    assert np.array_equal(np.add.reduceat(docs.values, docs.indptr[:-1]), np.full(30, 40.0))
    assert docs == gen.topic_corpus(30, 200, 5, 40, seed=0)[0]


def test_topic_corpus_round_trips_through_libsvm(tmp_path):
    docs, _, _ = gen.topic_corpus(20, 100, 4, 25, seed=3)
    p = tmp_path / "t.svm"
    gen.write_libsvm(docs, p)
    assert parse_libsvm(p, n_features=100) == docs


# ----------------------------------------------------------------------------- bench

def test_bench_load_runs(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--size", "300KB",
                        "--format", "criteo", "--base-rows", "500", "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text())
    assert summary["format"] == "criteo" and summary["rows"] > 0 and summary["MB_per_s"] > 0
    h = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "--size" in h.stdout and "--keep" in h.stdout


def test_empty_inputs():
    assert parse_libsvm(io.BytesIO(b"")).n_rows == 0
    assert parse_libsvm(io.BytesIO(b"\n# nothing\n\n")).n_rows == 0
    assert list(iter_libsvm(io.BytesIO(b""), 3)) == []
    assert parse_criteo(io.BytesIO(b""), hash_bits=4).n_rows == 0
    assert parse_csv(io.BytesIO(b"")).n_rows == 0
    d = parse_csv(io.BytesIO(b"y,a,b\n"))
    assert d.n_rows == 0 and d.columns == ["a", "b"]


def test_workers_same_result_and_error_lines(tmp_path, monkeypatch):
    import cirrus.loaders as L
    monkeypatch.setattr(L, "BLOCK_BYTES", 4096)  # parent splits a small file into 8 ranges
    data, _ = gen.criteo_like(800, hash_bits=10, seed=4)
    p = tmp_path / "d.svm"
    gen.write_libsvm(data, p)
    assert parse_libsvm(p, n_features=data.n_features, workers=2) == data
    lines = p.read_text().splitlines()
    lines[700] = "1 2:3:4"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(LoadError) as ei:
        parse_libsvm(p, workers=2)
    assert ei.value.line == 701
    c = tmp_path / "c.tsv"
    gen.write_criteo_tsv(800, c, seed=4, hash_bits=10)
    assert parse_criteo(c, hash_bits=10, workers=2) == parse_criteo(c, hash_bits=10)
    with pytest.raises(ValueError):
        parse_libsvm(p, workers=0)


digits = st.text("0123456789", min_size=0, max_size=9)
decimal = st.tuples(st.sampled_from(["", "-", "+"]), digits, st.sampled_from(["", "."]), digits,
                    st.sampled_from(["", "e5", "E-3", "e+12"])).filter(
    lambda t: (t[1] + t[3]) != "" and (t[2] == "." or t[3] == "")).map("".join)
token = st.one_of(st.text("0123456789", min_size=1, max_size=12), decimal,
                  st.floats(width=32).map(repr))


@settings(max_examples=120, deadline=None)
@given(toks=st.lists(token, min_size=1, max_size=20), seps=st.sampled_from([" ", "\n", "  "]))
def test_vectorized_numbers_equal_float(toks, seps):
    from cirrus.loaders import _decimals
    text = (seps.join(toks)).encode()
    starts, ends, pos = [], [], 0
    for t in toks:
        starts.append(pos)
        ends.append(pos + len(t))
        pos += len(t) + len(seps)
    got = _decimals(np.frombuffer(text, np.uint8), text, np.array(starts), np.array(ends))
    want = np.array([float(t) for t in toks])
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("text", [b"# only a comment", b"   ", b"\n\n", b"1 1:2\n# tail comment", b"qid:1"])
def test_libsvm_degenerate_blocks(text):
    d = parse_libsvm(io.BytesIO(text), zero_based=True)
    assert d.n_rows == (1 if text.startswith(b"1 ") else 0)


def test_criteo_hash_of_mixed_length_tokens(tmp_path):
    rng = np.random.default_rng(1)
    rows, expect = [], []
    for _ in range(50):
        toks = ["".join(rng.choice(list("0123456789abcdef"), rng.integers(0, 13))) for _ in range(26)]
        rows.append("\t".join(["1"] + [""] * 13 + toks))
        expect.append([criteo_hash(c, t.encode(), 18) for c, t in enumerate(toks) if t])
    d = parse_criteo(write(tmp_path, "\n".join(rows)), hash_bits=18)   # no final newline
    assert [d.row(i)[0].tolist() for i in range(50)] == expect
