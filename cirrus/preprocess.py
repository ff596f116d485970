"""Preprocessing jobs: ``normalize`` and ``feature_hashing`` as map-reduce over worker processes.

::

    import cirrus
    cirrus.normalize("criteo_dataset", "criteo_norm", cirrus.MIN_MAX_SCALING)
    cirrus.feature_hashing("criteo_norm", "criteo_hashed", columns=range(13, 39), hash_bits=20)

Thesis section 3.4.3.1: each worker takes a share of the input partitions and computes per-column
statistics (map); the statistics are combined through a zipcomm reduce tree (reduce); each worker
then transforms its partitions and writes them (map). Partition ``i`` of the input becomes
partition ``i`` of the output (same rows, same order, labels kept). The coordinator — the caller —
starts the workers (``n_workers`` local processes) and a zipcomm controller on loopback unless one
is given (``controller=`` or ``$ZIPCOMM_CONTROLLER``), collects what each worker wrote, and writes the
output manifest last: a job that fails or is interrupted leaves no output that looks complete, and
its error names the worker and, for a bad partition, the partition.

What the transforms compute is defined in :mod:`cirrus.transforms`. ``normalize`` also stores the
global statistics next to the output (``stats.npy``, rows count/mean/m2/min/max; :func:`load_stats`),
so the same transform can be applied to other data.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import errors as _errors
from ._prep_worker import STATS_KEY
from .dataset import MANIFEST_KEY, commit_dataset, open_dataset
from .errors import CirrusError, DatasetError
from .storage import open_store
from .transforms import METHODS, MIN_MAX_SCALING, STANDARDIZATION

__all__ = ["MIN_MAX_SCALING", "STANDARDIZATION", "PreprocessError", "normalize", "normalize_async",
           "feature_hashing", "feature_hashing_async", "load_stats"]

Progress = Callable[[int, int], None]


class PreprocessError(CirrusError):
    """A preprocessing job failed: a worker died, timed out or reported an error it could not map
    to a more specific cirrus error. ``worker`` is its rank (or None), ``output`` its last words."""

    def __init__(self, message: str, *, worker: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.worker = worker
        self.output = output


def _default_workers(n_parts: int) -> int:
    return max(1, min(n_parts, 2 * (os.cpu_count() or 1), 32))


def _rebuild_error(rank: int, err: dict[str, Any]) -> Exception:
    """The error a worker reported, as the cirrus class it was (or PreprocessError)."""
    cls = getattr(_errors, err.get("type", ""), None)
    msg = f"worker {rank}: {err.get('message', '?')}"
    attrs = err.get("attrs") or {}
    if isinstance(cls, type) and issubclass(cls, CirrusError):
        try:
            if issubclass(cls, _errors.PartitionError):
                return cls(msg, name=attrs.get("name", "?"))
            if issubclass(cls, _errors.StorageError):
                return cls(msg, key=attrs.get("key"))
            if issubclass(cls, DatasetError):
                return cls(msg, uri=attrs.get("uri"))
            return cls(msg)
        except TypeError:
            pass
    return PreprocessError(f"{msg} ({err.get('type', 'error')})", worker=rank)


def _secondary(exc: BaseException) -> bool:
    """A worker's failure caused by another worker's (the reduce step missed a member)."""
    return isinstance(exc, PreprocessError) and "(JobFailed)" in str(exc)


class _Worker:
    def __init__(self, rank: int, proc: asyncio.subprocess.Process) -> None:
        self.rank = rank
        self.proc = proc
        self.result: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.stderr = b""


async def _follow(w: _Worker, on_progress: Callable[[], None]) -> None:
    assert w.proc.stdout is not None and w.proc.stderr is not None
    err_task = asyncio.create_task(w.proc.stderr.read(), name=f"cirrus-prep-{w.rank}-stderr")
    try:
        while line := await w.proc.stdout.readline():
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # a stray print; the protocol lines are JSON
            if "progress" in msg:
                on_progress()
            elif "result" in msg:
                w.result = msg["result"]
            elif "error" in msg:  # raised at once: the worker may take a while to leave its channels
                w.error = _rebuild_error(w.rank, msg["error"])
                raise w.error
        code = await w.proc.wait()
    finally:
        w.stderr = await err_task if not err_task.cancelled() and err_task.done() else b""
        if not err_task.done():
            err_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await err_task
    if w.error is None and (code != 0 or w.result is None):
        tail = w.stderr.decode(errors="replace").strip().splitlines()[-5:]
        w.error = PreprocessError(f"worker {w.rank} exited with code {code} before finishing"
                                  + (": " + " | ".join(tail) if tail else ""), worker=w.rank,
                                  output="\n".join(tail))
    if w.error is not None:
        raise w.error


async def _kill(workers: list[_Worker]) -> None:
    for w in workers:
        if w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
    for w in workers:
        await w.proc.wait()


async def _run_job(job: dict[str, Any], n_parts: int, n_workers: int, controller: str | None,
                   timeout: float, progress: Progress | None, steps_per_part: int) -> list[_Worker]:
    """Start ``n_workers`` workers (and a controller unless one is given), wait for all of them."""
    total = steps_per_part * n_parts
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    async with contextlib.AsyncExitStack() as stack:
        address = controller or os.environ.get("ZIPCOMM_CONTROLLER")
        if not address:
            import zipcomm

            ctl = await stack.enter_async_context(zipcomm.Controller("127.0.0.1:0"))
            address = ctl.address
        workers: list[_Worker] = []
        try:
            for rank in range(n_workers):
                spec = dict(job, rank=rank, n_workers=n_workers, controller=address, timeout=timeout,
                            parts=list(range(rank, n_parts, n_workers)))
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "cirrus._prep_worker", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                workers.append(_Worker(rank, proc))
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(spec).encode() + b"\n")
            followers = [asyncio.create_task(_follow(w, tick), name=f"cirrus-prep-{w.rank}") for w in workers]
            try:
                async with asyncio.timeout(timeout + 5.0):
                    # the first failure (an error, a death) ends the job; the others are killed
                    done_set, pending = await asyncio.wait(followers, return_when=asyncio.FIRST_EXCEPTION)
                    failed = [t.exception() for t in done_set if t.exception() is not None]
                    if failed and pending and all(_secondary(e) for e in failed):
                        # others failed because one died: give the one that died a moment to say why
                        more, _ = await asyncio.wait(pending, timeout=2.0, return_when=asyncio.FIRST_EXCEPTION)
                        failed += [t.exception() for t in more if t.exception() is not None]
                    if failed:
                        raise min(failed, key=_secondary)  # the cause rather than its echo
            except TimeoutError:
                raise PreprocessError(f"preprocessing job did not finish within {timeout:g} s") from None
            finally:
                for t in followers:
                    t.cancel()
                await asyncio.gather(*followers, return_exceptions=True)
        finally:
            await _kill(workers)
    return workers


async def _prepare(in_uri: str, out_uri: str) -> tuple[Any, int]:
    """Open the input (complete, or a clear error) and check the output is elsewhere."""
    ds = await open_dataset(in_uri)
    out = open_store(out_uri)
    try:
        if out.uri.rstrip("/") == ds.store.uri.rstrip("/"):
            raise ValueError(f"output {out_uri!r} is the input dataset; write to another folder / prefix")
        await out.delete(MANIFEST_KEY)  # from now on the output is incomplete until we commit
        await out.delete(STATS_KEY)
    finally:
        await out.aclose()
    return ds, ds.n_partitions


def _entries(workers: list[_Worker], n_parts: int) -> list[dict[str, Any]]:
    got: dict[int, dict[str, Any]] = {}
    for w in workers:
        assert w.result is not None
        for k, e in w.result["entries"].items():
            got[int(k)] = e
    if sorted(got) != list(range(n_parts)):
        raise PreprocessError(f"workers wrote {len(got)} of {n_parts} partitions")
    return [got[i] for i in range(n_parts)]


async def normalize_async(in_uri: str, out_uri: str, method: str = MIN_MAX_SCALING, *,
                          feature_range: tuple[float, float] = (0.0, 1.0), n_workers: int | None = None,
                          controller: str | None = None, timeout: float = 3600.0,
                          progress: Progress | None = None) -> dict[str, Any]:
    """Normalize every column of the dataset at ``in_uri`` into a new dataset at ``out_uri``.

    ``method``: :data:`MIN_MAX_SCALING` (to ``feature_range``; a constant column becomes its low
    end) or :data:`STANDARDIZATION` (zero mean, unit population standard deviation; a constant
    column becomes 0). Sparse datasets stay sparse (implicit zeros stay 0; statistics count them;
    standardization scales without centering; min-max needs ``feature_range`` starting at 0 and
    reports in the manifest how many columns have a negative minimum — see :mod:`cirrus.transforms`).
    ``progress(done, total)`` is called as partitions are summarized and written. Returns the
    output manifest."""
    if method not in METHODS:
        raise ValueError(f"unknown normalization {method!r}; use MIN_MAX_SCALING ({MIN_MAX_SCALING!r}) "
                         f"or STANDARDIZATION ({STANDARDIZATION!r})")
    lo, hi = (float(v) for v in feature_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"feature_range must be two finite numbers low < high, got {feature_range!r}")
    ds, n_parts = await _prepare(in_uri, out_uri)
    async with ds:
        if ds.kind == "sparse" and method == MIN_MAX_SCALING and lo != 0.0:
            raise ValueError(f"{ds.uri} is sparse: its implicit zeros stay 0, so feature_range must start at 0 "
                             f"(got {feature_range!r})")
        nw = _check_workers(n_workers, n_parts)
        job = {"job": "normalize", "in": in_uri, "out": out_uri, "method": method, "feature_range": [lo, hi],
               "channel": f"cirrus-normalize-{uuid.uuid4().hex[:12]}"}
        workers = await _run_job(job, n_parts, nw, controller, timeout, progress, steps_per_part=2)
        entries = _entries(workers, n_parts)
        extra = {"derived": {"op": "normalize", "method": method, "feature_range": [lo, hi],
                             "source": str(in_uri), "stats": STATS_KEY, "workers": nw}}
        if ds.kind == "sparse" and method == MIN_MAX_SCALING:
            st = await load_stats(out_uri)
            extra["derived"]["columns_with_negative_minimum"] = int(np.count_nonzero(st["min"] < 0))
        store = open_store(out_uri)
        try:
            return await commit_dataset(store, entries, kind=ds.kind, n_features=ds.n_features, extra=extra)
        finally:
            await store.aclose()


async def feature_hashing_async(in_uri: str, out_uri: str, *, hash_bits: int = 20,
                                columns: Iterable[int] | None = None, n_workers: int | None = None,
                                controller: str | None = None, timeout: float = 3600.0,
                                progress: Progress | None = None) -> dict[str, Any]:
    """Hash the dataset at ``in_uri`` into ``2**hash_bits`` features at ``out_uri`` (sparse).

    ``columns``: the categorical columns (each distinct value becomes its own hashed feature with
    value 1); every other column keeps its value in the bucket of its index. The output manifest
    (returned) records how many buckets are used and the fullest bucket's load."""
    if not isinstance(hash_bits, int) or not 1 <= hash_bits <= 40:
        raise ValueError(f"hash_bits must be an integer in 1..40, got {hash_bits!r}")
    ds, n_parts = await _prepare(in_uri, out_uri)
    async with ds:
        cols = sorted({int(c) for c in (columns if columns is not None else ())})
        bad = [c for c in cols if not 0 <= c < ds.n_features]
        if bad:
            raise ValueError(f"columns {bad[:5]} out of range: {ds.uri} has {ds.n_features} features")
        nw = _check_workers(n_workers, n_parts)
        job = {"job": "hash", "in": in_uri, "out": out_uri, "hash_bits": hash_bits, "columns": cols,
               "channel": f"cirrus-hash-{uuid.uuid4().hex[:12]}"}
        workers = await _run_job(job, n_parts, nw, controller, timeout, progress, steps_per_part=1)
        entries = _entries(workers, n_parts)
        buckets = next(w.result["buckets"] for w in workers if w.result and "buckets" in w.result)
        extra = {"derived": {"op": "feature_hashing", "hash_bits": hash_bits, "categorical_columns": cols,
                             "source": str(in_uri), "workers": nw, "buckets": buckets}}
        store = open_store(out_uri)
        try:
            return await commit_dataset(store, entries, kind="sparse", n_features=1 << hash_bits, extra=extra)
        finally:
            await store.aclose()


def _check_workers(n_workers: int | None, n_parts: int) -> int:
    if n_workers is None:
        return _default_workers(n_parts)
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    return n_workers


def _blocking(coro_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn(*args, **kwargs))
    raise RuntimeError(f"{coro_fn.__name__.removesuffix('_async')}() called from a running event loop: "
                       f"await {coro_fn.__name__}()")


def normalize(in_uri: str, out_uri: str, method: str = MIN_MAX_SCALING, **kwargs: Any) -> dict[str, Any]:
    """Blocking :func:`normalize_async` (thesis figure 3.5: ``cirrus.normalize(s3_input, s3_output,
    MIN_MAX_SCALING)``)."""
    return _blocking(normalize_async, in_uri, out_uri, method, **kwargs)


def feature_hashing(in_uri: str, out_uri: str, **kwargs: Any) -> dict[str, Any]:
    """Blocking :func:`feature_hashing_async`."""
    return _blocking(feature_hashing_async, in_uri, out_uri, **kwargs)


async def load_stats(uri: str) -> dict[str, np.ndarray]:
    """The global column statistics a ``normalize`` job stored with its output: arrays ``count``,
    ``mean``, ``std`` (population), ``min`` and ``max``."""
    store = open_store(uri)
    try:
        raw = await store.get(STATS_KEY)
    finally:
        await store.aclose()
    s = np.load(io.BytesIO(raw), allow_pickle=False)
    count = s[0]
    std = np.sqrt(np.divide(s[2], count, out=np.zeros_like(count), where=count > 0))
    return {"count": count, "mean": s[1], "std": std, "min": s[3], "max": s[4]}
