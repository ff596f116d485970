"""cirrus's sharded parameter server (:mod:`cirrus.ps.shard`) and its client (:mod:`cirrus.ps.client`)."""

from .client import PSClient, Retired
from .shard import PSError, Shard

__all__ = ["PSClient", "Retired", "PSError", "Shard"]
