"""The MPI peer of bench/comm.py: mpi4py on Open MPI, every rank of a cell started by one mpirun.

Operations (int64 numpy buffers, the buffer interface: no pickling, no copies by mpi4py):

* ``broadcast``: ``Bcast`` from rank 0 into a receive buffer the other ranks allocate once per cell;
* ``reduce``: ``Reduce(op=SUM, root=0)`` into a buffer rank 0 allocates once per cell;
* ``allreduce``: ``Allreduce(op=SUM)`` into a buffer every rank allocates once per cell;
* ``shuffle``: the partition of bench/_partition.py (``item % n``, as zipcomm and redis), then
  ``Alltoall`` of the per-destination counts and ``Alltoallv`` of the items into a new array;
* ``barrier``: ``Barrier``.

Allocating receive buffers once is what an MPI program does; zipcomm and redis hand out new
arrays instead.  mpirun's options come from ``--mpirun-args`` (default ``DEFAULT_ARGS``: the
shared-memory transport).  A rank that fails reports the error and calls ``MPI_Abort`` so that
mpirun stops the others; a cell that hangs is killed by bench/_launch.py at the deadline (MPI
calls take no timeout).

Install: ``apt-get install openmpi-bin libopenmpi-dev`` then ``pip install mpi4py``.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import uuid
from typing import Any

import numpy as np

from bench._backends import Backend, package_version
from bench._launch import run_mpirun
from bench._partition import gathered_parts
from bench._services import ServiceError
from bench._worker import EXIT_ERROR, Deadline, Unavailable, WorkerBackend, payload_items

# Shared memory between the ranks of one host: the "vader" BTL, with CMA single-copy
# (process_vm_readv) for large messages, both Open MPI 4's defaults on one host; naming it keeps
# the TCP/OFI/openib BTLs from starting at all.  Placement stays Open MPI's default, as MPI users
# get it: each rank bound to a core while n <= cores, unbound and yielding the CPU when waiting if
# oversubscribed.  (Measured here: "--bind-to none" at n=2 turns 100 B ops from microseconds into
# milliseconds whenever other load shares the cores, because the waiting ranks spin; CMA beat
# btl_vader_single_copy_mechanism=none for 100 MB; adding the tcp/ofi BTLs gained nothing.)
DEFAULT_ARGS = "--mca btl self,vader"
RANK_ENV = "OMPI_COMM_WORLD_RANK"  # where Open MPI's mpirun passes the rank to each process


class MpiBackend(WorkerBackend):
    """One rank (bench._worker protocol)."""

    def __init__(self, cfg: dict, dl: Deadline) -> None:
        super().__init__(cfg, dl)
        self.comm: Any = None
        self.buf: np.ndarray | None = None

    async def open(self) -> None:
        try:
            from mpi4py import MPI  # MPI_Init
        except Exception as exc:  # not installed, or no libmpi it can load
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        if (self.comm.Get_rank(), self.comm.Get_size()) != (self.rank, self.n):
            raise RuntimeError(f"MPI says rank {self.comm.Get_rank()} of {self.comm.Get_size()}, "
                               f"the bench says rank {self.rank} of {self.n}")
        op = self.cfg["op"]
        if (op == "broadcast" and self.rank != 0) or op == "allreduce" \
                or (op == "reduce" and self.rank == 0):
            self.buf = np.empty(payload_items(self.cfg), dtype=np.int64)

    async def barrier(self) -> None:
        self.comm.Barrier()

    async def broadcast(self, payload: np.ndarray) -> Any:
        buf = payload if self.rank == 0 else self.buf
        self.comm.Bcast(buf, root=0)
        return buf

    async def reduce(self, x: np.ndarray) -> Any:
        self.comm.Reduce(x, self.buf, op=self.MPI.SUM, root=0)
        return self.buf if self.rank == 0 else None

    async def allreduce(self, x: np.ndarray) -> Any:
        self.comm.Allreduce(x, self.buf, op=self.MPI.SUM)
        return self.buf

    async def shuffle(self, x: np.ndarray) -> np.ndarray:
        t = self.MPI.INT64_T
        send, send_counts = gathered_parts(x, self.n)
        recv_counts = np.empty(self.n, dtype=np.int64)
        self.comm.Alltoall(send_counts, recv_counts)
        out = np.empty(int(recv_counts.sum()), dtype=np.int64)
        self.comm.Alltoallv([send, (send_counts, _displacements(send_counts)), t],
                            [out, (recv_counts, _displacements(recv_counts)), t])
        return out

    async def close(self) -> None:
        """Nothing: mpi4py calls MPI_Finalize when the process exits."""

    async def close_after_error(self) -> None:
        """Nothing that could block on the other ranks: :meth:`abort` follows."""

    def abort(self) -> None:
        if self.comm is not None:
            self.comm.Abort(EXIT_ERROR)


def _displacements(counts: np.ndarray) -> np.ndarray:
    out = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=out[1:])
    return out


class Mpi(Backend):
    name = "mpi"
    worker = "bench.mpi_backend:MpiBackend"
    launch = "mpirun"
    summary = "mpi4py on Open MPI (Bcast, Reduce, Allreduce, Alltoallv), shared memory"
    needs = "Debian packages openmpi-bin libopenmpi-dev, pip package mpi4py"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--mpirun", default="mpirun", help="mpi backend: Open MPI's mpirun, "
                            "run as `MPIRUN --allow-run-as-root --oversubscribe MPIRUN_ARGS -n N "
                            "...` (default: %(default)s)")
        parser.add_argument("--mpirun-args", default=DEFAULT_ARGS, help="mpi backend: more "
                            "mpirun options, e.g. MCA parameters (default: %(default)r)")

    def __init__(self, args: argparse.Namespace, workdir: Any) -> None:
        super().__init__(args, workdir)
        self.extra = shlex.split(args.mpirun_args)
        self.mpirun = args.mpirun
        self.version = None

    def start(self) -> None:
        path = shutil.which(self.mpirun)
        if path is None:
            raise ServiceError(f"{self.mpirun} not found on PATH: install Open MPI (Debian: "
                               f"apt-get install openmpi-bin libopenmpi-dev)")
        self.mpirun = path
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServiceError(f"{path} --version failed: {exc}") from exc
        self.version = (out.stdout.strip().splitlines() or ["?"])[0]
        if "Open MPI" not in self.version:  # the options below are Open MPI's
            raise ServiceError(f"{path} is not Open MPI's mpirun: {self.version}")
        if package_version("mpi4py") is None:
            raise ServiceError("mpi4py is not installed: pip install mpi4py")

    def info(self) -> dict:
        return {"mpi_library": self.version, "mpi4py": package_version("mpi4py"),
                "mpirun_command": self.command()}

    def command(self) -> list[str]:
        return [self.mpirun, "--allow-run-as-root", "--oversubscribe", *self.extra]

    async def run_ranks(self, cfg: dict, n: int, timeout: float) -> tuple[list[tuple], list[int], str]:
        outdir = self.workdir / f"mpirun-{uuid.uuid4().hex[:8]}"
        return await run_mpirun(self.command(), dict(cfg, rank=None, rank_env=RANK_ENV), n,
                                timeout, outdir, self.env())
