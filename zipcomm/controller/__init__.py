"""The zipcomm controller: channel membership and tree topology (never on a data path)."""

from .server import Controller
from .state import ControllerState

__all__ = ["Controller", "ControllerState"]
