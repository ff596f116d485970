"""What every channel kind shares: its place in the tree, links to parent and
children, and the channel's ordered stream.

The stream is a totally ordered log of items (broadcast data, reduce round
results, shuffle member lists, departures) keyed ``(term, n)``: the root of term
``term`` assigns ``n``. Items flow down the tree; every node keeps a bounded
history so that a child re-wired under it can catch up, and a child that is
ahead of its new parent pushes what it has upward (after a root failure the
survivors hold the longest prefix). Delivery is in key order, exactly once.

Re-wiring protocol (per new parent link, FIFO on the peer connection):
child -> parent ``link`` (its stream position and reduce progress); parent ->
child ``link_ack`` then the items the child misses; child -> parent the items
the parent misses, ``up_done``, the reduce pieces it must re-send, and
``sync_done`` once its own new children have synced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..errors import ChannelClosed, MembershipError
from ..protocol import messages as m
from . import parts

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("zipcomm.channels")

HISTORY_ITEMS = 256
HISTORY_BYTES = 128 << 20
PENDING_ITEMS = 4096
ROOT_SUBMIT_QUEUE = 4096
EARLY_LINKS = 4096
EARLY_PER_CHILD = 4096

Key = tuple[int, int]

@dataclass(slots=True)
class ChildState:
    member: int
    address: str
    role: str
    linked: bool = False
    up_done: bool = False
    synced: bool = False
    sent_up_to: int = -1
    first_round: int = 0


def _payload_size(data: Any) -> int:
    nbytes = getattr(data, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    return 64


class History:
    """The last items of a stream, bounded by count and bytes (at least one is kept). The count
    is of whole items: the parts of a large item after its first count as nothing (a child
    re-wired mid-stream needs as many items as before, whatever their size)."""

    def __init__(self, max_bytes: int = HISTORY_BYTES) -> None:
        self.items: collections.deque[m.Item] = collections.deque()
        self.nbytes = 0
        self.count = 0
        self.max_bytes = max_bytes

    def append(self, item: m.Item) -> None:
        self.items.append(item)
        self.nbytes += _payload_size(item.data)
        self.count += _counted(item)
        while self.count > HISTORY_ITEMS or (self.nbytes > self.max_bytes and len(self.items) > 1):
            old = self.items.popleft()
            self.nbytes -= _payload_size(old.data)
            self.count -= _counted(old)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _counted(item: m.Item) -> int:
    return 0 if item.kind == "p" and item.meta.get("i") else 1


async def get_or_stop(queue: asyncio.Queue, stop: Any, timeout: float | None) -> tuple[str, Any]:
    """Wait for the next item of ``queue`` unless the awaitable ``stop`` completes first or
    ``timeout`` passes: ("item", value), ("stop", None) or ("timeout", None). No item is lost:
    one taken is returned, the getter is cancelled otherwise."""
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stop)
    try:
        done, _ = await asyncio.wait([getter, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if getter in done:
        return "item", getter.result()
    getter.cancel()
    return ("stop", None) if stopper in done else ("timeout", None)


class ChannelCore:
    kind = ""

    def __init__(self, runtime: Runtime, name: str, role: str = "member") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a channel name is a non-empty string")
        self.rt = runtime
        self.name = name
        self.role = role
        self.me = runtime.member_id
        self.epoch = 0
        self.term = 0
        self.depth = 0
        self.parent: list | None = None  # [member, address, host, role]
        self.parent_linked = False
        self.is_root = False
        self.root_ready = False
        self.children: dict[int, ChildState] = {}
        # Link / UpDone / SyncDone of a child whose rewire reached it before ours reached
        # us: replayed in order when ours lands.
        self.early: dict[int, list[m.Message]] = {}
        self.fresh = True
        self.joined = asyncio.Event()
        self.closed = False
        self._need_sync_done = False
        # stream
        self.last_key: Key = (0, 0)
        self.history = History()
        self.pending: dict[Key, tuple[int | None, m.Item]] = {}  # by the key they follow
        self.last_published: Key = (0, 0)
        self.deferred: list = []
        self.next_n = 1
        self.submits: collections.deque[m.Submit] = collections.deque()
        self.last_msg: dict[int, int] = {}
        self.changed = asyncio.Event()  # pulsed on every state change a waiter may care about
        # large items: the part size (0: publish whole), the parts being received, and (root)
        # the arrays published as parts, by the key of their first part
        self.chunk_bytes = parts.CHUNK_BYTES
        self.assembler = parts.Assembler(name, runtime.buffers)
        # Root: while a large item is relayed part by part as it arrives, nothing else may come
        # between its parts in the stream: publish() defers to ``deferred`` (see ``release``).
        self.holding = False

    # -- lifecycle -----------------------------------------------------------

    def resume(self, last_key: tuple, history: Iterable[m.Item] = ()) -> None:
        """Before joining: this member already has the stream up to ``last_key`` (it
        received it through its host daemon, with the ``history`` that came before);
        it links as a returning member: it gets what follows from its parent's
        history, and serves its own to children that are behind."""
        self.fresh = False
        self.last_key = tuple(last_key)  # type: ignore[assignment]
        for item in history:
            self.history.append(item)

    async def aclose(self, graceful: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self._pulse()
        self._fail_waiters(ChannelClosed(f"channel {self.name!r} closed"))
        self.rt._forget(self)
        if graceful:
            await self.rt.quiesce()  # what we sent is handled before the tree learns we left
            try:
                await asyncio.wait_for(self.rt.request(m.Leave, channel=self.name), 5.0)
            except (MembershipError, TimeoutError):
                pass

    async def empty(self, shape: Any, dtype: Any = "float64") -> Any:
        """A writable array to fill and then send or contribute: a large one moves without a
        copy, and turns read-only once handed over. Through a host daemon it lives in shared
        memory; without one zipcomm keeps it as it is instead of taking a private copy."""
        return self.rt.buffers.empty(shape, dtype)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _fail_waiters(self, exc: BaseException) -> None:
        """Kinds override: fail pending futures with ``exc``."""

    def _pulse(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_changed(self) -> None:
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        await self.changed.wait()
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")

    # -- controller pushes ---------------------------------------------------

    def on_controller(self, msg: m.Message) -> None:
        if isinstance(msg, m.Rewire):
            self.on_rewire(msg)
        elif isinstance(msg, m.Gone) and self.is_root:
            self.publish("g", {"member": msg.member, "graceful": msg.graceful}, None)

    def on_rewire(self, msg: m.Rewire) -> None:
        log.debug("%x %s rewire epoch %d parent %s children %s", self.me, self.name, msg.epoch,
                  f"{msg.parent[0]:x}" if msg.parent else None, [f"{c[0]:x}" for c in msg.children])
        if msg.epoch < self.epoch:
            return  # an older re-wiring overtaken by a newer one
        self.epoch = msg.epoch
        self.depth = msg.depth
        was_root = self.is_root
        new_parent = msg.parent
        old_parent_id = self.parent[0] if self.parent else None
        new_parent_id = new_parent[0] if new_parent else None
        # children
        wanted = {c[0]: c for c in msg.children}
        for cid in list(self.children):
            if cid not in wanted:
                del self.children[cid]
        for cid, info in wanted.items():
            if cid not in self.children:
                self.children[cid] = ChildState(cid, info[1], info[3])
        # parent / root
        if new_parent_id is None:
            if not self.is_root:
                self.is_root = True
                self.term = msg.term
                self.root_ready = False
                self.parent = None
                self.parent_linked = False
                self._became_root()
            elif msg.term != self.term:  # root again, of a new term (a restarted controller)
                self.term = msg.term
                self.root_ready = False
        else:
            self.is_root = False
            self.root_ready = False
            if new_parent_id != old_parent_id or msg.term != self.term:
                self.parent = new_parent
                self.parent_linked = False
                self._link_to_parent()
            self.term = msg.term
            if was_root:
                # Broadcasts handed to us to sequence while we were not ready (e.g. during
                # a controller outage) go on up the tree, to the root that replaces us:
                # their senders must not wait for a resubmission deadline.
                while self.submits:
                    self.send_parent(self.submits.popleft())
        if self.is_root:
            self.joined.set()
        self._replay_early()
        self._check_root_ready()
        self._check_sync_done()
        self.progress()
        self._pulse()

    def _replay_early(self) -> None:
        if self.fresh:
            return
        for cid in [c for c in self.early if c in self.children]:
            for early in self.early.pop(cid):
                if isinstance(early, (m.Link, m.UpDone, m.SyncDone)):
                    self._on_child_message(cid, early)
                else:
                    self.on_early_message(cid, early)

    def suspend(self) -> None:
        """The controller session is lost. A root stops sequencing until the controller
        confirms its place: a restarted controller may already have made another member
        the root of a new term, and two roots would fork the stream."""
        self.root_ready = False

    def rebuilt(self) -> None:
        """The controller restarted without its state and this member has re-announced
        the channel: the tree is being rebuilt in a new term, one re-announcement at a
        time, so for a while it holds only some of the live members."""

    def unsuspend(self) -> None:
        """The controller kept its state across the outage: carry on as before."""
        self._check_root_ready()
        self.progress()

    def _link_to_parent(self) -> None:
        assert self.parent is not None
        self.send_parent(
            m.Link(channel=self.name, epoch=self.epoch, member=self.me, last_key=list(self.last_key),
                   fresh=self.fresh, sent_up_to=self.sent_up_to())
        )
        self.after_link_sent()
        self._need_sync_done = True

    def _became_root(self) -> None:
        if self.fresh:
            self.fresh = False
            self.first_join_as_root()
        self.after_became_root()

    def _check_root_ready(self) -> None:
        if not self.is_root or self.root_ready:
            return
        if all(c.up_done for c in self.children.values()):
            self.root_ready = True
            top = self.last_key
            if self.last_published[0] == self.term and self.last_published > top:
                top = self.last_published  # published before a suspension, not delivered yet
            self.next_n = top[1] + 1 if top[0] == self.term else 1
            self.last_published = top
            deferred, self.deferred = self.deferred, []
            for kind, meta, data in deferred:
                self.publish(kind, meta, data)
            while self.submits and self.root_ready:
                self._sequence(self.submits.popleft())
            self.on_root_ready()
            self.progress()  # rounds that waited only for the root to be ready

    def _check_sync_done(self) -> None:
        if not self._need_sync_done or self.parent is None:
            return
        if all(c.synced for c in self.children.values()):
            self._need_sync_done = False
            self.send_parent(m.SyncDone(channel=self.name))

    # -- peer messages -------------------------------------------------------

    async def on_peer(self, sender: int, msg: m.Message) -> None:
        if self.closed:
            return
        match msg:
            case m.Link() | m.UpDone() | m.SyncDone():
                if sender in self.children and not self.fresh:
                    self._on_child_message(sender, msg)
                elif isinstance(msg, m.Link) or sender in self.early:
                    # A child whose re-wiring reached it before ours reached us, or one
                    # that links while we have not joined ourselves (what we would tell
                    # it, our stream position and next round, is not known yet).
                    if sender in self.early or len(self.early) < EARLY_LINKS:
                        self.early.setdefault(sender, []).append(msg)
            case m.LinkAck():
                self._on_link_ack(sender, msg)
            case m.Item():
                await self._on_item(sender, msg)
            case m.Submit():
                self.on_submit(msg)
            case _:
                if (sender in self.early and sender not in self.children and self.holds_early(msg)
                        and len(self.early[sender]) < EARLY_PER_CHILD):
                    # From a child whose link waits for our re-wiring: what it sent after
                    # the link (e.g. its first reduce piece) is handled after it, in order.
                    self.early[sender].append(msg)
                else:
                    await self.on_kind_message(sender, msg)
        self._pulse()

    def _on_child_message(self, sender: int, msg: m.Message) -> None:
        child = self.children[sender]
        if isinstance(msg, m.Link):
            self._accept_link(msg)
        elif isinstance(msg, m.UpDone):
            child.up_done = True
            self._check_root_ready()
        else:
            child.synced = True
            self._check_sync_done()
            self.progress()

    def _accept_link(self, msg: m.Link) -> None:
        child = self.children[msg.member]
        child.linked = True
        child.up_done = False
        child.synced = False
        child.sent_up_to = msg.sent_up_to
        child.first_round = self.first_round_for_child() if msg.fresh else 0
        self.send_to_child(
            child,
            m.LinkAck(channel=self.name, epoch=self.epoch, last_key=list(self.last_key),
                      next_round=child.first_round, list_round=self.list_round()),
        )
        if not msg.fresh:
            their = tuple(msg.last_key)
            for item in self.history:
                if tuple(item.key) > their:
                    self.send_to_child(child, item)

    def _on_link_ack(self, sender: int, msg: m.LinkAck) -> None:
        if self.parent is None or self.parent[0] != sender:
            return
        self.parent_linked = True
        theirs = tuple(msg.last_key)
        if self.fresh:
            self.fresh = False
            self.last_key = theirs  # a newcomer receives what comes after its join, no replay
            self.first_join(msg.next_round, msg.list_round)
        else:
            for item in self.history:
                if tuple(item.key) > theirs:
                    self.send_parent(item)
        self.send_parent(m.UpDone(channel=self.name))
        self._replay_early()  # children that linked before we had joined
        self.joined.set()

    # -- the stream ----------------------------------------------------------

    async def _on_item(self, source: int | None, item: m.Item) -> None:
        # Items form a chain: each names the key before it, so an item of a new
        # root's term cannot overtake an older item still being repaired.
        key = tuple(item.key)
        if key <= self.last_key:
            return  # already delivered
        if tuple(item.prev) != self.last_key and not (
                parts.spans(item) and tuple(item.prev) < self.last_key < key and self.last_key[0] == key[0]):
            # (the exception: an item standing for parts of which we hold the first ones)
            if len(self.pending) >= PENDING_ITEMS:
                log.error("channel %s: stream gap at %s not filled; dropping %s", self.name, self.last_key, key)
                return
            self.pending.setdefault(tuple(item.prev), (source, item))  # type: ignore[arg-type]
            return
        await self._deliver(source, item)
        while (entry := self.pending.pop(self.last_key, None)) is not None:
            await self._deliver(*entry)

    async def _deliver(self, source: int | None, item: m.Item) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%x %s deliver %s after %s kind %s from %s", self.me, self.name, item.key, item.prev,
                      item.kind, f"{source:x}" if source else "-")
        if tuple(item.prev) != self.last_key:
            self.assembler.drop()  # a whole item replaces the parts we had of it
        self.last_key = tuple(item.key)  # type: ignore[assignment]
        self.history.append(item)
        for child in self.children.values():
            if child.linked and child.member != source:
                self.send_to_child(child, item)
        if source is not None and source != (self.parent[0] if self.parent else None):
            if self.parent is not None and self.parent_linked:
                self.send_parent(item)  # repair item from a child: flood toward the root
        if item.kind == "p":
            whole = self.assembler.add(item)
            if whole is None:
                self._pulse()
                return
            item = whole
        else:
            self.assembler.drop()
        if item.kind == "b":
            origin, msg_id = item.meta["origin"], item.meta["msg_id"]
            if msg_id > self.last_msg.get(origin, -1):
                self.last_msg[origin] = msg_id
        await self.on_item(item)
        self._pulse()  # items the root publishes itself arrive through no peer message

    def publish(self, kind: str, meta: dict, data: Any) -> None:
        """Root only: append an item to the stream (delivered here and sent down); a large array
        as parts (see ``parts``). Before the root has gathered its children's state the
        item waits."""
        assert self.is_root
        if not self.root_ready or self.holding:
            if len(self.deferred) < ROOT_SUBMIT_QUEUE:
                self.deferred.append((kind, meta, data))
            return
        if parts.splittable(data, self.chunk_bytes):
            (dt, shape), pieces = parts.split(data, self.chunk_bytes)
            self.assembler.whole[(self.term, self.next_n)] = data
            n = len(pieces)
            for i, piece in enumerate(pieces):
                self._publish_one("p", {"k": kind, "m": meta, "i": 0, "n": n, "dt": dt, "sh": shape} if i == 0
                                  else {"i": i, "n": n}, piece)
            return
        self._publish_one(kind, meta, data)

    def place_part(self, header: dict, descriptors: list) -> list | None:
        """Where a part of a large item is received (see ``parts.Assembler.place``)."""
        return self.assembler.place(header, descriptors, self.last_key)

    def release(self) -> None:
        """Root: the relayed item is complete (or abandoned): what waited for it follows."""
        self.holding = False
        if self.is_root and self.root_ready:
            deferred, self.deferred = self.deferred, []
            for kind, meta, data in deferred:
                self.publish(kind, meta, data)

    def _publish_one(self, kind: str, meta: dict, data: Any) -> None:
        key = [self.term, self.next_n]
        item = m.Item(channel=self.name, key=key, prev=list(self.last_published), kind=kind, meta=meta, data=data)
        self.last_published = tuple(key)  # type: ignore[assignment]
        self.next_n += 1
        self.rt._spawn(self._on_item(None, item), f"publish-{self.name}")

    def on_submit(self, msg: m.Submit) -> None:
        if not self.is_root:
            # The sender's idea of the root is stale (the root moved or failed):
            # route it up the tree, which always ends at the current root.
            if self.parent is not None:
                self.send_parent(msg)
            return
        if not self.root_ready:
            if len(self.submits) < ROOT_SUBMIT_QUEUE:
                self.submits.append(msg)
            return
        self._sequence(msg)

    def _sequence(self, msg: m.Submit) -> None:
        if self.last_msg.get(msg.origin, -1) >= msg.msg_id:
            return  # already in the stream (a retry after a root change)
        self.last_msg[msg.origin] = msg.msg_id
        self.publish("b", {"origin": msg.origin, "msg_id": msg.msg_id}, msg.data)

    # -- sending helpers -----------------------------------------------------

    def send_parent(self, msg: m.Message) -> None:
        if self.parent is not None:
            self.rt.send_to(self.parent[0], self.parent[1], msg)

    def send_to_child(self, child: ChildState, msg: m.Message) -> None:
        self.rt.send_to(child.member, child.address, msg)

    def on_peer_lost(self, member: int) -> None:
        """A peer connection broke. The controller repairs the tree (it sees the
        session loss); waiters re-check their state when the re-wiring lands."""

    # -- hooks for the kinds -------------------------------------------------

    def sent_up_to(self) -> int:
        return -1

    def first_round_for_child(self) -> int:
        return 0

    def list_round(self) -> int:
        return -1

    def first_join(self, next_round: int, list_round: int) -> None:
        pass

    def first_join_as_root(self) -> None:
        pass

    def after_link_sent(self) -> None:
        pass

    def after_became_root(self) -> None:
        pass

    def on_root_ready(self) -> None:
        pass

    def progress(self) -> None:
        pass

    async def on_item(self, item: m.Item) -> None:
        pass

    def holds_early(self, msg: m.Message) -> bool:
        """Whether ``msg`` from a child whose link is held waits with it (handled by
        ``on_early_message`` when the link is accepted)."""
        return False

    def on_early_message(self, sender: int, msg: m.Message) -> None:
        pass

    async def on_kind_message(self, sender: int, msg: m.Message) -> None:
        from ..errors import RemoteProtocolError

        raise RemoteProtocolError(f"{msg.OP!r} is not a {self.kind} channel message")
