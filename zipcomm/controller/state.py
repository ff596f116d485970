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

Push = tuple[int, Message]


@dataclass(slots=True)
class MemberRecord:
    member: int
    address: str
    host: str

    def wire(self, role: str) -> list:
        return [self.member, self.address, self.host, role]


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
        self.members: dict[int, MemberRecord] = {}
        self.channels: dict[str, ChannelMeta] = {}
        self.member_channels: dict[int, set[str]] = {}

    # -- sessions ------------------------------------------------------------

    def hello(self, member: int, address: str, host: str) -> None:
        self.members[member] = MemberRecord(member, address, host)
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
        if kind not in KINDS:
            raise MembershipError(f"unknown channel kind {kind!r}", channel=channel, member=member)
        if role not in ROLES:
            raise MembershipError(f"unknown role {role!r}", channel=channel, member=member)
        if member not in self.members:
            raise MembershipError("join before hello", channel=channel, member=member)
        meta = self.channels.get(channel)
        if meta is None:
            meta = ChannelMeta(channel, kind, Tree(self.fanout, self.depth_slack), epoch=epoch_hint)
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
        meta.epoch = max(meta.epoch, epoch_hint)
        meta.roles[member] = role
        self.member_channels[member].add(channel)
        changes = meta.tree.join(member)
        pushes = self._apply(meta, changes)
        own = next(m for target, m in pushes if target == member)
        rest = [(t, m) for t, m in pushes if t != member]
        return self._rewire_dict(own), rest  # type: ignore[arg-type]

    def leave(self, member: int, channel: str) -> list[Push]:
        meta = self.channels.get(channel)
        if meta is None or member not in meta.tree:
            raise MembershipError("not a member", channel=channel, member=member)
        self.member_channels.get(member, set()).discard(channel)
        return self._remove(channel, member, graceful=True)

    def root(self, channel: str) -> dict:
        meta = self._meta(channel)
        root = meta.tree.root
        return {"epoch": meta.epoch, "term": meta.term, "root": self._wire(meta, root)}

    def member_list(self, channel: str) -> dict:
        meta = self._meta(channel)
        members = sorted(meta.tree)
        return {"epoch": meta.epoch, "members": [self._wire(meta, m) for m in members]}

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

    def _apply(self, meta: ChannelMeta, changes: Changes) -> list[Push]:
        meta.epoch += 1
        if changes.root_changed:
            meta.term = meta.epoch
        pushes: list[Push] = []
        for rw in changes.rewires:
            pushes.append(
                (
                    rw.member,
                    Rewire(
                        channel=meta.name,
                        epoch=meta.epoch,
                        parent=self._wire(meta, rw.parent) if rw.parent is not None else None,
                        children=[self._wire(meta, c) for c in rw.children],
                        depth=rw.depth,
                        term=meta.term,
                        removed=changes.removed,
                    ),
                )
            )
        return pushes

    def _wire(self, meta: ChannelMeta, member: int) -> list:
        return self.members[member].wire(meta.roles.get(member, "member"))

    @staticmethod
    def _rewire_dict(msg: Rewire) -> dict:
        return {
            "epoch": msg.epoch,
            "parent": msg.parent,
            "children": msg.children,
            "depth": msg.depth,
            "term": msg.term,
        }
