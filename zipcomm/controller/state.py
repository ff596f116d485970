"""Controller state, sans-IO: channels, their trees, epochs, and who to tell.

Every entry point returns the pushes to carry out as ``(member_id, Message)``;
the server only executes them. Nothing here reads a clock or a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MembershipError
from ..protocol.messages import Gone, Message, Rewire
from ..topology import Changes, Tree

KINDS = ("broadcast", "reduce", "shuffle")
ROLES = ("sender", "receiver", "both", "member")
# Each request decodes its own copy of these strings: stored, they are swapped for one shared
# copy (160K members of a channel would otherwise keep 160K copies of "both").
_KIND_NAMES = {kind: kind for kind in KINDS}
_ROLE_NAMES = {role: role for role in ROLES}
_MEMBER = _ROLE_NAMES["member"]

Push = tuple[int, Message]


@dataclass(slots=True)
class ChannelMeta:
    name: str
    kind: str
    tree: Tree
    epoch: int
    term: int = 0
    roles: dict[int, str] = field(default_factory=dict)


class ControllerState:
    def __init__(self, fanout: int = 4, depth_slack: int = 1) -> None:
        self.fanout = fanout
        self.depth_slack = depth_slack
        # member -> how it goes on the wire, [id, "host:port", host id, role], with the role it last
        # had: a plain tuple (built once, sent in every rewire of its neighbours, and a tuple of
        # atoms is no work for the cyclic garbage collector).
        self.members: dict[int, tuple] = {}
        self.channels: dict[str, ChannelMeta] = {}
        self.member_channels: dict[int, set[str]] = {}

    # -- sessions ------------------------------------------------------------

    def hello(self, member: int, address: str, host: str) -> None:
        self.members[member] = (member, address, host, _MEMBER)
        self.member_channels.setdefault(member, set())

    def session_lost(self, member: int) -> list[Push]:
        """The member's session ended (crash, kill, or missed heartbeats)."""
        pushes: list[Push] = []
        for name in sorted(self.member_channels.pop(member, set())):
            pushes.extend(self._remove(name, member))
        self.members.pop(member, None)
        return pushes

    # -- requests ------------------------------------------------------------

    def join(self, member: int, channel: str, kind: str, role: str, epoch_hint: int) -> tuple[dict, list[Push]]:
        """Add ``member`` to ``channel`` (created on first join): its own place (the reply) and the
        pushes for the others (its new parent's rewire). O(log n) in the channel's size."""
        kind_name = _KIND_NAMES.get(kind)
        if kind_name is None:
            raise MembershipError(f"unknown channel kind {kind!r}", channel=channel, member=member)
        role_name = _ROLE_NAMES.get(role)
        if role_name is None:
            raise MembershipError(f"unknown role {role!r}", channel=channel, member=member)
        channels = self.member_channels.get(member)
        if channels is None:
            raise MembershipError("join before hello", channel=channel, member=member)
        meta = self.channels.get(channel)
        if meta is None:
            meta = ChannelMeta(channel, kind_name, Tree(self.fanout, self.depth_slack), epoch=epoch_hint)
            self.channels[channel] = meta
        elif meta.kind != kind:
            raise MembershipError(
                f"channel is a {meta.kind} channel, cannot join it as {kind}", channel=channel, member=member
            )
        if member in meta.tree:
            raise MembershipError("already a member", channel=channel, member=member,
                                  code=MembershipError.ALREADY_MEMBER)
        # After a controller restart members re-announce with the epoch they knew:
        # the rebuilt tree must live in a later epoch than anything they saw.
        if epoch_hint > meta.epoch:
            meta.epoch = epoch_hint
        meta.roles[member] = role_name
        channels.add(meta.name)
        changes = meta.tree.join(member)
        # _apply(meta, changes, skip=member), spelled out for the one or two rewires of a join: Tree.join
        # names the joiner first (a leaf: the reply tells it its place), then its new parent, if any.
        epoch = meta.epoch = meta.epoch + 1
        if changes.root_changed:
            meta.term = epoch
        term = meta.term
        (_, parent, _, depth), *others = changes.rewires
        wire = self._wire
        pushes: list[Push] = [
            (other, Rewire(meta.name, epoch, None if above is None else wire(meta, above), self._wires(meta, below),
                           level, term, None))
            for other, above, below, level in others
        ]
        return {
            "epoch": epoch,
            "parent": None if parent is None else wire(meta, parent),
            "children": [],
            "depth": depth,
            "term": term,
        }, pushes

    def leave(self, member: int, channel: str) -> list[Push]:
        meta = self.channels.get(channel)
        if meta is None or member not in meta.tree:
            raise MembershipError("not a member", channel=channel, member=member)
        self.member_channels.get(member, set()).discard(channel)
        return self._remove(channel, member, graceful=True)

    def root(self, channel: str) -> dict:
        meta = self._meta(channel)
        root = meta.tree.root
        return {"epoch": meta.epoch, "term": meta.term, "root": self._wire(meta, root), "members": len(meta.tree)}

    def channel_count(self, member: int) -> int:
        """How many channels ``member`` is in (0 for an unknown member)."""
        return len(self.member_channels.get(member, ()))

    def member_list(self, channel: str) -> dict:
        meta = self._meta(channel)
        members = sorted(meta.tree)
        return {"epoch": meta.epoch, "members": self._wires(meta, members)}

    def rebalance(self, channel: str) -> list[Push]:
        meta = self._meta(channel)
        if not meta.tree.needs_rebalance():
            return []
        return self._apply(meta, meta.tree.rebalance())

    # -- internals -----------------------------------------------------------

    def _meta(self, channel: str) -> ChannelMeta:
        meta = self.channels.get(channel)
        if meta is None or len(meta.tree) == 0:
            raise MembershipError("no such channel", channel=channel, code=MembershipError.NO_SUCH_CHANNEL)
        return meta

    def _remove(self, channel: str, member: int, graceful: bool = False) -> list[Push]:
        meta = self.channels[channel]
        changes = meta.tree.remove(member)
        meta.roles.pop(member, None)
        pushes = self._apply(meta, changes)
        if len(meta.tree) == 0:
            del self.channels[channel]
            return pushes
        # The root publishes departures in the channel stream (shuffle receivers stop
        # waiting for a dead sender); one extra message, O(1).
        pushes.append((meta.tree.root, Gone(channel=channel, epoch=meta.epoch, member=member, graceful=graceful)))
        if meta.tree.needs_rebalance():
            pushes.extend(self._apply(meta, meta.tree.rebalance()))
        return pushes

    def _apply(self, meta: ChannelMeta, changes: Changes, skip: int | None = None) -> list[Push]:
        """Bump the epoch and turn the tree's rewires into messages (``skip``'s excepted: a joiner
        gets its place in the reply)."""
        meta.epoch += 1
        if changes.root_changed:
            meta.term = meta.epoch
        wire, wires = self._wire, self._wires
        name, epoch, term, removed = meta.name, meta.epoch, meta.term, changes.removed
        return [
            (member, Rewire(name, epoch, None if parent is None else wire(meta, parent), wires(meta, children),
                            depth, term, removed))
            for member, parent, children, depth in changes.rewires
            if member != skip
        ]

    def _wire(self, meta: ChannelMeta, member: int) -> tuple:
        wired = self.members[member]
        role = meta.roles.get(member, _MEMBER)
        if wired[3] is not role:  # roles are interned: see _ROLE_NAMES
            wired = self.members[member] = (member, wired[1], wired[2], role)
        return wired

    def _wires(self, meta: ChannelMeta, ids) -> list[tuple]:
        """``[self._wire(meta, m) for m in ids]`` in one call (a rewire names up to fanout children)."""
        members, roles = self.members, meta.roles
        out = []
        for member in ids:
            wired = members[member]
            role = roles.get(member, _MEMBER)
            if wired[3] is not role:
                wired = members[member] = (member, wired[1], wired[2], role)
            out.append(wired)
        return out
