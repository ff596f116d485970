"""Records between a member process and its host's daemon (Unix socket).

Large numpy arrays do not travel on the socket: they sit in the daemon's
shared-memory arena and the records carry a *range* ``[offset, nbytes, dtype,
shape]``; everything else (small values, non-array payloads) travels inline in
``data`` as on any zipcomm connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..protocol.messages import Message, _bool, _int, _list, _str, op

Range = list  # [offset, nbytes, dtype str, shape list]


@op("d_hello")
@dataclass(slots=True)
class DHello(Message):
    member: int = _int()
    pid: int = _int()


@op("d_welcome")
@dataclass(slots=True)
class DWelcome(Message):
    daemon: int = _int()
    arena: str = _str()  # segment name ("" when the daemon has no arena)
    size: int = _int()


@op("d_join")
@dataclass(slots=True)
class DJoin(Message):
    req: int = _int()
    channel: str = _str()
    kind: str = _str()
    fn: str = _str("")


@op("d_leave")
@dataclass(slots=True)
class DLeave(Message):
    channel: str = _str()


@op("d_alloc")
@dataclass(slots=True)
class DAlloc(Message):
    req: int = _int()
    nbytes: int = _int()


@op("d_free")
@dataclass(slots=True)
class DFree(Message):
    """Give back ranges: allocated and not used, or delivered and no longer viewed."""

    offsets: list = _list()


@op("d_reply")
@dataclass(slots=True)
class DReply(Message):
    req: int = _int()
    ok: bool = _bool(True)
    error: str = _str("")
    result: Any = None


@op("d_send")
@dataclass(slots=True)
class DSend(Message):
    channel: str = _str()
    msg_id: int = _int()
    shm: list | None = None
    data: Any = None


@op("d_ack")
@dataclass(slots=True)
class DAck(Message):
    channel: str = _str()
    msg_id: int = _int()
    error: str = _str("")


@op("d_item")
@dataclass(slots=True)
class DItem(Message):
    """One item of the channel's stream, as the daemon delivered it. Members keep a
    bounded history of them: after a fallback they serve it to the tree like any node."""

    channel: str = _str()
    key: list = _list()
    prev: list = _list()
    kind: str = _str()
    meta: dict = field(default_factory=dict)
    shm: list | None = None
    data: Any = None


@op("d_reduce")
@dataclass(slots=True)
class DReduce(Message):
    channel: str = _str()
    round: int = _int()
    has_data: bool = _bool(False)
    want: bool = _bool(False)
    allreduce: bool = _bool(False)
    shm: list | None = None
    data: Any = None


@op("d_result")
@dataclass(slots=True)
class DResult(Message):
    channel: str = _str()
    round: int = _int()
    contributors: list = _list(list)
    error: str = _str("")
    shm: list | None = None
    data: Any = None


@op("d_share")
@dataclass(slots=True)
class DShare(Message):
    """A member's shuffle parts for members of this host: pieces of one range it holds.

    ``parts`` = ``[[member, byte offset in the range, shape], ...]`` (``dtype`` for all);
    the daemon gives each named member that has a session here a reference of its own on
    the range and a :class:`DPart`, and replies ``{"delivered": [member, ...]}``."""

    req: int = _int()
    channel: str = _str()
    round: int = _int()
    offset: int = _int()
    dtype: str = _str()
    parts: list = _list()


@op("d_part")
@dataclass(slots=True)
class DPart(Message):
    """One shuffle part from another member of this host: ``shm`` = ``[offset, nbytes,
    dtype, shape]`` inside range ``range``, on which this member now holds a reference."""

    channel: str = _str()
    round: int = _int()
    sender: int = _int()
    range: int = _int()
    shm: list = _list()
