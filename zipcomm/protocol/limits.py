"""Protocol constants and the size limits every decoder enforces.

All wire constants live here so that the frame codec, the handshake and any
future encoder agree on one definition.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "MAGIC",
    "VERSION",
    "PREFIX",
    "PREFIX_SIZE",
    "KNOWN_FLAGS",
    "Limits",
    "DEFAULT_LIMITS",
]

MAGIC = b"ZIPC"
VERSION = 1

# magic, version, flags, reserved, header_len, buffers_len.  Little-endian and
# unpadded so that the layout is the same on every platform.
PREFIX = struct.Struct("<4sBBHIQ")
PREFIX_SIZE = PREFIX.size  # 20

# No frame flags are defined in version 1; a peer that sets one is speaking a
# protocol we do not understand, and ignoring it could silently drop meaning.
KNOWN_FLAGS = 0

_U32_MAX = (1 << 32) - 1
# numpy cannot allocate more than its signed index type spans.
_INTP_MAX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds on what a peer may make us allocate or parse.

    ``max_header`` bounds the msgpack header (the whole of a control frame),
    ``max_buffers`` the sum of raw buffer bytes in one frame, and
    ``max_buffer_count`` the number of raw buffers.  ``max_depth`` bounds the
    nesting of payload trees: msgpack itself accepts 1024 levels, deeper than
    Python's recursion limit, so the payload walker needs its own bound.
    """

    max_header: int = 1 << 20
    max_buffers: int = 4 << 30
    max_buffer_count: int = 4096
    max_depth: int = 100

    def __post_init__(self) -> None:
        for name, upper in (
            ("max_header", _U32_MAX),
            ("max_buffers", _INTP_MAX),
            ("max_buffer_count", _U32_MAX),
            ("max_depth", 1000),
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= upper:
                raise ValueError(f"Limits.{name} must be an int in 1..{upper}, got {value!r}")

    def unpacker_caps(self, header_len: int) -> dict[str, int]:
        """msgpack ``unpackb`` keyword caps for a header of ``header_len`` bytes.

        Every msgpack element takes at least one byte (a map entry two), so a
        declared length beyond these caps can only be a lie meant to make the
        unpacker preallocate.
        """
        n = min(header_len, self.max_header)
        return {
            "max_str_len": n,
            "max_bin_len": n,
            "max_ext_len": n,
            "max_array_len": n,
            "max_map_len": n // 2,
        }


DEFAULT_LIMITS = Limits()

#: arrays smaller than this travel inline between a member and its host daemon: a shared-memory
#: range costs a round trip to the daemon
SHM_MIN = 64 << 10
