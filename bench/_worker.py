"""One rank of one bench/comm.py cell: ``python -m bench._worker '<json config>'``.

The config names the backend's adapter class (``"worker": "module:Class"``, a
:class:`WorkerBackend`; see bench/_backends.py) and this process's ``rank``, or ``"rank": null``
and ``"rank_env"``: the environment variable in which a launcher such as mpirun passes the rank.
Sets up the backend, joins, runs ``warmup`` verified warm-up rounds and ``reps`` verified timed rounds
of one operation, and prints JSON lines on stdout (flushed as they happen):

* ``{"type": "round", "rank", "round", "start", "end", "cls"}`` per timed round: ``start`` is
  ``time.perf_counter()`` just after the barrier that precedes the round, ``end`` when this rank
  has its result (a second barrier follows before anything else is done) (CLOCK_MONOTONIC on Linux, so comparable between processes of one host);
* ``{"type": "warning", "rank", "error"}`` if closing the backend failed after all rounds;
* ``{"type": "done", "rank"}`` at the end, or ``{"type": "error", "rank", "phase", "error"}``
  (exit code 2) or ``{"type": "unavailable", "rank", "error"}`` (exit code 3).

Backends whose calls block (mpi, gloo) run them from the same ``async`` round loop; nothing else
runs on the event loop then, so a blocking call costs nothing extra.

Inputs are built and results checked outside the timed section: broadcast payloads must arrive
bit-exact, reduce results must equal the closed-form sum of all contributions, and a shuffle
output must hold exactly the items of all ranks' inputs that hash to this rank.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import math
import sys
import time
import traceback
from typing import Any

import numpy as np

from bench._common import close_comm, emit, report_error, run_on_loop

EXIT_ERROR, EXIT_UNAVAILABLE = 2, 3


class Unavailable(Exception):
    """The backend cannot be used at all (e.g. zipcomm is not importable yet)."""


class WrongResult(Exception):
    """An operation returned a wrong answer."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        remaining = self.end - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError(f"worker deadline of {self.seconds:.0f}s passed")
        return remaining


class WorkerBackend:
    """One rank's side of a backend: the operations the round loop (:func:`run`) calls.

    ``broadcast`` gets the payload on every rank (only the root's is sent) and returns what this
    rank holds afterwards; ``reduce`` returns the sum at rank 0 and None elsewhere; ``allreduce``
    the sum everywhere; ``shuffle`` the items hashing to this rank's class.  The input array is
    built anew for every round: reduce and allreduce may overwrite it (gloo sums in place) and
    return it, but a broadcast receiver must return what it received, not the payload it got
    (the check compares the two).
    """

    #: True if rank r always receives the shuffle items with ``item % n == r``; False if the
    #: classes are dealt out by the backend (zipcomm: by membership), then the check only asks
    #: that every class went to exactly one rank.
    shuffle_class_is_rank = True

    def __init__(self, cfg: dict, dl: Deadline) -> None:
        self.cfg, self.dl, self.rank, self.n = cfg, dl, cfg["rank"], cfg["n"]

    async def open(self) -> None:
        """Connect / join; raise :class:`Unavailable` if the backend's package is missing."""

    async def barrier(self) -> None:
        raise NotImplementedError

    async def broadcast(self, payload: np.ndarray) -> Any:
        raise NotImplementedError

    async def reduce(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    async def allreduce(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    async def shuffle(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    async def close(self) -> None:
        """Leave after every round ran and verified."""

    async def prepare(self, x: np.ndarray) -> np.ndarray:
        """The input as the application would build it for this backend (outside the timed
        section); by default the array itself."""
        return x

    async def close_after_error(self) -> None:
        """Best-effort clean-up after an error (the error is reported afterwards)."""
        await asyncio.wait_for(self.close(), timeout=10)

    def abort(self) -> None:
        """Called after the error was reported, just before this rank exits: stop the other
        ranks too if the launcher does not (mpirun's ranks: MPI_Abort)."""


class CommBackend(WorkerBackend):
    """A backend whose ``open`` sets ``self.comm``, a bench._common.PollingComm (and maybe
    ``self.store``, closed after it): the operations are the comm's, root 0, ``np.add``."""

    async def barrier(self) -> None:
        await self.comm.barrier(timeout=self.dl.left())

    async def broadcast(self, payload: np.ndarray) -> Any:
        return await self.comm.broadcast(payload if self.rank == 0 else None, root=0,
                                         timeout=self.dl.left())

    async def reduce(self, x: np.ndarray) -> Any:
        return await self.comm.reduce(x, op=np.add, root=0, timeout=self.dl.left())

    async def allreduce(self, x: np.ndarray) -> Any:
        return await self.comm.allreduce(x, op=np.add, timeout=self.dl.left())

    async def shuffle(self, x: np.ndarray) -> np.ndarray:
        return await self.comm.shuffle(x, timeout=self.dl.left())

    async def close(self) -> None:
        await close_comm(self)


class RedisBackend(CommBackend):
    async def open(self) -> None:
        from bench.redis_backend import RedisComm
        self.comm = RedisComm.from_cfg(self.cfg, self.rank, self.n, self.dl.seconds)
        await self.comm.__aenter__()


class ZipcommBackend(WorkerBackend):
    """Written against zipcomm's public async API (DESIGN.md 3.4)."""

    shuffle_class_is_rank = False  # the shuffle root deals out the classes by membership

    def __init__(self, cfg: dict, dl: Deadline) -> None:
        super().__init__(cfg, dl)
        self.rt = None
        self.num_lambdas: int | None = None

    async def open(self) -> None:
        try:
            import zipcomm
            self.zc, _ = zipcomm, (zipcomm.connect, zipcomm.SUM, zipcomm.BOTH)
        except Exception as exc:  # ImportError, or a half-written package without the names
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        zc, name, op = self.zc, self.cfg["prefix"], self.cfg["op"]
        self.rt = await zc.connect(self.cfg["controller"])
        # A channel's tree root is its first member. MPI and gloo broadcast from and reduce to
        # root rank 0; with --zipcomm-root rank0 (the default) rank 0 likewise creates the
        # broadcast / reduce channel before the others join it, so it is the root; with "any"
        # the ranks join at once and the root is whichever came first.
        first = self.cfg.get("zipcomm_root", "rank0") == "rank0" and op in ("broadcast", "reduce")
        if first:
            self.bar = await self.rt.reduce_channel(f"{name}-barrier", reduce_f=zc.SUM)
            while (count := await self._count()) != self.n:  # every rank is in the barrier channel
                if count > self.n:
                    raise WrongResult(f"barrier counted {count} contributors, expected {self.n}")
            if self.rank == 0:
                await self._join_op(op, name)
            await self.barrier()  # complete only once rank 0 is in (and so the root)
            if self.rank != 0:
                await self._join_op(op, name)
            await self.barrier()  # every rank is in the op channel
            is_root = getattr(self.ch, "is_root", None)  # (behind a host daemon: its channel is)
            if is_root is not None and is_root != (self.rank == 0):
                raise WrongResult(f"rank {self.rank}: is_root={is_root} after rank 0 joined first")
            return
        await self._join_op(op, name)
        self.bar = await self.rt.reduce_channel(f"{name}-barrier", reduce_f=zc.SUM)
        # Every rank joined the op channel before the barrier channel, so once a barrier round
        # counts all n contributors, every member of the op channel is in.
        while (count := await self._count()) != self.n:
            if count > self.n:
                raise WrongResult(f"barrier counted {count} contributors, expected {self.n}")

    async def _join_op(self, op: str, name: str) -> None:
        zc = self.zc
        if op == "broadcast":
            self.ch = await self.rt.broadcast_channel(f"{name}-broadcast")
        elif op == "reduce":
            handler = self._on_reduce if self.rank == 0 else None
            self.ch = await self.rt.reduce_channel(f"{name}-reduce", reduce_f=zc.SUM,
                                                   handler=handler)
        elif op == "allreduce":
            self.ch = await self.rt.reduce_channel(f"{name}-allreduce", reduce_f=zc.SUM)
        else:
            self.ch = await self.rt.shuffle_channel(f"{name}-shuffle", role=zc.BOTH)

    def _on_reduce(self, result: Any, num_lambdas: int) -> None:
        self.num_lambdas = num_lambdas

    async def _count(self) -> int:
        got = await self.bar.allreduce(np.ones(1, dtype=np.int64), timeout=self.dl.left())
        return int(np.asarray(got).reshape(-1)[0])

    async def barrier(self) -> None:
        if (count := await self._count()) != self.n:
            raise WrongResult(f"barrier counted {count} contributors, expected {self.n}")

    async def prepare(self, x: np.ndarray) -> np.ndarray:
        # zipcomm's way to build data that is sent without a copy: an array from the
        # channel's empty() (in shared memory behind a host daemon; without one, an array that
        # zipcomm keeps as it is instead of taking a private copy; read-only once handed over)
        buf = await self.ch.empty(x.shape, x.dtype)
        np.copyto(buf, x)
        return buf

    async def broadcast(self, payload: np.ndarray) -> Any:
        if self.rank == 0:
            await self.ch.send(payload)
            return payload
        return await self.ch.receive(timeout=self.dl.left())

    async def reduce(self, x: np.ndarray) -> Any:
        result = await self.ch.reduce(x)
        if self.rank == 0 and self.num_lambdas != self.n:
            raise WrongResult(f"reduce handler saw num_lambdas={self.num_lambdas}, "
                              f"expected {self.n}")
        return result

    async def allreduce(self, x: np.ndarray) -> Any:
        return await self.ch.allreduce(x, timeout=self.dl.left())

    async def shuffle(self, x: np.ndarray) -> np.ndarray:
        return await self.ch.shuffle_send_receive(x, hash_function=lambda a, n: a % n,
                                                  timeout=self.dl.left())

    async def close(self) -> None:
        if self.rt is not None:
            await self.rt.aclose()


def backend_class(path: str) -> type[WorkerBackend]:
    """``"module:Class"`` -> the class (the config names the adapter: bench/_backends.py)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def payload_items(cfg: dict) -> int:
    """int64 items of a broadcast / reduce / allreduce payload: at least ``size_bytes`` bytes."""
    return max(1, math.ceil(cfg["size_bytes"] / 8))


def shuffle_input(seed: int, src: int, rnd: int, items: int) -> np.ndarray:
    rng = np.random.default_rng([seed, src, (rnd + 1) % (1 << 32)])  # warm-up rounds are < 0
    return rng.integers(0, 2**40, size=items, dtype=np.int64)


def check_array(got: Any, want: np.ndarray, what: str) -> None:
    got = np.asarray(got) if got is not None else None
    if got is None or got.dtype != want.dtype or got.shape != want.shape:
        desc = "None" if got is None else f"{got.dtype}{list(got.shape)}"
        raise WrongResult(f"{what}: got {desc}, expected {want.dtype}{list(want.shape)}")
    if not np.array_equal(got, want):
        bad = int(np.flatnonzero(got.reshape(-1) != want.reshape(-1))[0])
        raise WrongResult(f"{what}: element {bad} is {got.reshape(-1)[bad]}, "
                          f"expected {want.reshape(-1)[bad]}")


def verify(cfg: dict, rnd: int, x: np.ndarray, tag: int, res: Any,
           class_is_rank: bool = True) -> int | None:
    """Raise WrongResult unless ``res`` is right; return the shuffle class received."""
    op, n, rank = cfg["op"], cfg["n"], cfg["rank"]
    what = f"{op} round {rnd} rank {rank}"
    if op == "broadcast" and rank != 0:
        check_array(res, x, what)
    elif op == "allreduce" or (op == "reduce" and rank == 0):
        base = np.arange(x.size, dtype=np.int64)
        check_array(res, base * n + (n * (n - 1) // 2 + n * tag), what)
    elif op == "reduce" and res is not None:
        raise WrongResult(f"{what}: non-root reduce returned {type(res).__name__}, expected None")
    elif op == "shuffle":
        res = np.asarray(res)
        cls = rank if class_is_rank or res.size == 0 else int(res[0] % n)
        if res.size and np.any(res % n != cls):
            raise WrongResult(f"{what}: received items of several hash classes")
        inputs = [shuffle_input(cfg["seed"], src, rnd, cfg["shuffle_items"]) for src in range(n)]
        want = np.sort(np.concatenate([a[a % n == cls] for a in inputs]))
        check_array(np.sort(res), want, f"{what} (items hashing to {cls})")
        return cls
    return None


async def run(cfg: dict, dl: Deadline, state: dict) -> None:
    backend = backend_class(cfg["worker"])(cfg, dl)
    state["backend"] = backend
    op, rank, n = cfg["op"], cfg["rank"], cfg["n"]
    state["phase"] = "setup"
    try:
        await backend.open()
        base = np.arange(payload_items(cfg), dtype=np.int64)
        warmup = cfg.get("warmup", 1)
        for rnd in range(-warmup, cfg["reps"]):  # rounds < 0 warm up: verified, not reported
            tag = rnd + warmup + 1
            state["phase"] = f"round {rnd} input"
            if op == "broadcast":
                base[0], base[-1] = tag, -tag  # the root sends it; the others expect it
                x = base
            elif op == "shuffle":
                x = shuffle_input(cfg["seed"], rank, rnd, cfg["shuffle_items"])
            else:
                x = base + (rank + tag)
            y = await backend.prepare(x) if op != "shuffle" else x
            state["phase"] = f"round {rnd} barrier"
            await backend.barrier()
            state["phase"] = f"round {rnd} {op}"
            start = time.perf_counter()
            res = await getattr(backend, op)(y)
            end = time.perf_counter()
            # Every rank waits for the last one before checking its result and building the next
            # input: otherwise ranks that return early (the non-roots of a reduce) would do that
            # untimed work on the same cores during the rest of the timed round.
            state["phase"] = f"round {rnd} end barrier"
            await backend.barrier()
            state["phase"] = f"round {rnd} verify"
            cls = verify(cfg, rnd, x, tag, res, backend.shuffle_class_is_rank)
            del res
            if rnd >= 0:
                emit(type="round", rank=rank, round=rnd, start=start, end=end, cls=cls)
    except BaseException:
        try:  # best effort; the error that got us here is the one to report
            await backend.close_after_error()
        except BaseException:
            pass
        raise
    # Every round ran and verified: a failing close is reported as a warning, not a failed cell.
    state["phase"] = "close"
    try:
        await asyncio.wait_for(backend.close(), timeout=10)
    except (Exception, asyncio.CancelledError) as exc:
        traceback.print_exc(file=sys.stderr)
        emit(type="warning", rank=rank, error=f"close failed: {type(exc).__name__}: {exc}")
    emit(type="done", rank=rank, n=n)


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    if cfg.get("rank") is None:  # started by a launcher (mpirun) that passes the rank itself
        cfg["rank"] = int(os.environ[cfg["rank_env"]])
    if os.environ.get("ZIPCOMM_BENCH_LOGDIR"):  # per-rank logs for post-mortems of a failed cell
        logging.basicConfig(
            filename=os.path.join(os.environ["ZIPCOMM_BENCH_LOGDIR"], f"{cfg['op']}-{cfg['n']}-{cfg['rank']}.log"),
            level=logging.INFO, format="%(relativeCreated)d %(name)s %(message)s")
    state = {"phase": "start"}
    dl = Deadline(cfg["timeout"])

    async def body() -> None:
        await asyncio.wait_for(run(cfg, dl, state), timeout=cfg["timeout"])

    try:
        run_on_loop(body, cfg.get("loop"))
    except Unavailable as exc:
        emit(type="unavailable", rank=cfg["rank"], error=str(exc))
        return EXIT_UNAVAILABLE
    except BaseException as exc:  # report everything, including timeouts and wrong answers
        report_error(cfg, state["phase"], exc)
        sys.stderr.flush()
        if state.get("backend") is not None:
            state["backend"].abort()
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    # Run the module under its own name: the backends' modules subclass bench._worker's classes
    # (WorkerBackend, Unavailable), which are other objects than this __main__'s.
    from bench._worker import main as _main
    sys.exit(_main(sys.argv))
