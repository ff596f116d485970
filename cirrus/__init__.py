"""cirrus: end-to-end ML workflows on zipcomm (the data path so far: stores, datasets,
minibatch iterator, text loaders)."""

from .dataset import Partition, open_dataset, write_arrays, write_dataset
from .errors import (CirrusError, DatasetError, IncompleteDataset, NotFound, PartitionCorrupt,
                     PartitionError, PartitionVersionError, StorageError)
from .ingest import load_libsvm, load_libsvm_async
from .iterator import MinibatchIterator
from .loaders import LoadError, parse_criteo, parse_csv, parse_libsvm
from .storage import open_store

__all__ = [
    "load_libsvm", "load_libsvm_async", "open_dataset", "write_dataset", "write_arrays", "Partition",
    "MinibatchIterator", "open_store", "parse_libsvm", "parse_csv", "parse_criteo",
    "CirrusError", "StorageError", "NotFound", "DatasetError", "IncompleteDataset", "PartitionError",
    "PartitionCorrupt", "PartitionVersionError", "LoadError",
]
