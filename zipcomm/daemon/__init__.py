"""The optional per-host daemon (``python -m zipcomm.daemon``): shared-memory
delivery between the members of one host, one tree member per host."""

from .server import Daemon

__all__ = ["Daemon"]
