"""Controller state, sans-IO: channels, their trees, epochs, and who to tell.

Every entry point returns the pushes to carry out as ``(member_id, Message)``;
the server only executes them. Nothing here reads a clock or a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """A channel; its tree keeps each member's wire entry, with the member's role in this channel."""

    name: str
    kind: str
    tree: Tree
    epoch: int
    term: int = 0


class ControllerState:
    def __init__(self, fanout: int = 4, depth_slack: int = 1) -> None:
        self.fanout = fanout
        self.depth_slack = depth_slack
        # member -> how it goes on the wire, [id, "host:port", host id, role], with the role it last
        # joined with: a plain tuple (a tuple of atoms is no work for the cyclic garbage collector).
        # Each channel's tree keeps the entry of each of its members (with its role there) and
        # sends that in every rewire naming it: a member joining many channels with one role
        # shares one tuple among them.
        self.members: dict[int, tuple] = {}
        self.channels: dict[str, ChannelMeta] = {}
        self.member_channels: dict[int, set[str]] = {}

    # -- sessions ------------------------------------------------------------

    def hello(self, member: int, address: str, host: str) -> None:
        members = self.members
        old = members.get(member)
        members[member] = (member, address, host, _MEMBER)
        if old is None:
            self.member_channels[member] = set()
        elif old[1] != address or old[2] != host:
            # A new address: the channels' wire entries follow (O(channels), on a reconnect only).
            for name in self.member_channels[member]:
                tree = self.channels[name].tree
                tree.set_data(member, (member, address, host, tree.data(member)[3]))

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
        wired = self.members[member]
        if wired[3] is not role_name:  # roles are interned: see _ROLE_NAMES
            wired = self.members[member] = (member, wired[1], wired[2], role_name)
        channels.add(meta.name)
        # _apply(meta, meta.tree.join(member), skip=member), spelled out for the one or two rewires of
        # a join, with the wire entries straight from the tree: the reply tells the joiner (a leaf)
        # its place, the push tells its new parent, if any, its neighbourhood.
        placed = meta.tree.join_data(member, wired)
        epoch = meta.epoch = meta.epoch + 1
        if placed is None:  # the first member: the root, alone
            meta.term = epoch
            return {"epoch": epoch, "parent": None, "children": [], "depth": 0, "term": epoch}, []
        parent, parent_wire, depth, above, below, level = placed
        term = meta.term
        return {
            "epoch": epoch,
            "parent": parent_wire,
            "children": [],
            "depth": depth,
            "term": term,
        }, [(parent, Rewire(meta.name, epoch, above, below, level, term, None))]

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

    @staticmethod
    def _wire(meta: ChannelMeta, member: int) -> tuple:
        return meta.tree.data(member)

    @staticmethod
    def _wires(meta: ChannelMeta, ids) -> list[tuple]:
        """``[self._wire(meta, m) for m in ids]``."""
        data = meta.tree.data
        return [data(member) for member in ids]
