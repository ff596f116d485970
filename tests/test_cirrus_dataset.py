"""cirrus.dataset: the partition format (round trip, corruption), datasets (manifest last, crash safety)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from cirrus.dataset import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MANIFEST_KEY,
    Partition,
    decode_partition,
    encode_partition,
    open_dataset,
    write_arrays,
    write_arrays_sync,
    write_dataset,
)
from cirrus.errors import (
    CirrusError,
    DatasetError,
    IncompleteDataset,
    PartitionCorrupt,
    PartitionError,
    PartitionVersionError,
)
from cirrus.storage import open_store
from test_cirrus_storage import moto_server, store_uri  # noqa: F401  (shared fixtures)

pytestmark = [pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[1]


def make_sparse(n_rows=500, n_features=10_000, seed=0, max_nnz=30):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_nnz, n_rows)
    counts[::7] = 0  # some empty rows
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = rng.integers(0, n_features, int(indptr[-1])).astype(np.int32)
    values = rng.standard_normal(int(indptr[-1])).astype(np.float32)
    labels = rng.integers(0, 2, n_rows).astype(np.float32)
    return labels, indptr, indices, values, n_features


def make_dense(n_rows=400, n_features=17, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10, n_rows).astype(np.int64), rng.standard_normal((n_rows, n_features))


def concat_rows(parts):
    """(labels, dense matrix) of a list of partitions, for exact comparison."""
    return np.concatenate([p.labels for p in parts]), np.concatenate([p.toarray() for p in parts])


def sparse_partition(**kw):
    labels, indptr, indices, values, nf = make_sparse(**kw)
    return Partition(labels, indptr=indptr, indices=indices, values=values, n_features=nf)


# -- partition format -------------------------------------------------------------------------------


def test_partition_roundtrip_sparse_is_zero_copy():
    p = sparse_partition()
    data = encode_partition(p)
    assert len(data) == p.encoded_size() and data[:4] == b"CRPT"
    q = decode_partition(data, "mem://p0")
    assert q.kind == "sparse" and q.n_rows == p.n_rows and q.n_features == p.n_features
    for a, b in ((q.labels, p.labels), (q.indptr, p.indptr), (q.indices, p.indices), (q.values, p.values)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
        assert not a.flags.writeable and not a.flags.owndata  # a read-only view over `data`
    assert np.array_equal(q.toarray(), p.toarray())


def test_partition_roundtrip_dense_and_dtypes():
    labels, dense = make_dense()
    for dt in (np.float32, np.float64):
        p = Partition(labels, dense=dense.astype(dt))
        q = decode_partition(encode_partition(p), "p")
        assert q.kind == "dense" and q.dense.dtype == dt and q.labels.dtype == np.int64
        assert np.array_equal(q.dense, dense.astype(dt)) and np.array_equal(q.labels, labels)
        assert q.dense.base is not None and not q.dense.flags.writeable
    # int8 labels / bool / uint32 indices are widened, never truncated
    q = decode_partition(encode_partition(Partition(np.array([1, 0], np.int8), dense=np.ones((2, 3), np.int16))), "p")
    assert q.labels.dtype == np.int32 and q.dense.dtype == np.float64
    # zero rows, zero features
    for p in (Partition(np.empty(0), dense=np.empty((0, 5))),
              Partition(np.empty(0), indptr=[0], indices=[], values=[], n_features=3),
              Partition(np.ones(3), dense=np.empty((3, 0)))):
        q = decode_partition(encode_partition(p), "p")
        assert (q.kind, q.n_rows, q.n_features) == (p.kind, p.n_rows, p.n_features)


def test_partition_slices_encode_rebased():
    p = sparse_partition(n_rows=50)
    s = p.rows(10, 20)
    assert s.indptr[0] == 0 and np.array_equal(s.toarray(), p.toarray()[10:20])
    q = decode_partition(encode_partition(s), "p")
    assert np.array_equal(q.toarray(), p.toarray()[10:20]) and np.array_equal(q.labels, p.labels[10:20])


def test_encode_refuses_invalid_partitions():
    with pytest.raises(ValueError):
        encode_partition(Partition([1.0], indptr=[0, 1], indices=[5], values=[1.0], n_features=5))
    with pytest.raises(ValueError):
        Partition([1.0, 2.0], dense=np.ones((3, 2)))
    with pytest.raises(ValueError):
        Partition([1.0], indptr=[0, 1], indices=[0], values=[1.0])  # no n_features
    with pytest.raises(ValueError):
        Partition([1.0], dense=np.ones((1, 2)), indptr=[0, 0], indices=[], values=[], n_features=2)


def _section_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    lens = struct.unpack_from("<4Q", data, 4 + 2 + 2 + 5 + 3 + 3 * 8)
    out, off = {}, HEADER_SIZE
    for name, n in zip(("labels", "indptr", "indices", "values"), lens):
        out[name] = (off, n)
        off += n + (-n % 8)
    return out


def _flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def _expect(exc_type, data, name="s3://bkt/ds/part-000007.crpt"):
    with pytest.raises(exc_type) as ei:
        decode_partition(data, name)
    assert name in str(ei.value) and ei.value.name == name
    assert isinstance(ei.value, PartitionError) and isinstance(ei.value, CirrusError)
    return ei.value


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_one_flipped_bit_in_each_section(kind):
    if kind == "sparse":
        data = encode_partition(sparse_partition(n_rows=64))
        sections = ("labels", "indptr", "indices", "values")
    else:
        labels, dense = make_dense(n_rows=64)
        data = encode_partition(Partition(labels, dense=dense))
        sections = ("labels", "values")
    offsets = _section_offsets(data)
    rng = np.random.default_rng(3)
    for sec in sections:
        off, n = offsets[sec]
        assert n > 0
        for pos in (off, off + n - 1, off + int(rng.integers(n))):
            err = _expect(PartitionCorrupt, _flip(data, pos, int(rng.integers(8))))
            assert "checksum" in str(err)
    # padding is covered too
    if offsets["labels"][1] % 8:
        off, n = offsets["labels"]
        _expect(PartitionCorrupt, _flip(data, off + n))


def test_flipped_bits_in_header():
    data = encode_partition(sparse_partition(n_rows=64))
    for pos in range(6, HEADER_SIZE):  # everything after magic and version: CRC'd
        _expect(PartitionCorrupt, _flip(data, pos, pos % 8))
    for pos in range(4):
        assert "magic" in str(_expect(PartitionCorrupt, _flip(data, pos)))


def test_truncated_and_trailing():
    data = encode_partition(sparse_partition(n_rows=64))
    for cut in (0, 3, 7, 8, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, len(data) // 2, len(data) - 1):
        err = _expect(PartitionCorrupt, data[:cut])
        assert "truncated" in str(err)
    assert "trailing" in str(_expect(PartitionCorrupt, data + b"\0" * 8))


def _with_version(data: bytes, version: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<H", b, 4, version)
    struct.pack_into("<I", b, HEADER_SIZE - 4, zlib.crc32(b[:HEADER_SIZE - 4]))  # a well-formed newer file
    return bytes(b)


def test_wrong_version_and_magic():
    data = encode_partition(sparse_partition(n_rows=20))
    for v in (0, FORMAT_VERSION + 1, 0xFFFF):
        err = _expect(PartitionVersionError, _with_version(data, v))
        assert str(v) in str(err)
    _expect(PartitionVersionError, _with_version(data, 2)[:20])  # the version is known before the rest
    assert "magic" in str(_expect(PartitionCorrupt, b"PK\x03\x04" + data[4:]))
    assert "magic" in str(_expect(PartitionCorrupt, b"\0" * 200))
    assert "magic" in str(_expect(PartitionCorrupt, json.dumps({"a": 1}).encode() * 20))


def test_decode_never_half_parses_random_mutations():
    """Random byte mutations anywhere: a typed error or (for no-op mutations) the exact original."""
    p = sparse_partition(n_rows=40)
    data = encode_partition(p)
    rng = np.random.default_rng(11)
    for _ in range(300):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        try:
            q = decode_partition(bytes(b), "p")
        except PartitionError:
            continue
        assert bytes(b) == data and np.array_equal(q.toarray(), p.toarray())


# -- datasets ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_dataset_roundtrip_sparse(store_uri):
    labels, indptr, indices, values, nf = make_sparse(n_rows=2000)
    manifest = await write_arrays(store_uri, labels, csr=(indptr, indices, values, nf), partition_bytes=20_000)
    assert manifest["n_rows"] == 2000 and manifest["kind"] == "sparse" and manifest["n_features"] == nf
    async with await open_dataset(store_uri) as ds:
        assert ds.n_partitions == len(manifest["partitions"]) >= 5
        assert ds.manifest == manifest
        sizes = [ds.partition_nbytes(i) for i in range(ds.n_partitions)]
        assert all(s <= 20_000 + 1_000 for s in sizes) and all(s >= 15_000 for s in sizes[:-1])
        parts = [await ds.read_partition(i) for i in range(ds.n_partitions)]
    got_labels, got = concat_rows(parts)
    expect = Partition(labels, indptr=indptr, indices=indices, values=values, n_features=nf)
    assert np.array_equal(got_labels, labels) and np.array_equal(got, expect.toarray())
    assert parts[0].values.dtype == np.float32 and parts[0].indices.dtype == np.int32


@pytest.mark.asyncio
async def test_dataset_roundtrip_dense(store_uri):
    labels, dense = make_dense(n_rows=1000, n_features=13)
    manifest = await write_arrays(store_uri, labels, dense=dense, partition_bytes=10_000)
    async with await open_dataset(store_uri) as ds:
        assert ds.kind == "dense" and ds.n_rows == 1000 and ds.n_partitions == len(manifest["partitions"]) > 5
        parts = [await ds.read_partition(i) for i in range(ds.n_partitions)]
        with pytest.raises(IndexError):
            await ds.read_partition(ds.n_partitions)
    got_labels, got = concat_rows(parts)
    assert np.array_equal(got_labels, labels) and np.array_equal(got, dense)
    async with open_store(store_uri) as store:
        assert await store.list() == sorted([MANIFEST_KEY] + [e["key"] for e in manifest["partitions"]])


@pytest.mark.asyncio
async def test_write_from_rows_and_chunks(tmp_path):
    labels, dense = make_dense(n_rows=300, n_features=5)
    await write_dataset(tmp_path / "dense", ((labels[i], dense[i]) for i in range(300)), partition_bytes=3000)
    async with await open_dataset(tmp_path / "dense") as ds:
        _, got = concat_rows([await ds.read_partition(i) for i in range(ds.n_partitions)])
    assert np.array_equal(got, dense)

    p = sparse_partition(n_rows=300, n_features=50)

    async def rows():
        for i in range(p.n_rows):
            lo, hi = p.indptr[i], p.indptr[i + 1]
            yield p.labels[i], (p.indices[lo:hi], p.values[lo:hi])

    await write_dataset(str(tmp_path / "sparse"), rows(), n_features=50, partition_bytes=2000)
    chunks = [p.rows(a, b) for a, b in ((0, 7), (7, 7), (7, 250), (250, 300))]
    await write_dataset(str(tmp_path / "chunks"), iter(chunks), partition_bytes=2000)
    for sub in ("sparse", "chunks"):
        async with await open_dataset(tmp_path / sub) as ds:
            got_labels, got = concat_rows([await ds.read_partition(i) for i in range(ds.n_partitions)])
            assert ds.n_partitions > 3
        assert np.array_equal(got_labels, p.labels) and np.array_equal(got, p.toarray())

    with pytest.raises(DatasetError):
        await write_dataset(tmp_path / "none", iter([]))
    with pytest.raises(DatasetError):
        await write_dataset(tmp_path / "mixed", iter([p.rows(0, 3), Partition([1.0], dense=[[1.0]])]))
    with pytest.raises(DatasetError):
        await write_dataset(tmp_path / "nf", iter([(1.0, ([1], [1.0]))]))  # sparse rows need n_features


def test_write_arrays_sync(tmp_path):
    labels, dense = make_dense(n_rows=300, n_features=5)
    assert write_arrays_sync(tmp_path / "sync", labels, dense=dense)["n_rows"] == 300
    assert (tmp_path / "sync" / MANIFEST_KEY).is_file()


@pytest.mark.asyncio
async def test_overwrite_replaces_and_removes_stale_partitions(store_uri):
    labels, dense = make_dense(n_rows=600, n_features=8)
    m1 = await write_arrays(store_uri, labels, dense=dense, partition_bytes=4000)
    m2 = await write_arrays(store_uri, labels[:100], dense=dense[:100] * 2, partition_bytes=4000)
    assert len(m2["partitions"]) < len(m1["partitions"])
    async with open_store(store_uri) as store:
        assert await store.list() == sorted([MANIFEST_KEY] + [e["key"] for e in m2["partitions"]])
    async with await open_dataset(store_uri) as ds:
        _, got = concat_rows([await ds.read_partition(i) for i in range(ds.n_partitions)])
    assert np.array_equal(got, dense[:100] * 2)


@pytest.mark.asyncio
async def test_corrupt_partition_in_store_names_its_uri(store_uri):
    labels, indptr, indices, values, nf = make_sparse(n_rows=600)
    await write_arrays(store_uri, labels, csr=(indptr, indices, values, nf), partition_bytes=5000)
    async with await open_dataset(store_uri) as ds, open_store(store_uri) as store:
        key1, key2 = ds.manifest["partitions"][1]["key"], ds.manifest["partitions"][2]["key"]
        good = await store.get(key1)
        name = ds.partition_name(1)
        assert name.startswith(store_uri.rstrip("/")) and name.endswith(key1)

        await store.put(key1, good[: len(good) // 2])
        with pytest.raises(PartitionCorrupt, match="truncated") as ei:
            await ds.read_partition(1)
        assert name in str(ei.value)

        await store.put(key1, _flip(good, len(good) - 3))
        with pytest.raises(PartitionCorrupt, match="checksum") as ei:
            await ds.read_partition(1)
        assert name in str(ei.value)

        await store.put(key1, _with_version(good, 9))
        with pytest.raises(PartitionVersionError) as ei:
            await ds.read_partition(1)
        assert name in str(ei.value)

        await store.put(key1, await store.get(key2))  # a valid partition, but not this one
        with pytest.raises(PartitionCorrupt, match="manifest") as ei:
            await ds.read_partition(1)
        assert name in str(ei.value)

        await store.put(key1, good)
        assert (await ds.read_partition(1)).n_rows == ds.partition_rows(1)

        await store.delete(key2)
        with pytest.raises(IncompleteDataset, match=key2):
            await ds.read_partition(2)
    with pytest.raises(IncompleteDataset, match="missing"):
        await open_dataset(store_uri)


@pytest.mark.asyncio
async def test_partitions_without_manifest_are_not_a_dataset(store_uri):
    with pytest.raises(IncompleteDataset, match="not a cirrus dataset"):
        await open_dataset(store_uri)
    labels, dense = make_dense(n_rows=200)
    await write_arrays(store_uri, labels, dense=dense, partition_bytes=5000)
    async with open_store(store_uri) as store:
        await store.delete(MANIFEST_KEY)  # what a writer that died before its last step leaves
    with pytest.raises(IncompleteDataset, match="did not finish") as ei:
        await open_dataset(store_uri)
    assert isinstance(ei.value, DatasetError) and store_uri.rstrip("/") in str(ei.value)


@pytest.mark.asyncio
async def test_bad_manifest(tmp_path):
    labels, dense = make_dense(n_rows=50)
    m = await write_arrays(tmp_path, labels, dense=dense)
    for broken in (b"{not json", b"[]", json.dumps({**m, "version": 99}).encode(),
                   json.dumps({**m, "n_rows": 7}).encode(),
                   json.dumps({**m, "partitions": [{"key": "../../etc/passwd", "n_rows": 50, "nbytes": 1}]}).encode()):
        (tmp_path / MANIFEST_KEY).write_bytes(broken)
        with pytest.raises(DatasetError, match="manifest"):
            await open_dataset(tmp_path)


_KILLED_WRITER = textwrap.dedent("""
    import asyncio, os, signal, sys
    import numpy as np
    from cirrus.dataset import Partition, write_dataset

    async def chunks():
        rng = np.random.default_rng(0)
        for i in range(50):
            if i == 20:
                os.kill(os.getpid(), signal.SIGKILL)   # the writer dies mid-write
            yield Partition(rng.standard_normal(100), dense=rng.standard_normal((100, 10)))

    asyncio.run(write_dataset(sys.argv[1], chunks(), partition_bytes=9000))
""")


@pytest.mark.asyncio
@pytest.mark.parametrize("existing", [False, True])
async def test_writer_killed_mid_write_leaves_no_complete_dataset(tmp_path, existing):
    target = tmp_path / "ds"
    if existing:  # killed while overwriting a complete dataset: the old manifest must not survive
        labels, dense = make_dense(n_rows=2000, n_features=10)
        await write_arrays(target, labels, dense=dense, partition_bytes=9000)
        (await open_dataset(target)).manifest  # complete before
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], env=env, cwd=REPO,
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    async with open_store(target) as store:
        parts = await store.list("part-")
    assert len(parts) >= 5  # it did write partitions
    with pytest.raises(IncompleteDataset, match="did not finish"):
        await open_dataset(target)
