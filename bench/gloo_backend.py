"""The gloo peer of bench/comm.py: torch.distributed with the gloo backend, on CPU tensors.

n separate worker processes (like zipcomm and redis) meet with ``init_process_group("gloo",
init_method="tcp://127.0.0.1:<free port>")``; gloo's own connections are pinned to the loopback
interface (``GLOO_SOCKET_IFNAME=lo`` unless set).  Operations, on ``torch.from_numpy`` views of
the int64 arrays (no copies):

* ``broadcast``: ``dist.broadcast(src=0)`` into a tensor the other ranks allocate once per cell;
* ``reduce``: ``dist.reduce(dst=0)``, in place on the contribution (gloo's only form: the other
  ranks' inputs are used as scratch space, which the round loop allows);
* ``allreduce``: ``dist.all_reduce``, in place on the contribution;
* ``shuffle``: the partition of bench/_partition.py (``item % n``, as zipcomm and redis), then
  ``dist.all_to_all_single`` of the per-destination counts and ``dist.all_to_all_single`` with
  those split sizes of the items (gloo implements all_to_all_single on CPU);
* ``barrier``: ``dist.barrier()``.

Install: ``pip install torch==2.13.0`` (a CPU wheel is enough).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import numpy as np

from bench._backends import Backend, package_version
from bench._partition import gathered_parts
from bench._services import ServiceError, free_port
from bench._worker import Deadline, Unavailable, WorkerBackend, payload_items


class GlooBackend(WorkerBackend):
    """One rank (bench._worker protocol)."""

    def __init__(self, cfg: dict, dl: Deadline) -> None:
        super().__init__(cfg, dl)
        self.dist: Any = None
        self.buf: Any = None

    async def open(self) -> None:
        try:
            import torch
            import torch.distributed as dist
        except Exception as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        if not dist.is_available() or not dist.is_gloo_available():
            raise Unavailable(f"torch {torch.__version__} was built without gloo")
        self.torch = torch
        dist.init_process_group("gloo", init_method=self.cfg["init_method"], rank=self.rank,
                                world_size=self.n,
                                timeout=datetime.timedelta(seconds=self.dl.left()))
        self.dist = dist
        if self.cfg["op"] == "broadcast" and self.rank != 0:
            self.buf = np.empty(payload_items(self.cfg), dtype=np.int64)

    async def barrier(self) -> None:
        self.dist.barrier()

    async def broadcast(self, payload: np.ndarray) -> Any:
        buf = payload if self.rank == 0 else self.buf
        self.dist.broadcast(self.torch.from_numpy(buf), src=0)
        return buf

    async def reduce(self, x: np.ndarray) -> Any:
        self.dist.reduce(self.torch.from_numpy(x), dst=0)
        return x if self.rank == 0 else None

    async def allreduce(self, x: np.ndarray) -> Any:
        self.dist.all_reduce(self.torch.from_numpy(x))
        return x

    async def shuffle(self, x: np.ndarray) -> np.ndarray:
        from_numpy = self.torch.from_numpy
        send, send_counts = gathered_parts(x, self.n)
        recv_counts = np.empty(self.n, dtype=np.int64)
        self.dist.all_to_all_single(from_numpy(recv_counts), from_numpy(send_counts))
        out = np.empty(int(recv_counts.sum()), dtype=np.int64)
        self.dist.all_to_all_single(from_numpy(out), from_numpy(send),
                                    output_split_sizes=recv_counts.tolist(),
                                    input_split_sizes=send_counts.tolist())
        return out

    async def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()

    async def close_after_error(self) -> None:
        """Nothing that could block on the other ranks: the process exits right after."""


class Gloo(Backend):
    name = "gloo"
    worker = "bench.gloo_backend:GlooBackend"
    summary = "torch.distributed's gloo backend on CPU tensors, TCP on loopback"
    needs = "pip package torch (pip install torch==2.13.0)"

    def start(self) -> None:
        if package_version("torch") is None:
            raise ServiceError("torch is not installed: pip install torch==2.13.0")

    def info(self) -> dict:
        return {"torch": package_version("torch")}

    def env(self) -> dict[str, str]:
        return {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}

    @contextlib.contextmanager
    def cell(self, cell: dict, cfg: dict) -> Iterator[None]:
        # rank 0 listens there (torch's TCPStore); the port was free a moment ago
        cfg["init_method"] = f"tcp://127.0.0.1:{free_port()}"
        yield
