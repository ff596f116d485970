"""The parent side of a bench/comm.py backend, and the zipcomm and redis backends.

A backend is a :class:`Backend` subclass (the parent process's side: availability check, run-wide
and per-cell services, how the ranks are launched) plus a ``bench._worker.WorkerBackend``
subclass named by ``worker`` (one rank's side: barrier and the four operations).  The round loop,
inputs, verification, timing and the JSON lines are shared (bench/_worker.py), and so are the
launchers (bench/_launch.py) and the summary (bench/_report.py).

To add a backend: write both classes (a module ``bench/<name>_backend.py`` holding both is the
pattern of mpi and gloo), then add the class to ``BACKENDS`` in bench/comm.py; ``--backends``,
``--help``, the table and the ratios pick it up from there.

:func:`leak_check`, :func:`redis_worker_cfg` and :func:`s3_worker_cfg` serve the redis and s3
backends (and bench/sort.py, for the last two).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from bench._launch import run_workers
from bench._services import Controller, Daemon, RedisServer, ServiceError, zipcomm_import_error


def package_version(name: str) -> str | None:
    """The installed version of a Python distribution, without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def leak_check(cell: dict, field: str, server: str, count: Callable[[], int]) -> Iterator[None]:
    """Around a cell's run: afterwards ``cell[field] = count()`` (what the cell left in the
    server); if ``server`` cannot be reached the cell fails (the next cells will fail too)."""
    try:
        yield
    finally:
        try:
            cell[field] = count()
        except Exception as exc:  # the server died: note it
            cell[field] = None
            cell["error"] = cell["error"] or f"{server} unreachable after the cell: {exc}"
            cell["status"] = "failed"


def redis_worker_cfg(url: str, args: argparse.Namespace) -> dict:
    """The redis entries of a worker config (``--redis-poll-*-ms`` options in seconds)."""
    return dict(redis_url=url, poll_spin=args.redis_poll_spin_ms / 1e3,
                poll_sleep=args.redis_poll_sleep_ms / 1e3)


def s3_worker_cfg(bucket: str, settings: dict, args: argparse.Namespace) -> dict:
    """The s3 entries of a worker config (``--s3-poll-*-ms`` options in seconds)."""
    return dict(s3_bucket=bucket, s3_settings=settings, poll_spin=args.s3_poll_spin_ms / 1e3,
                poll_sleep=args.s3_poll_sleep_ms / 1e3, poll_max=args.s3_poll_max_ms / 1e3)


LAUNCH_STYLES = {"workers": "n separate worker processes", "mpirun": "one mpirun -n N"}


class Backend:
    """Parent side of one benchmarked system.  One instance per run of bench/comm.py."""

    name: ClassVar[str]
    #: ``"module:Class"`` of the bench._worker.WorkerBackend that every rank runs
    worker: ClassVar[str]
    #: how a cell's ranks start (a key of LAUNCH_STYLES): "workers" (n separate ``python -m
    #: bench._worker`` processes, rank and size in the config) or "mpirun" (one ``mpirun -n N``,
    #: see bench.mpi_backend); :meth:`run_ranks` does it
    launch: ClassVar[str] = "workers"
    #: one line for ``--help``: what is measured
    summary: ClassVar[str]
    #: what has to be installed for it (for ``--help`` and the README)
    needs: ClassVar[str]

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        """Add this backend's own command-line options (named ``--<name>-...``)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir

    def start(self) -> None:
        """Check that the backend can run and start its run-wide services; raise
        :class:`ServiceError` saying why not (its cells are then reported as "backend
        unavailable: ...", which does not fail the run).  Keep it cheap: no heavy imports."""

    def stop(self) -> None:
        """Stop the run-wide services (also called when :meth:`start` failed)."""

    def info(self) -> dict:
        """Versions and settings for the JSON report's ``machine`` section (after the cells)."""
        return {}

    def worker_cfg(self) -> dict:
        """Backend-specific entries of every rank's config."""
        return {}

    def env(self) -> dict[str, str]:
        """Extra environment variables of the ranks."""
        return {}

    @contextlib.contextmanager
    def cell(self, cell: dict, cfg: dict) -> Iterator[None]:
        """Per-cell set-up around the ranks' run: may add to ``cfg``, check things afterwards
        (and note them in ``cell``), or raise :class:`ServiceError` before the ranks start."""
        yield

    async def run_ranks(self, cfg: dict, n: int, timeout: float) -> tuple[list[tuple], list[int], str]:
        """Run the n ranks of one cell (see bench/_launch.py for the result)."""
        return await run_workers([dict(cfg, rank=r) for r in range(n)], timeout, self.env())


class Zipcomm(Backend):
    name = "zipcomm"
    worker = "bench._worker:ZipcommBackend"
    summary = "this project: the async API over a controller started per cell"
    needs = "this repository (import zipcomm)"

    def start(self) -> None:
        error = zipcomm_import_error()
        if error:
            raise ServiceError(error)

    @contextlib.contextmanager
    def cell(self, cell: dict, cfg: dict) -> Iterator[None]:
        controller = Controller(self.workdir)
        controller.start()  # ServiceError: this cell is "backend unavailable"
        try:
            cfg["controller"] = controller.address
            yield
        finally:
            controller.stop()


class ZipcommDaemon(Zipcomm):
    name = "zipcomm-daemon"
    summary = ("this project with its host daemon: shared-memory delivery, local reduce "
               "in place (a controller and a daemon started per cell)")

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--daemon-shm-size", default="4G", metavar="SIZE",
                            help="zipcomm-daemon backend: the daemon's arena (default: %(default)s)")

    @contextlib.contextmanager
    def cell(self, cell: dict, cfg: dict) -> Iterator[None]:
        with super().cell(cell, cfg):
            daemon = Daemon(self.workdir, cfg["controller"], self.args.daemon_shm_size)
            daemon.start()  # ServiceError: this cell is "backend unavailable"
            self._socket = daemon.address
            try:
                yield
            finally:
                daemon.stop()

    def env(self) -> dict[str, str]:
        return {"ZIPCOMM_DAEMON": self._socket}


class Redis(Backend):
    name = "redis"
    worker = "bench._worker:RedisBackend"
    summary = "the thesis's baseline: the same API over one redis-server (SET + polling GET)"
    needs = "Debian package redis-server, pip package redis"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--redis-poll-spin-ms", type=float, default=5.0, help="redis backend: "
                            "re-poll back to back for this long before backing off "
                            "(default: %(default)s)")
        parser.add_argument("--redis-poll-sleep-ms", type=float, default=1.0, help="redis "
                            "backend: sleep between polls after the spin phase; 0 = never sleep "
                            "(default: %(default)s)")

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.server = RedisServer(workdir)
        self.started = False

    def start(self) -> None:
        if package_version("redis") is None:
            raise ServiceError("the Python package redis is not installed: pip install redis")
        self.server.start()
        self.started = True

    def stop(self) -> None:
        self.server.stop()

    def info(self) -> dict:
        out: dict = {"redis_py": package_version("redis")}
        try:
            out["redis_server"] = self.server.version()
        except (OSError, subprocess.SubprocessError) as exc:  # not installed, or hung
            out["redis_server"] = f"unknown ({exc})"
        if self.started:
            try:
                out["redis_memory_at_end"] = self.server.memory_info()
            except Exception:
                pass
        return out

    def worker_cfg(self) -> dict:
        return redis_worker_cfg(self.server.url, self.args)

    def cell(self, cell: dict, cfg: dict) -> contextlib.AbstractContextManager[None]:
        # a leak check; also empties the server for the next cell
        return leak_check(cell, "redis_keys_left", "redis-server", self.server.keys_left)
