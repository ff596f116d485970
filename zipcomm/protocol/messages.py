"""Typed message records: one slotted dataclass per ``op``.

A record becomes a frame header (``{"op": OP, field: value, ...}``) plus raw
buffers; a record whose class has a ``data`` field carries an application value
packed out of band by :mod:`zipcomm.protocol.payload` (numpy arrays never copied).
Decoding validates presence and basic types, so a handler never probes dicts.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import RemoteProtocolError
from .frames import Frame
from .payload import pack_payload, unpack_payload

_REGISTRY: dict[str, type[Message]] = {}

# Field types we check on decode (msgpack gives lists for tuples).
_CHECKS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "str": (str,),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}
_INT = _CHECKS["int"]
_KIND_NAMES = {types: kind for kind, types in _CHECKS.items()}


@dataclass(slots=True)
class Message:
    OP: ClassVar[str] = ""

    def to_frame(self) -> tuple[dict, list]:
        spec = _spec(type(self))
        header: dict[str, Any] = {"op": self.OP}
        if not spec.has_data:
            header.update(zip(spec.names, spec.values(self)))
            return header, []
        buffers: list = []
        for name in spec.names:
            value = getattr(self, name)
            if name == "data":
                tree, buffers = pack_payload(value)
                header["data"] = tree
            else:
                header[name] = value
        return header, buffers

    @classmethod
    def from_frame(cls, frame: Frame) -> Message:
        header = frame.header
        kwargs: dict[str, Any] = {}
        for name, kinds, optional, required in _spec(cls).checks:
            if name not in header:
                if required:
                    raise RemoteProtocolError(f"message {cls.OP!r} lacks field {name!r}")
                continue
            value = header[name]
            if name == "data":
                value = unpack_payload(value, frame.buffers)
            elif kinds is not None and not (value is None and optional):
                if not isinstance(value, kinds) or (kinds is _INT and isinstance(value, bool)):
                    raise RemoteProtocolError(
                        f"message {cls.OP!r} field {name!r}: expected {_KIND_NAMES[kinds]}, got {type(value).__name__}"
                    )
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class _Spec:
    """What to_frame / from_frame need of a record class, computed once per class (dataclasses.fields()
    builds a fresh tuple on every call, which cost more than the rest of decoding a small message)."""

    names: tuple[str, ...]
    values: Callable[[Any], tuple]  # record -> its field values, in ``names`` order
    has_data: bool
    # (name, accepted types or None, None allowed, must be present)
    checks: tuple[tuple[str, tuple[type, ...] | None, bool, bool], ...]


_SPECS: dict[type, _Spec] = {}


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        fields = dataclasses.fields(cls)
        names = tuple(f.name for f in fields)
        spec = _SPECS[cls] = _Spec(
            names=names,
            # attrgetter of one name returns the value itself, of none fails: always ask a tuple
            values=operator.attrgetter(*names, "OP") if names else (lambda record: ()),
            has_data="data" in names,
            checks=tuple(
                (
                    f.name,
                    _CHECKS[f.metadata["kind"]] if "kind" in f.metadata else None,
                    bool(f.metadata.get("optional")),
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                )
                for f in fields
            ),
        )
    return spec


def op(name: str):
    """Class decorator: register a record under its wire ``op`` tag."""

    def register(cls: type[Message]) -> type[Message]:
        if name in _REGISTRY:
            raise RuntimeError(f"op {name!r} registered twice")
        cls.OP = name
        _REGISTRY[name] = cls
        return cls

    return register


def decode(frame: Frame) -> Message:
    """Turn a frame into its record; an unknown op is the peer's protocol error."""
    cls = _REGISTRY.get(frame.header.get("op"))
    if cls is None:
        raise RemoteProtocolError(f"unknown op {frame.header.get('op')!r}")
    return cls.from_frame(frame)


def _int(optional: bool = False, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"kind": "int", "optional": optional})


def _str(default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"kind": "str"})


def _list(default_factory: Any = dataclasses.MISSING) -> Any:
    if default_factory is dataclasses.MISSING:
        return field(metadata={"kind": "list"})
    return field(default_factory=default_factory, metadata={"kind": "list"})


def _bool(default: Any = False) -> Any:
    return field(default=default, metadata={"kind": "bool"})


# A member on the wire: [member_id, "host:port", host_id, role]
MemberWire = list


# --- member <-> controller ---------------------------------------------------


@op("hello")
@dataclass(slots=True)
class Hello(Message):
    member: int = _int()
    address: str = _str()
    host: str = _str()


@op("welcome")
@dataclass(slots=True)
class Welcome(Message):
    heartbeat: float = field(default=1.0)
    timeout: float = field(default=5.0)


@op("ping")
@dataclass(slots=True)
class Ping(Message):
    pass


@op("join")
@dataclass(slots=True)
class Join(Message):
    """Member -> controller. ``member`` set: join for a member this session hosts (see below).

    A session may host members besides the one its hello named (one process holding several
    handles of a channel, each its own member with the session's address and host). The first
    join naming such a ``member`` registers it on the session; it is dropped when it has left all
    its channels or when the session ends. Pushes for a hosted member carry ``to`` = its id; a
    peer that never sets ``member`` never sees ``to`` set. Requests on one session are answered
    in order, so a member may send many joins without waiting (pipelining)."""

    req: int = _int()
    channel: str = _str()
    kind: str = _str()
    role: str = _str()
    epoch_hint: int = _int()
    member: int | None = _int(optional=True, default=None)


@op("leave")
@dataclass(slots=True)
class Leave(Message):
    req: int = _int()
    channel: str = _str()
    member: int | None = _int(optional=True, default=None)  # a hosted member (see Join)


@op("lookup_root")
@dataclass(slots=True)
class LookupRoot(Message):
    req: int = _int()
    channel: str = _str()


@op("list_members")
@dataclass(slots=True)
class ListMembers(Message):
    req: int = _int()
    channel: str = _str()


@op("reply")
@dataclass(slots=True)
class Reply(Message):
    """Answer to a request: ``result`` is a dict whose meaning depends on the request."""

    req: int = _int()
    ok: bool = _bool(True)
    result: dict = field(default_factory=dict, metadata={"kind": "dict"})
    error: str = _str("")
    code: str = _str("")


@op("rewire")
@dataclass(slots=True)
class Rewire(Message):
    """Controller -> member: your new place in a channel tree (after an epoch bump)."""

    channel: str = _str()
    epoch: int = _int()
    parent: list | None = field(default=None, metadata={"kind": "list", "optional": True})
    children: list = _list(list)
    depth: int = _int(default=0)
    term: int = _int(default=0)
    removed: int | None = _int(optional=True, default=None)
    to: int | None = _int(optional=True, default=None)  # the hosted member this is for (see Join)

    def to_frame(self) -> tuple[dict, list]:
        # Message.to_frame spelled out (same header, same key order): the controller sends one
        # rewire per join.
        return {"op": "rewire", "channel": self.channel, "epoch": self.epoch, "parent": self.parent,
                "children": self.children, "depth": self.depth, "term": self.term, "removed": self.removed,
                "to": self.to}, []


@op("gone")
@dataclass(slots=True)
class Gone(Message):
    """Controller -> root: ``member`` left or failed (the root publishes it)."""

    channel: str = _str()
    epoch: int = _int()
    member: int = _int()
    graceful: bool = _bool(False)
    to: int | None = _int(optional=True, default=None)  # the hosted member this is for (see Join)


# --- member <-> member -------------------------------------------------------


@op("peer_hello")
@dataclass(slots=True)
class PeerHello(Message):
    member: int = _int()
    address: str = _str("")


@op("quiesce")
@dataclass(slots=True)
class Quiesce(Message):
    """Peer -> peer: answer once you processed everything I sent before this."""

    token: int = _int()


@op("quiesce_ack")
@dataclass(slots=True)
class QuiesceAck(Message):
    token: int = _int()


@op("link")
@dataclass(slots=True)
class Link(Message):
    """Child -> new parent: where I stand in the stream and in reduce rounds."""

    channel: str = _str()
    epoch: int = _int()
    member: int = _int()
    last_key: list = _list()
    sent_up_to: int = _int()
    fresh: bool = _bool(False)


@op("link_ack")
@dataclass(slots=True)
class LinkAck(Message):
    channel: str = _str()
    epoch: int = _int()
    last_key: list = _list()
    next_round: int = _int()
    list_round: int = _int()


@op("item")
@dataclass(slots=True)
class Item(Message):
    """One entry of a channel's ordered stream (broadcast data, round results, lists)."""

    channel: str = _str()
    key: list = _list()
    prev: list = _list()
    kind: str = _str()
    meta: dict = field(default_factory=dict, metadata={"kind": "dict"})
    data: Any = None


@op("up_done")
@dataclass(slots=True)
class UpDone(Message):
    channel: str = _str()


@op("submit")
@dataclass(slots=True)
class Submit(Message):
    """Sender -> root: please sequence this broadcast (``origin``/``msg_id`` dedup)."""

    channel: str = _str()
    origin: int = _int()
    msg_id: int = _int()
    # one part of a large array, sent as parts: [i, n, dtype str, shape] (``data``: its bytes)
    part: list | None = field(default=None, metadata={"kind": "list", "optional": True})
    data: Any = None


@op("need_list")
@dataclass(slots=True)
class NeedList(Message):
    channel: str = _str()
    round: int = _int()


@op("piece")
@dataclass(slots=True)
class Piece(Message):
    """Part of a reduce round travelling up the tree (an atomic set of contributors)."""

    channel: str = _str()
    round: int = _int()
    contributors: list = _list()
    wants: list = _list(list)
    late: bool = _bool(False)
    allreduce: bool = _bool(False)
    fn: str = _str("")
    data: Any = None


@op("sync_done")
@dataclass(slots=True)
class SyncDone(Message):
    channel: str = _str()


@op("result")
@dataclass(slots=True)
class Result(Message):
    channel: str = _str()
    round: int = _int()
    contributors: list = _list()
    data: Any = None


@op("part")
@dataclass(slots=True)
class Part(Message):
    channel: str = _str()
    round: int = _int()
    sender: int = _int()
    data: Any = None
