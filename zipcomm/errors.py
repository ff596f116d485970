"""The exception taxonomy of zipcomm.

Every error that zipcomm raises to an application is a :class:`ZipError`.
Errors that concern one collective carry the channel, epoch, round and member
they are about, so that a log line says exactly what failed.
"""

from __future__ import annotations

__all__ = [
    "ZipError",
    "ProtocolError",
    "FrameTooLarge",
    "LocalProtocolError",
    "RemoteProtocolError",
    "HandshakeError",
    "AuthenticationError",
    "ConnectionClosed",
    "ClosedByUs",
    "BrokenByPeer",
    "ZipTimeout",
    "CollectiveTimeout",
    "MembershipError",
    "ChannelClosed",
    "UnsupportedPayload",
    "RingError",
    "InvalidRingMemory",
    "RingCorrupt",
    "RecordTooLarge",
    "BufferTooSmall",
    "RingFull",
    "RingEmpty",
    "RingClosed",
    "ArenaError",
    "ArenaUnavailable",
    "ArenaFull",
    "ArenaAttachError",
]


class ZipError(Exception):
    """Base class of every zipcomm error."""


# --- protocol ---------------------------------------------------------------


class ProtocolError(ZipError):
    """A frame or message broke the wire protocol. The connection is closed."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix exceeds a configured limit (checked before allocating)."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.what = what
        self.size = size
        self.limit = limit


class HandshakeError(RemoteProtocolError):
    """The connection handshake failed (bad magic, version, or sequence)."""


class AuthenticationError(HandshakeError):
    """The peer could not prove knowledge of the shared secret (or we could not)."""


# --- connections ------------------------------------------------------------


class ConnectionClosed(ZipError):
    """The connection is closed; nothing more can be sent or received on it."""


class ClosedByUs(ConnectionClosed):
    """We closed the connection (aclose() was called)."""


class BrokenByPeer(ConnectionClosed):
    """The peer closed or reset the connection, or the transport failed."""


# --- collectives ------------------------------------------------------------


class ZipTimeout(ZipError, TimeoutError):
    """An operation did not finish before its deadline."""


class CollectiveTimeout(ZipTimeout):
    """A collective round did not complete before its deadline.

    Attributes say which channel, epoch and round stalled and, where known,
    which members had not delivered their part.
    """

    def __init__(
        self,
        message: str,
        *,
        channel: str,
        epoch: int | None = None,
        round: int | None = None,
        missing: list | tuple | None = None,
    ) -> None:
        detail = f"{message} [channel={channel!r} epoch={epoch} round={round}"
        if missing:
            detail += f" missing={list(missing)}"
        detail += "]"
        super().__init__(detail)
        self.channel = channel
        self.epoch = epoch
        self.round = round
        self.missing = list(missing or ())


class MembershipError(ZipError):
    """The controller refused or lost a membership (join, leave, stale incarnation)."""

    #: ``code`` values a program may act on
    ALREADY_MEMBER = "already_member"
    NO_SUCH_CHANNEL = "no_such_channel"

    def __init__(self, message: str, *, channel: str | None = None, member: object = None,
                 code: str = "") -> None:
        super().__init__(message if channel is None else f"{message} [channel={channel!r} member={member}]")
        self.channel = channel
        self.member = member
        self.code = code


class ChannelClosed(ZipError):
    """The channel handle was closed (or its runtime was); pending calls fail with this."""


class UnsupportedPayload(ZipError, TypeError):
    """A value that zipcomm cannot send (only msgpack types, numpy arrays, bytes and
    lists/tuples/dicts of them are allowed; nothing is ever pickled)."""


# --- shared-memory ring buffer (zipcomm.ring) --------------------------------


class RingError(ZipError):
    """Base class of the errors of a shared-memory ring (:mod:`zipcomm.ring`)."""


class InvalidRingMemory(RingError, ValueError):
    """The memory given for a ring is unusable: read-only, not contiguous, not 8-byte
    aligned, or too small (for any ring, or for the ring it holds)."""


class RingCorrupt(RingError):
    """The ring's memory does not hold a valid ring: bad magic, unsupported version,
    inconsistent header, positions or record lengths (garbage, or a misbehaving peer)."""


class RecordTooLarge(RingError, ValueError):
    """A record is larger than the ring's maximum record size; it could never be pushed."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"record of {size} bytes exceeds the ring's maximum record of {limit} bytes")
        self.size = size
        self.limit = limit


class BufferTooSmall(RingError, ValueError):
    """``pop_into()`` was given a buffer smaller than the next record (which stays in the ring)."""

    def __init__(self, needed: int, size: int) -> None:
        super().__init__(f"the next record has {needed} bytes but the buffer holds only {size}")
        self.needed = needed
        self.size = size


class RingFull(RingError, ZipTimeout):
    """``push_wait()``: the ring stayed too full for the record until the deadline."""


class RingEmpty(RingError, ZipTimeout):
    """``pop_wait()``: the ring stayed empty until the deadline."""


class RingClosed(RingError):
    """The ring handle was closed; it no longer refers to the memory."""


# --- shared-memory arena (zipcomm.shm) ---------------------------------------


class ArenaError(ZipError):
    """Base class of the errors of the daemon's shared-memory arena (:mod:`zipcomm.shm`);
    raised as such for a misuse: double free, unknown offset, closed arena."""


class ArenaUnavailable(ArenaError):
    """A segment could not be created: /dev/shm is full or missing, permission denied, or
    out of memory. The :class:`OSError` is the ``__cause__``; nothing is left behind."""


class ArenaFull(ArenaError):
    """No free range of the requested size right now (the arena may just be fragmented)."""

    def __init__(self, requested: int, largest_free: int, free_bytes: int) -> None:
        super().__init__(
            f"no free range of {requested} bytes in the arena "
            f"(largest free range {largest_free} bytes, {free_bytes} bytes free in all)"
        )
        self.requested = requested
        self.largest_free = largest_free
        self.free_bytes = free_bytes


class ArenaAttachError(ArenaError):
    """A member cannot attach to a segment: missing, wrong size, not a zipcomm segment name,
    open to other users, or permission denied (the :class:`OSError` is the ``__cause__``)."""
