"""One parameter-server shard: the rows ``r`` with ``r % n_shards == shard`` of every table.

A table is a ``(rows, cols)`` array of model parameters (row = feature) with a per-coordinate
optimizer (:mod:`cirrus.optim`), or with ``optimizer="add"`` a table of counts that pushes are
added to (LDA's word-topic counts). Calls (:mod:`zipcomm.rpc`, so zipcomm frames and numpy
arrays without copies):

* ``create`` — make a table (idempotent for the same spec: a resumed shard keeps its values);
* ``pull`` — rows (shard-local indices) -> values, and the table's version;
* ``push`` (cast or call) — gradient rows from worker ``w`` incarnation ``inc`` step ``step``,
  computed on the version it pulled. Applied **at most once** per (worker, incarnation, step);
  refused if the incarnation was retired (a zombie) or the staleness (versions applied since its
  pull) is over ``max_staleness``; every refusal is counted by reason;
* ``retire`` — from now on refuse incarnations ``<= inc`` of worker ``w``;
* ``kv_set`` / ``kv_get`` — small named values (intermediate state), bounded in total bytes;
* ``stats`` — counts, staleness, versions; ``checkpoint`` — write one now.

Checkpoints (every ``checkpoint_every`` seconds and on request) go to the dataset store as one
object per shard, ``<prefix>/shard-<i>-of-<k>.ckpt``: a ``.npz`` (no pickle) holding every
table, its optimizer state, and a JSON record of versions, incarnations and last steps. A shard
started with ``resume=True`` loads it, so a killed and restarted server carries on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from typing import Any

import numpy as np

import zipcomm
from zipcomm.protocol.handshake import load_secret
from zipcomm.transport.connection import parse_address, refuse_open_listen

from ..optim import make_optimizer
from ..storage import open_store

log = logging.getLogger("cirrus.ps")

KV_LIMIT_BYTES = 256 << 20
TABLE_LIMIT_BYTES = 8 << 30  # one shard's share of one table


class PSError(ValueError):
    """A call the shard refuses (bad table, rows out of range, wrong shapes)."""


def local_rows(total_rows: int, shard: int, n_shards: int) -> int:
    """How many of ``total_rows`` rows live on ``shard``."""
    return max(0, (total_rows - shard + n_shards - 1) // n_shards)


class _Table:
    def __init__(self, spec: dict[str, Any], shard: int, n_shards: int) -> None:
        self.spec = spec
        n = local_rows(int(spec["rows"]), shard, n_shards)
        cols = int(spec["cols"])
        dtype = np.dtype(spec.get("dtype", "float32"))
        if dtype.kind != "f" or n < 0 or cols < 1 or n * cols * dtype.itemsize > TABLE_LIMIT_BYTES:
            raise PSError(f"a table of {spec['rows']} x {cols} {dtype} is refused (float dtype, at most "
                          f"{TABLE_LIMIT_BYTES >> 30} GiB per shard)")
        init = spec.get("init", "zeros")
        if init == "zeros":
            self.values = np.zeros((n, cols), dtype=dtype)
        elif init == "normal":
            rng = np.random.default_rng([int(spec.get("seed", 0)), shard])
            self.values = (rng.standard_normal((n, cols)) * float(spec.get("scale", 0.01))).astype(dtype)
        else:
            raise PSError(f"unknown init {init!r} (zeros | normal)")
        opt = spec.get("optimizer", "sgd")
        self.opt = None if opt == "add" else make_optimizer(opt, (n, cols), dtype, **spec.get("hyper", {}))
        self.version = 0


class Shard:
    def __init__(self, shard: int, n_shards: int, *, max_staleness: int | None = None,
                 checkpoint_uri: str | None = None, checkpoint_every: float = 0.0) -> None:
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
        self.shard, self.n_shards = shard, n_shards
        self.max_staleness = max_staleness
        self.checkpoint_uri = checkpoint_uri
        self.checkpoint_every = checkpoint_every
        self.tables: dict[str, _Table] = {}
        self.kv: dict[str, Any] = {}
        self.kv_bytes = 0
        self.retired: dict[str, int] = {}      # worker -> highest retired incarnation
        self.last_step: dict[str, int] = {}    # "worker/inc" -> last applied step
        self.counts = {"applied": 0, "refused_zombie": 0, "refused_duplicate": 0, "refused_stale": 0,
                       "coordinates": 0, "pulls": 0}
        self.staleness_max = 0
        self.staleness_sum = 0
        self.started = time.time()
        self.server: zipcomm.RpcServer | None = None
        self._ticker: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, listen: str = "127.0.0.1:0", *, resume: bool = False,
                    secret: bytes | None = None) -> str:
        """Listen on ``listen``; ``secret`` (default: ``$ZIPCOMM_SECRET``) authenticates clients. A
        non-loopback address without a secret is refused."""
        secret = secret if secret is not None else load_secret()
        kind, where = parse_address(listen)
        if kind == "tcp":
            refuse_open_listen(where[0], secret, "a parameter-server shard")  # type: ignore[index]
        if resume and self.checkpoint_uri:
            await self.load_checkpoint()
        self.server = await zipcomm.serve_rpc(listen, self.handle, secret=secret)
        if self.checkpoint_uri and self.checkpoint_every > 0:
            self._ticker = asyncio.create_task(self._checkpoint_loop(), name=f"ps-shard-{self.shard}-ckpt")
        return self.server.address

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.server is not None:
            await self.server.aclose()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_every)
            try:
                await self.checkpoint()
            except Exception:
                log.exception("shard %d: checkpoint failed", self.shard)

    # -- calls ----------------------------------------------------------------------------------------
    def handle(self, method: str, data: Any, peer: zipcomm.RpcPeer) -> Any:
        fn = getattr(self, "_call_" + method, None)
        if fn is None:
            raise PSError(f"unknown parameter-server call {method!r}")
        return fn(data or {})

    def _table(self, data: dict) -> _Table:
        t = self.tables.get(data.get("table"))
        if t is None:
            raise PSError(f"no table {data.get('table')!r} on shard {self.shard} (tables: {sorted(self.tables)})")
        return t

    def _rows(self, t: _Table, data: dict) -> np.ndarray:
        rows = np.asarray(data.get("rows"), dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= t.values.shape[0]):
            raise PSError(f"rows out of range 0..{t.values.shape[0] - 1} of table {data.get('table')!r}")
        return rows

    def _call_create(self, data: dict) -> dict:
        name = data["table"]
        spec = {k: data[k] for k in ("rows", "cols", "dtype", "init", "scale", "seed", "optimizer", "hyper")
                if k in data}
        have = self.tables.get(name)
        if have is not None:
            if have.spec != spec:
                raise PSError(f"table {name!r} exists with another spec: {have.spec} != {spec}")
            return {"rows": have.values.shape[0], "version": have.version, "existed": True}
        try:
            self.tables[name] = _Table(spec, self.shard, self.n_shards)
        except (TypeError, ValueError) as exc:
            raise PSError(f"table {name!r}: {exc}") from exc
        return {"rows": self.tables[name].values.shape[0], "version": 0, "existed": False}

    def _call_pull(self, data: dict) -> dict:
        t = self._table(data)
        rows = self._rows(t, data)
        self.counts["pulls"] += 1
        vals = t.values if data.get("all") else t.values[rows]
        if data.get("f16"):
            vals = vals.astype(np.float16)
        out: dict[str, Any] = {"values": vals, "version": t.version}
        w = data.get("worker")
        if w is not None and self.retired.get(str(w), -1) >= int(data.get("inc", 0)):
            out["retired"] = True
        return out

    def _call_push(self, data: dict) -> dict:
        t = self._table(data)
        worker, inc, step = str(data.get("worker")), int(data.get("inc", 0)), int(data.get("step", 0))
        if self.retired.get(worker, -1) >= inc:
            self.counts["refused_zombie"] += 1
            return {"applied": False, "reason": "retired"}
        key = f"{worker}/{inc}"
        if step <= self.last_step.get(key, -1):
            self.counts["refused_duplicate"] += 1
            return {"applied": False, "reason": "duplicate"}
        staleness = max(0, t.version - int(data.get("version", t.version)))
        if self.max_staleness is not None and staleness > self.max_staleness:
            self.counts["refused_stale"] += 1
            self.last_step[key] = step
            return {"applied": False, "reason": "stale", "staleness": staleness}
        rows = self._rows(t, data)
        grads = np.asarray(data.get("grads"))
        if grads.dtype == np.float16:
            grads = grads.astype(np.float32)
        if grads.ndim == 1:
            grads = grads.reshape(-1, 1)
        if grads.shape != (rows.size, t.values.shape[1]):
            raise PSError(f"grads of shape {grads.shape} for {rows.size} rows x {t.values.shape[1]} cols")
        if t.opt is None:
            np.add.at(t.values, rows, grads.astype(t.values.dtype, copy=False))
            n = grads.size
        else:
            n = t.opt.apply(t.values, rows, grads)
        self.last_step[key] = step
        t.version += 1
        self.counts["applied"] += 1
        self.counts["coordinates"] += int(n)
        self.staleness_max = max(self.staleness_max, staleness)
        self.staleness_sum += staleness
        return {"applied": True, "staleness": staleness}

    def _call_pushpull(self, data: dict) -> dict:
        """A push and the next pull in one round trip (the push is applied first)."""
        out: dict[str, Any] = {}
        if data.get("push") is not None:
            out["push"] = self._call_push(data["push"])
        if data.get("pull") is not None:
            out["pull"] = self._call_pull(data["pull"])
        return out

    def _call_retire(self, data: dict) -> dict:
        w, inc = str(data["worker"]), int(data["inc"])
        self.retired[w] = max(self.retired.get(w, -1), inc)
        return {"retired": self.retired[w]}

    def _call_kv_set(self, data: dict) -> dict:
        key, value = str(data["key"]), data.get("value")
        size = _size(value)
        old = _size(self.kv.get(key))
        if self.kv_bytes - old + size > KV_LIMIT_BYTES:
            raise PSError(f"key-value store full ({KV_LIMIT_BYTES} bytes)")
        self.kv[key] = value
        self.kv_bytes += size - old
        return {"ok": True}

    def _call_kv_get(self, data: dict) -> dict:
        key = str(data["key"])
        return {"found": key in self.kv, "value": self.kv.get(key)}

    def _call_stats(self, data: dict) -> dict:
        applied = max(1, self.counts["applied"])
        return {**self.counts, "shard": self.shard, "n_shards": self.n_shards,
                "staleness_max": self.staleness_max, "staleness_mean": self.staleness_sum / applied,
                "versions": {k: t.version for k, t in self.tables.items()},
                "uptime": time.time() - self.started}

    async def _call_checkpoint(self, data: dict) -> dict:
        key = await self.checkpoint()
        return {"key": key}

    # -- checkpoints ---------------------------------------------------------------------------------
    def _ckpt_key(self) -> str:
        return f"shard-{self.shard}-of-{self.n_shards}.ckpt"

    def snapshot(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        meta = {"format": "cirrus-ps-checkpoint", "version": 1, "shard": self.shard, "n_shards": self.n_shards,
                "tables": {}, "retired": self.retired, "last_step": self.last_step, "counts": self.counts,
                "kv": {}}
        for i, (name, t) in enumerate(self.tables.items()):
            arrays[f"t{i}"] = t.values
            state = t.opt.state_arrays() if t.opt is not None else {}
            for s, arr in state.items():
                arrays[f"t{i}.{s}"] = arr
            meta["tables"][name] = {"i": i, "spec": t.spec, "version": t.version, "state": sorted(state)}
        for j, (k, v) in enumerate(self.kv.items()):
            if isinstance(v, np.ndarray):
                arrays[f"kv{j}"] = v
                meta["kv"][k] = {"array": f"kv{j}"}
            else:
                meta["kv"][k] = {"value": v}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def restore(self, raw: bytes) -> None:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != "cirrus-ps-checkpoint" or meta.get("n_shards") != self.n_shards \
                    or meta.get("shard") != self.shard:
                raise PSError(f"checkpoint is for shard {meta.get('shard')} of {meta.get('n_shards')}, "
                              f"not {self.shard} of {self.n_shards}")
            tables = {}
            for name, info in meta["tables"].items():
                t = _Table({**info["spec"], "init": "zeros"}, self.shard, self.n_shards)
                t.spec = info["spec"]
                t.values = np.array(z[f"t{info['i']}"])
                if t.opt is not None:
                    t.opt.load_state({s: np.array(z[f"t{info['i']}.{s}"]) for s in info["state"]})
                t.version = int(info["version"])
                tables[name] = t
            kv = {k: (np.array(z[v["array"]]) if "array" in v else v["value"]) for k, v in meta["kv"].items()}
        self.tables, self.kv = tables, kv
        self.kv_bytes = sum(_size(v) for v in kv.values())
        self.retired = {k: int(v) for k, v in meta["retired"].items()}
        self.last_step = {k: int(v) for k, v in meta["last_step"].items()}
        self.counts.update(meta.get("counts", {}))

    async def checkpoint(self) -> str:
        if not self.checkpoint_uri:
            raise PSError("this shard has no checkpoint location")
        data = await asyncio.to_thread(self.snapshot)
        async with open_store(self.checkpoint_uri) as store:
            await store.put(self._ckpt_key(), data)
        return self._ckpt_key()

    async def load_checkpoint(self) -> bool:
        from ..errors import NotFound

        async with open_store(self.checkpoint_uri) as store:  # type: ignore[arg-type]
            try:
                raw = await store.get(self._ckpt_key())
            except NotFound:
                return False
        await asyncio.to_thread(self.restore, raw)
        log.info("shard %d: resumed from checkpoint (%d tables)", self.shard, len(self.tables))
        return True


def _size(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, np.ndarray):
        return int(v.nbytes)
    if isinstance(v, (bytes, bytearray, str)):
        return len(v)
    return len(json.dumps(v, default=str))
