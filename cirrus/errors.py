"""Exception taxonomy of cirrus (one module).

Every error about a stored object or a partition names it (its key or URI),
so a failure in a job of many partitions says which one is at fault.
"""

from __future__ import annotations

__all__ = [
    "CirrusError",
    "StorageError",
    "NotFound",
    "InvalidKey",
    "DatasetError",
    "IncompleteDataset",
    "PartitionError",
    "PartitionCorrupt",
    "PartitionVersionError",
]


class CirrusError(Exception):
    """Base class of every error raised by cirrus."""


class StorageError(CirrusError):
    """A dataset store (local folder or S3) failed or refused an operation."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class NotFound(StorageError):
    """The key does not exist in the store."""


class InvalidKey(StorageError, ValueError):
    """A key that could escape the store's root (``..``, absolute path, empty, ...)."""


class DatasetError(CirrusError):
    """A dataset (a folder / prefix with a manifest) is missing, incomplete or inconsistent."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class IncompleteDataset(DatasetError):
    """No manifest (a writer crashed or is still writing) or a partition it lists is missing."""


class PartitionError(CirrusError):
    """A partition could not be decoded. ``name`` is its key / URI."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class PartitionCorrupt(PartitionError):
    """Bad magic, truncated, inconsistent header, or checksum mismatch."""


class PartitionVersionError(PartitionError):
    """The partition was written in a format version this code does not read."""
