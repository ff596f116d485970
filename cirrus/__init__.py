"""cirrus: end-to-end ML workflows on zipcomm: datasets (local folder or S3), preprocessing jobs,
asynchronous SGD against a sharded parameter server, grid search."""

from .dataset import Partition, open_dataset, write_arrays, write_dataset
from .errors import (CirrusError, DatasetError, IncompleteDataset, NotFound, PartitionCorrupt,
                     PartitionError, PartitionVersionError, StorageError)
from .ingest import load_libsvm, load_libsvm_async
from .iterator import MinibatchIterator
from .loaders import LoadError, parse_criteo, parse_csv, parse_libsvm
from .preprocess import (MIN_MAX_SCALING, STANDARDIZATION, PreprocessError, feature_hashing,
                         feature_hashing_async, load_stats, normalize, normalize_async)
from .storage import open_store
from .training import LDA, CollaborativeFiltering, LogisticRegression, LRegression, Softmax, TrainingError
from .tuning import GridSearch

__all__ = [
    "load_libsvm", "load_libsvm_async", "open_dataset", "write_dataset", "write_arrays", "Partition",
    "MinibatchIterator", "open_store", "normalize", "normalize_async", "feature_hashing",
    "feature_hashing_async", "load_stats", "MIN_MAX_SCALING", "STANDARDIZATION", "PreprocessError", "parse_libsvm", "parse_csv", "parse_criteo",
    "CirrusError", "StorageError", "NotFound", "DatasetError", "IncompleteDataset", "PartitionError",
    "PartitionCorrupt", "PartitionVersionError", "LoadError",
    "LogisticRegression", "LRegression", "Softmax", "CollaborativeFiltering", "LDA", "TrainingError", "GridSearch",
]
