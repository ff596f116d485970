"""Turn text datasets into cirrus datasets (thesis figure 3.5: ``cirrus.load_libsvm``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from .dataset import DEFAULT_PARTITION_BYTES, Partition, write_dataset
from .loaders import SparseData, iter_libsvm, parse_libsvm


def _partition(data: SparseData, n_features: int) -> Partition:
    return Partition(data.labels, indptr=data.indptr, indices=data.indices, values=data.values,
                     n_features=n_features)


async def load_libsvm_async(local_path: str | os.PathLike[str], dataset_uri: str, *,
                            n_features: int | None = None, zero_based: bool | str = "auto",
                            partition_bytes: int = DEFAULT_PARTITION_BYTES,
                            rows_per_chunk: int = 100_000,
                            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Convert a LIBSVM file into a dataset at ``dataset_uri`` (a folder or ``s3://...``);
    labels are kept. With ``n_features`` given (and explicit ``zero_based``) the file is
    streamed in chunks, so it may be larger than memory; otherwise it is parsed whole to learn
    the feature count. ``progress(n)``: called with the partitions written so far. Returns the
    dataset's manifest."""
    if n_features is not None and zero_based != "auto":
        chunks = (_partition(c, n_features) for c in
                  iter_libsvm(local_path, rows_per_chunk, n_features=n_features, zero_based=zero_based))
        return await write_dataset(dataset_uri, chunks, partition_bytes=partition_bytes, progress=progress)
    data = await asyncio.to_thread(parse_libsvm, local_path, n_features=n_features, zero_based=zero_based)
    return await write_dataset(dataset_uri, _partition(data, data.n_features), partition_bytes=partition_bytes,
                               progress=progress)


def load_libsvm(local_path: str | os.PathLike[str], dataset_uri: str, **kwargs: Any) -> dict[str, Any]:
    """Blocking :func:`load_libsvm_async` (for scripts and notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(load_libsvm_async(local_path, dataset_uri, **kwargs))
    raise RuntimeError("load_libsvm() called from a running event loop: await load_libsvm_async()")
