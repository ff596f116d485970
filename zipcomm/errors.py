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
