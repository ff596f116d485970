"""Dataset stores: a local folder (the embedded default) or ``s3://bucket/prefix`` (aiobotocore).

One async interface for both::

    async with open_store("/data/criteo") as store:          # or "file:///data/criteo", "s3://bkt/criteo"
        await store.put("part-00000.crpt", data)               # atomic
        data = await store.get("part-00000.crpt")              # NotFound if absent
        keys = await store.list("part-")                       # sorted keys relative to the store root
        await store.delete("part-00000.crpt")                  # absent key: no error (like S3)

Keys are relative, ``/``-separated, and may not escape the store: no ``..`` / ``.`` / empty
segments, no leading ``/``, no backslash, no NUL (:class:`~cirrus.errors.InvalidKey`).

The S3 endpoint, region and credentials come from the standard AWS settings (``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
profiles, ...), so tests point it at an S3-compatible server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import InvalidKey, NotFound, StorageError

__all__ = ["Store", "LocalStore", "S3Store", "open_store", "validate_key", "join_uri", "s3_session"]

_TMP_PREFIX = ".cirrus-tmp-"


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`InvalidKey`.

    With ``prefix=True`` the empty string and a trailing ``/`` are allowed (a listing prefix).
    """
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, not {type(key).__name__}: {key!r}", key=str(key))
    if prefix and key == "":
        return key
    if not key:
        raise InvalidKey("empty key", key=key)
    if "\x00" in key or "\\" in key:
        raise InvalidKey(f"invalid character in key {key!r}", key=key)
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise InvalidKey(f"absolute key {key!r} (keys are relative to the store)", key=key)
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidKey(f"invalid key {key!r}: empty, '.' or '..' segment", key=key)
    if parts and parts[-1].startswith(_TMP_PREFIX) and not prefix:
        raise InvalidKey(f"key {key!r} uses the reserved temp-file prefix", key=key)
    return key


_SESSION: Any = None


def s3_session() -> Any:
    """The process-wide aiobotocore session (shared so service models are loaded once, not per store)."""
    global _SESSION
    if _SESSION is None:
        from aiobotocore.session import get_session

        _SESSION = get_session()
    return _SESSION


def join_uri(uri: str, key: str) -> str:
    return uri.rstrip("/") + "/" + key


class Store:
    """Abstract async key -> bytes store rooted at ``uri``."""

    uri: str

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def get(self, key: str) -> bytes:
        raise NotImplementedError

    async def list(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    async def exists(self, key: str) -> bool:
        try:
            await self.get(key)
        except NotFound:
            return False
        return True

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def name(self, key: str) -> str:
        """The full URI of ``key`` (used in error messages)."""
        return join_uri(self.uri, key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(Store):
    """A folder on the local file system. Writes are atomic (temp file + fsync + os.replace)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    # blocking parts, run in a thread
    def _put_sync(self, key: str, data: Any) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data).cast("B")
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise StorageError(f"cannot write {self.name(key)}: {e}", key=key) from e

    def _get_sync(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise NotFound(f"no such key: {self.name(key)}", key=key) from e
        except OSError as e:
            raise StorageError(f"cannot read {self.name(key)}: {e}", key=key) from e

    def _list_sync(self, prefix: str) -> list[str]:
        validate_key(prefix, prefix=True)
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            base = "" if str(rel) == "." else rel.as_posix() + "/"
            # prune directories that cannot contain a match
            dirnames[:] = [
                d for d in dirnames
                if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")
            ]
            for fn in filenames:
                if fn.startswith(_TMP_PREFIX):
                    continue
                key = base + fn
                if key.startswith(prefix):
                    out.append(key)
        out.sort()
        return out

    def _delete_sync(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self.name(key)}: {e}", key=key) from e

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        validate_key(key)
        await asyncio.to_thread(self._put_sync, key, data)

    async def get(self, key: str) -> bytes:
        validate_key(key)
        return await asyncio.to_thread(self._get_sync, key)

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list_sync, prefix)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await asyncio.to_thread(self._delete_sync, key)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)


class S3Store(Store):
    """``s3://bucket/prefix`` through aiobotocore. The client is created on first use."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region_name: str | None = None, client_kwargs: dict[str, Any] | None = None) -> None:
        if not bucket:
            raise StorageError("s3 URI without a bucket")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._endpoint_url = endpoint_url
        self._region_name = region_name
        self._client_kwargs = dict(client_kwargs or {})
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._closed = False

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def client(self) -> Any:
        if self._closed:
            raise StorageError(f"store {self.uri} is closed")
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                kwargs = dict(self._client_kwargs)
                if self._endpoint_url is not None:
                    kwargs["endpoint_url"] = self._endpoint_url
                if self._region_name is not None:
                    kwargs["region_name"] = self._region_name
                stack = contextlib.AsyncExitStack()
                try:
                    self._client = await stack.enter_async_context(
                        s3_session().create_client("s3", **kwargs))
                except Exception as e:
                    await stack.aclose()
                    raise StorageError(f"cannot create an S3 client for {self.uri}: {e}") from e
                self._stack = stack
        return self._client

    @staticmethod
    def _code(e: Exception) -> str:
        resp = getattr(e, "response", None) or {}
        return str(resp.get("Error", {}).get("Code", ""))

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        validate_key(key)
        client = await self.client()
        try:
            await client.put_object(Bucket=self.bucket, Key=self._full(key), Body=bytes(data))
        except Exception as e:
            raise StorageError(f"cannot write {self.name(key)}: {e}", key=key) from e

    async def get(self, key: str) -> bytes:
        validate_key(key)
        client = await self.client()
        try:
            resp = await client.get_object(Bucket=self.bucket, Key=self._full(key))
            async with resp["Body"] as body:
                return await body.read()
        except Exception as e:
            if self._code(e) in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no such key: {self.name(key)}", key=key) from e
            raise StorageError(f"cannot read {self.name(key)}: {e}", key=key) from e

    async def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, prefix=True)
        client = await self.client()
        base = self.prefix + "/" if self.prefix else ""
        out: list[str] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", ()):
                    out.append(obj["Key"][len(base):])
        except Exception as e:
            raise StorageError(f"cannot list {join_uri(self.uri, prefix)}: {e}", key=prefix) from e
        out.sort()
        return out

    async def delete(self, key: str) -> None:
        validate_key(key)
        client = await self.client()
        try:
            await client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as e:
            raise StorageError(f"cannot delete {self.name(key)}: {e}", key=key) from e

    async def aclose(self) -> None:
        self._closed = True
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def open_store(uri: str | os.PathLike[str] | Store) -> Store:
    """A :class:`Store` for ``uri``: a local folder path, ``file://...`` or ``s3://bucket/prefix``.

    A :class:`Store` passed in is returned as is.
    """
    if isinstance(uri, Store):
        return uri
    if isinstance(uri, os.PathLike):
        return LocalStore(uri)
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"invalid dataset URI {uri!r}")
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return S3Store(parsed.netloc, unquote(parsed.path))
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URI with a remote host is not supported: {uri}")
        return LocalStore(unquote(parsed.path))
    if "://" in uri:
        raise StorageError(f"unsupported dataset URI scheme: {uri}")
    return LocalStore(uri)
