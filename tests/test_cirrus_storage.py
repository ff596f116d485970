"""cirrus.storage: the local-folder and S3 stores behind one async interface.

Also home of the shared fixtures of the cirrus data-path tests (imported by test_cirrus_dataset.py and
test_cirrus_iterator.py): ``store_uri`` is parametrized over both backends — a local tmp folder, and
S3 through aiobotocore against a real moto server started on loopback.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import pytest_asyncio

from cirrus.errors import CirrusError, InvalidKey, NotFound, StorageError
from cirrus.storage import LocalStore, S3Store, open_store, s3_session, validate_key

pytestmark = [pytest.mark.timeout(60)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_server():
    """A real S3-compatible server (moto) on 127.0.0.1; AWS env points at it for the module."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                    "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest_asyncio.fixture(params=["local", "s3"])
async def store_uri(request, tmp_path):
    """A fresh, empty dataset location URI on each backend."""
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    request.getfixturevalue("moto_server")
    bucket = f"cirrus-{uuid.uuid4().hex[:12]}"
    async with s3_session().create_client("s3") as client:
        await client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/data/set"


# --------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_store_roundtrip(store_uri):
    async with open_store(store_uri) as store:
        assert await store.list() == []
        with pytest.raises(NotFound) as ei:
            await store.get("missing.bin")
        assert "missing.bin" in str(ei.value) and isinstance(ei.value, CirrusError)

        await store.put("b.bin", b"second")
        await store.put("a.bin", bytearray(b"first"))
        await store.put("sub/dir/c.bin", memoryview(b"third"))
        await store.put("empty", b"")
        big = os.urandom(3 << 20)
        await store.put("big", big)
        assert await store.get("a.bin") == b"first"
        assert await store.get("sub/dir/c.bin") == b"third"
        assert await store.get("empty") == b""
        assert await store.get("big") == big
        assert await store.list() == ["a.bin", "b.bin", "big", "empty", "sub/dir/c.bin"]
        assert await store.list("sub/") == ["sub/dir/c.bin"]
        assert await store.list("b") == ["b.bin", "big"]
        assert await store.list("zzz") == []

        await store.put("a.bin", b"replaced")  # overwrite
        assert await store.get("a.bin") == b"replaced"
        await store.delete("a.bin")
        await store.delete("a.bin")  # idempotent, like S3
        with pytest.raises(NotFound):
            await store.get("a.bin")
        assert await store.exists("b.bin") and not await store.exists("a.bin")
        assert await store.list() == ["b.bin", "big", "empty", "sub/dir/c.bin"]
        assert store.name("b.bin") == store.uri + "/b.bin" and store.uri.endswith(store_uri.rstrip("/")[-8:])


@pytest.mark.asyncio
async def test_s3_prefixes_are_isolated(moto_server):
    bucket = f"cirrus-{uuid.uuid4().hex[:12]}"
    async with s3_session().create_client("s3") as client:
        await client.create_bucket(Bucket=bucket)
    async with open_store(f"s3://{bucket}/one") as one, open_store(f"s3://{bucket}/one-two") as two:
        await one.put("k", b"1")
        await two.put("k", b"2")
        assert await one.list() == ["k"] and await two.list() == ["k"]
        assert await one.get("k") == b"1" and await two.get("k") == b"2"
    with pytest.raises(StorageError):  # a bucket that does not exist: a typed error, not a botocore one
        async with open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x") as st:
            await st.put("k", b"1")


@pytest.mark.parametrize("key", ["", "..", "../x", "a/../b", "a/..", "/abs", "/", "a//b", "./a", "a/./b",
                                 "a\\b", "a\x00b", "C:/x", "a/"])
@pytest.mark.asyncio
async def test_invalid_keys_refused(tmp_path, key):
    with pytest.raises(InvalidKey):
        validate_key(key)
    for store in (LocalStore(tmp_path / "s"), S3Store("bucket", "prefix")):  # refused before any I/O
        with pytest.raises(InvalidKey):
            await store.put(key, b"x")
        with pytest.raises(InvalidKey):
            await store.get(key)
        with pytest.raises(InvalidKey):
            await store.delete(key)
    assert not (tmp_path / "s").exists() or list((tmp_path / "s").rglob("*")) == []


@pytest.mark.asyncio
async def test_invalid_list_prefix(tmp_path):
    store = LocalStore(tmp_path)
    for prefix in ("../", "/etc", "a/../"):
        with pytest.raises(InvalidKey):
            await store.list(prefix)


def test_open_store_uris(tmp_path):
    st = open_store(str(tmp_path))
    assert isinstance(st, LocalStore) and st.root == tmp_path
    assert isinstance(open_store(tmp_path), LocalStore)
    st = open_store(f"file://{tmp_path}/with%20space")
    assert isinstance(st, LocalStore) and st.root == tmp_path / "with space"
    st = open_store("s3://bkt/some/prefix/")
    assert isinstance(st, S3Store) and (st.bucket, st.prefix, st.uri) == ("bkt", "some/prefix", "s3://bkt/some/prefix")
    st = open_store("s3://bkt")
    assert isinstance(st, S3Store) and st.prefix == "" and st.name("k") == "s3://bkt/k"
    assert open_store(st) is st
    for bad in ("gs://bkt/x", "file://otherhost/x", "", "s3:///nobucket"):
        with pytest.raises(StorageError):
            open_store(bad)
    with pytest.raises(InvalidKey):
        open_store("s3://bkt/a/../b")


@pytest.mark.asyncio
async def test_local_put_is_atomic(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    await store.put("k", b"old contents")
    real_write = os.write
    calls = 0

    def failing_write(fd, data):
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, bytes(memoryview(data)[:10]))  # a short write, then the disk fills

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(StorageError) as ei:
        await store.put("k", b"new contents that do not fit")
    monkeypatch.undo()
    assert str(tmp_path / "k") in str(ei.value)
    assert await store.get("k") == b"old contents"  # never a half-written object
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["k"]  # temp file removed
    await store.put("k", b"x" * 100_000)
    assert await store.get("k") == b"x" * 100_000
    assert await store.list() == ["k"]


@pytest.mark.asyncio
async def test_local_list_ignores_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    await store.put("d/real", b"1")
    (tmp_path / "d" / ".cirrus-tmp-real.0123").write_bytes(b"partial")
    assert await store.list() == ["d/real"]
    assert await LocalStore(tmp_path / "nonexistent").list() == []
