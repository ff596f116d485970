"""Shuffle: senders partition their data by ``hash_function`` and send each part
straight to its receiver.

Round ``r`` starts when the root publishes member list ``r`` in the channel
stream (fetched from the controller when a member first asks for it). A member
takes part in exactly the lists that name it, in order. A receiver's round
completes when every sender of the list has delivered its part (possibly empty)
or has been reported gone — so a dead sender is either fully in or fully out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from typing import Any, Callable

import numpy as np

from ..buffers import BufferPool
from ..errors import ChannelClosed, CollectiveTimeout, ConnectionClosed, MembershipError
from ..partition import partition
from ..protocol.limits import SHM_MIN
from ..protocol import messages as m
from .core import ChannelCore

log = logging.getLogger("zipcomm.shuffle")

SENDER, RECEIVER, BOTH = "sender", "receiver", "both"
ROLES = (SENDER, RECEIVER, BOTH)
MAX_ROUNDS_AHEAD = 64  # parts buffered for rounds this member has not reached yet
# Arrays at least this large are partitioned into, and a round's parts assembled into, buffers of
# the runtime's pool: a fresh buffer of this size costs a zero-filled page per page written.
POOLED_ARRAY_MIN = 1 << 20


def _receivers(members: list) -> list:
    """The entries of a round's member list that receive parts, in list order."""
    return [mm for mm in members if mm[3] in (RECEIVER, BOTH)]


def _pooled(dtype: np.dtype, shape: tuple) -> bool:
    """Whether an array of ``dtype`` and ``shape`` is built in a buffer of the runtime's pool."""
    return (len(shape) >= 1 and not dtype.hasobject
            and dtype.itemsize * math.prod(shape) >= POOLED_ARRAY_MIN)


def _poolable(data: Any) -> bool:
    return type(data) is np.ndarray and _pooled(data.dtype, data.shape)


def _concat(parts: list, pool: BufferPool | None = None) -> Any:
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    if arrays and len(arrays) == len(parts):
        first = arrays[0]
        if (pool is not None and first.ndim >= 1
                and all(a.dtype == first.dtype and a.shape[1:] == first.shape[1:] for a in arrays)):
            shape = (sum(len(a) for a in arrays), *first.shape[1:])
            if _pooled(first.dtype, shape):
                return np.concatenate(arrays, out=pool.array(first.dtype, shape))
        return np.concatenate(arrays)
    out: list = []
    for p in parts:
        out.extend(p.tolist() if isinstance(p, np.ndarray) else p)
    return out


class ShuffleChannel(ChannelCore):
    kind = "shuffle"

    def __init__(self, runtime, name: str, *, role: str = BOTH) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        super().__init__(runtime, name, role)
        self.next_round = 0
        self._list_round = -1
        self.lists: dict[int, list] = {}  # rounds naming this member, not yet taken
        self.parts: dict[int, dict[int, Any]] = {}
        self.gone: set[int] = set()
        self._fetching = False
        self._requested = -1
        self._asked_in_epoch = -1
        self._root_wanted = -1
        self._root: list | None = None  # the root's [member, address], as looked up ...
        self._root_epoch = -1  # ... in this epoch (a re-wiring may move the root)
        self._last_receivers = 0  # receivers of the last round taken: the likely count of the next
        self._last_out: weakref.ref | None = None  # the array the last round handed out

    # -- API -----------------------------------------------------------------

    async def shuffle_send(self, data: Any, hash_function: Callable, *, timeout: float | None = 30.0) -> int:
        """Send ``data`` partitioned by ``hash_function(item, n_receivers)``; returns the round."""
        if self.role == RECEIVER:
            raise ValueError("a RECEIVER cannot shuffle_send")
        r, _members, sent = await self._send_round(data, hash_function, timeout)
        await self._drain(sent)
        return r

    async def shuffle_receive(self, *, timeout: float | None = 30.0, with_senders: bool = False,
                              parts: bool = False) -> Any:
        """This member's data of the next round, once every sender delivered its part: the
        parts joined in one array (or list).  ``with_senders=True``: ``(data, senders)``, the
        ids of the members whose parts it holds, ascending (a sender that failed during the
        round is wholly out).  ``parts=True``: a list of the parts, not joined, the one of
        ``senders[i]`` at ``i`` (possibly empty): nothing is copied, and a part another member
        of this host handed over through its daemon stays a read-only view of the daemon's
        shared memory (given back when dropped).  An application that gathers several rounds
        before joining them (a sort) saves a copy of every round."""
        if self.role == SENDER:
            raise ValueError("a SENDER cannot shuffle_receive")
        r, members = await self._start_round(timeout)
        data, senders = await self._collect(r, members, timeout, parts)
        return (data, senders) if with_senders else data

    async def shuffle_send_receive(self, data: Any, hash_function: Callable, *,
                                   timeout: float | None = 30.0, with_senders: bool = False,
                                   parts: bool = False) -> Any:
        """Send this member's parts and return its data of the round (``with_senders``,
        ``parts``: as :meth:`shuffle_receive`)."""
        if self.role != BOTH:
            raise ValueError("shuffle_send_receive needs role BOTH")
        r, members, sent = await self._send_round(data, hash_function, timeout)
        result, senders = await self._collect(r, members, timeout, parts)
        await self._drain(sent)
        return (result, senders) if with_senders else result

    async def _drain(self, members: list[int]) -> None:
        """Return only once our parts have left (down to the sockets' buffers): an application
        that computes right after the call would otherwise hold them back, and every receiver
        would wait for that."""
        for member in members:
            await self.rt.drain_to(member)

    # -- rounds --------------------------------------------------------------

    async def _start_round(self, timeout: float | None) -> tuple[int, list]:
        r = await self._next_list(timeout)
        return r, self._take(r)

    async def _next_list(self, timeout: float | None) -> int:
        """Wait for the member list of this member's next round; the round is not taken (see
        :meth:`_take`), so whoever returns without awaiting again owns it."""
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        want = self.next_round
        try:
            async with asyncio.timeout(timeout):
                while True:
                    r = self._ready_round()
                    if r is not None:
                        return r
                    if self._unasked(want):
                        self._requested, self._asked_in_epoch = want, self.epoch
                        await self._ask_for_list(want)
                        continue  # the list may have come while we asked: look again first
                    await self.wait_changed()
        except TimeoutError:
            raise CollectiveTimeout("no member list for the shuffle round", channel=self.name,
                                    epoch=self.epoch, round=want, missing=["root"]) from None

    def _unasked(self, want: int) -> bool:
        """Whether list ``want`` is still to be asked for (again after a re-wiring: the root
        asked may be root no more)."""
        return self._requested < want or self._asked_in_epoch != self.epoch

    def _ready_round(self) -> int | None:
        """The first round at or after ``next_round`` whose member list is here, or None."""
        ready = [r for r in self.lists if r >= self.next_round]
        return min(ready) if ready else None

    def _take(self, r: int) -> list:
        """Take round ``r`` (its list is here): this member's rounds before it are skipped."""
        members = self.lists.pop(r)
        for stale in [k for k in self.lists if k < r]:
            del self.lists[stale]
        self.next_round = r + 1
        return members

    async def _ask_for_list(self, r: int) -> None:
        if self._ask_known_root(r):
            return
        epoch = self.epoch
        info = await self.rt.request(m.LookupRoot, channel=self.name)
        root = info["root"]
        self._root, self._root_epoch = root, epoch
        if root[0] == self.me:
            self._root_wants_list(r)
        else:
            self.rt.send_to(root[0], root[1], m.NeedList(channel=self.name, round=r))

    def _ask_known_root(self, r: int) -> bool:
        """Ask for list ``r`` without waiting, if this member is the root or knows the root of
        this epoch (a root that moved routes the request up its tree); False if it does not."""
        if self.is_root:
            self._root_wants_list(r)
            return True
        root = self._root if self._root_epoch == self.epoch else None
        if root is None:
            return False
        if root[0] == self.me:
            self._root_wants_list(r)
        else:
            self.rt.send_to(root[0], root[1], m.NeedList(channel=self.name, round=r))
        return True

    def _forget_root(self, member: int) -> bool:
        """If ``member`` is the root we know, forget it: the next ask looks the root up."""
        if self._root is None or self._root[0] != member:
            return False
        self._root, self._root_epoch = None, -1
        return True

    def on_peer_lost(self, member: int) -> None:
        super().on_peer_lost(member)
        self._forget_root(member)

    def _root_wants_list(self, r: int) -> None:
        self._root_wanted = max(self._root_wanted, r)
        if not self.is_root or not self.root_ready or r <= self._list_round or self._fetching:
            return
        self._fetching = True
        self.rt._spawn(self._publish_list(), f"shuffle-list-{self.name}")

    async def _publish_list(self) -> None:
        try:
            info = await self.rt.request(m.ListMembers, channel=self.name)
        finally:
            self._fetching = False
        if self.is_root and self.root_ready and not self.closed:
            r = self._list_round + 1
            self._list_round = r  # no second fetch for the same round
            self.publish("s", {"round": r, "members": info["members"]}, None)
            if self._root_wanted > r:  # asked for while we were fetching
                self._root_wants_list(self._root_wanted)

    # -- sending -------------------------------------------------------------

    def _via_daemon(self, receivers: list, data: Any) -> bool:
        """Whether this member's parts go through the host daemon (see :meth:`_send_parts_via_host`)."""
        daemon = self.rt.daemon
        return not (daemon is None or daemon.lost or daemon.attachment is None or len(receivers) < 2
                    or not isinstance(data, np.ndarray) or data.ndim == 0 or data.nbytes < SHM_MIN
                    or data.dtype.hasobject
                    or not any(mm[0] != self.me and mm[2] == self.rt.host_id for mm in receivers))

    def _partition(self, data: Any, hash_function: Callable, n: int) -> list:
        """``data`` in ``n`` parts; a large array's parts are views of a buffer of the runtime's
        pool (it is reused once no part is referenced any more, by a socket or anyone else)."""
        out = self.rt.buffers.array(data.dtype, data.shape) if _poolable(data) else None
        return partition(data, hash_function, n, out=out)

    async def _early_partition(self, data: Any, hash_function: Callable) -> tuple[int, list] | None:
        """Partition a direct-link array before the round's member list is here, by the number
        of receivers the list most likely names (the ready list's, else the last round's);
        the list is asked for first, so that it comes while the array is partitioned.
        ``(n, parts)``, or None when it would not help; bad input raises here, before the
        round is taken."""
        if not isinstance(data, np.ndarray) or data.dtype.hasobject or self.rt.daemon is not None:
            return None
        r = self._ready_round()
        if r is not None:
            n = len(_receivers(self.lists[r]))
        else:
            n, want = self._last_receivers, self.next_round
            if n < 1 or self.closed:
                return None
            if self._unasked(want):
                if not self._ask_known_root(want):
                    return None  # the root is looked up first (see _next_list)
                self._requested, self._asked_in_epoch = want, self.epoch
                if self.is_root:
                    await asyncio.sleep(0)  # the list's fetch (a task) sends its request first
        if n < 1:
            return None
        return n, self._partition(data, hash_function, n)

    async def _send_round(self, data: Any, hash_function: Callable, timeout: float | None) -> tuple[int, list, list[int]]:
        """Take the next round and send this member's parts of it: ``(round, members, members
        sent to)``. Over direct links the round is taken only once the data is partitioned:
        a hash function that fails (or returns bad indices) leaves the round to a retry."""
        early = await self._early_partition(data, hash_function)
        while True:
            r = await self._next_list(timeout)
            members = self.lists[r]
            receivers = _receivers(members)
            if self._via_daemon(receivers, data):
                self._take(r)
                return r, members, await self._send_parts_via_host(r, members, data, hash_function)
            if early is not None and early[0] == len(receivers):
                parts = early[1]
            else:
                parts = self._partition(data, hash_function, len(receivers)) if receivers else []
            early = None
            if self.lists.get(r) is members and self._ready_round() == r:  # (not taken meanwhile)
                self._take(r)
                self._last_receivers = len(receivers)
                return r, members, self._send_parts(r, receivers, parts)

    async def _send_parts_via_host(self, r: int, members: list, data: Any, hash_function: Callable) -> list[int]:
        """Send this member's parts; with a host daemon, partition straight into its shared
        memory and hand the parts for members of this host over as references (no byte
        crosses a socket); the rest goes over direct links."""
        daemon = self.rt.daemon
        receivers = _receivers(members)
        buf = await daemon.empty(data.shape, data.dtype)  # in the arena if there is room
        parts = partition(data, hash_function, len(receivers), out=buf)
        local = [(mm[0], part) for mm, part in zip(receivers, parts)
                 if mm[0] != self.me and mm[2] == self.rt.host_id and part.size]
        try:
            shared = await daemon.share(self.name, r, buf, local)
        except (ConnectionClosed, MembershipError):  # the daemon went away: direct links carry all
            shared = set()
        direct = []
        for (member, address, _host, _role), part in zip(receivers, parts):
            if member == self.me:
                self._store_part(r, self.me, part)
            elif member not in shared:
                self.rt.send_to(member, address, m.Part(channel=self.name, round=r, sender=self.me, data=part))
                direct.append(member)
        return direct

    def on_shared_part(self, r: int, sender: int, data: Any) -> None:
        """A part another member of this host handed over through the daemon."""
        self._store_part(r, sender, data)
        self._pulse()

    def _send_parts(self, r: int, receivers: list, parts: list) -> list[int]:
        """Send every part over direct links (``parts[i]`` to ``receivers[i]``); return the
        members sent to."""
        log.debug("%x sends round %d", self.me, r)
        sent = []
        for (member, address, _host, _role), part in zip(receivers, parts):
            if member == self.me:
                self._store_part(r, self.me, part)
            else:
                self.rt.send_to(member, address, m.Part(channel=self.name, round=r, sender=self.me, data=part))
                sent.append(member)
        return sent

    async def _collect(self, r: int, members: list, timeout: float | None,
                       parts: bool = False) -> tuple[Any, list[int]]:
        senders = [mm[0] for mm in members if mm[3] in (SENDER, BOTH)]
        try:
            async with asyncio.timeout(timeout):
                while True:
                    got = self.parts.get(r, {})
                    missing = [s for s in senders if s not in got and s not in self.gone]
                    if not missing:
                        break
                    await self.wait_changed()
        except TimeoutError:
            raise CollectiveTimeout("shuffle parts missing", channel=self.name, epoch=self.epoch, round=r,
                                    missing=[f"{s:x}" for s in missing]) from None
        got = self.parts.pop(r, {})
        included = [s for s in senders if s in got]  # joined in the member list's order
        ids = sorted(included)
        if parts:
            return [self._hand_out(got[s], s == self.me) for s in ids], ids
        out = _concat([got[s] for s in included], self._output_pool())
        self._last_out = weakref.ref(out) if isinstance(out, np.ndarray) else None
        return out, ids

    def _hand_out(self, part: Any, own: bool) -> Any:
        """A part as the application gets it with ``parts=True``: a received part in a buffer of
        the runtime's pool leaves the pool (the application may keep it as long as it likes);
        this member's own part over direct links is a piece of the pooled partition buffer,
        which the next round reuses, so it is copied."""
        if not isinstance(part, np.ndarray) or not isinstance(part.base, np.ndarray):
            return part
        if own:
            return part.copy() if self.rt.buffers.pooled(part.base) else part
        self.rt.buffers.forget(part.base)
        return part

    def _output_pool(self) -> BufferPool | None:
        """The pool a round's array is assembled into: the runtime's, while the application gives
        each round's array back (drops it) before the next round, as a loop that consumes what
        it receives does; None, a plain array, while it keeps them (to gather rounds, as a sort
        does). A kept array then never goes back to the pool, and its memory returns to the
        system when the application drops it, where its next allocations find it, instead of
        sitting in the pool."""
        last = self._last_out() if self._last_out is not None else None
        if last is None:
            return self.rt.buffers
        self.rt.buffers.forget(last.base)
        return None

    def _store_part(self, r: int, sender: int, data: Any) -> None:
        if r < self.next_round - 1 and r not in self.parts:
            return  # a round we already finished (a late part from a sender reported gone)
        if r >= self.next_round + MAX_ROUNDS_AHEAD:
            return
        self.parts.setdefault(r, {})[sender] = data

    async def aclose(self, graceful: bool = True) -> None:
        if graceful and not self.closed and self.role != RECEIVER:
            # Rounds that name us but that we never took: their receivers expect a part.
            for r, members in sorted(self.lists.items()):
                receivers = _receivers(members)
                self._send_parts(r, receivers, [[] for _ in receivers])
            self.lists.clear()
        await super().aclose(graceful)

    # -- hooks ---------------------------------------------------------------

    def list_round(self) -> int:
        return self._list_round

    def first_join(self, next_round: int, list_round: int) -> None:
        self._list_round = list_round
        self.next_round = list_round + 1

    async def on_item(self, item: m.Item) -> None:
        if item.kind == "s":
            r = item.meta["round"]
            log.debug("%x list %d: %s (next %d)", self.me, r, [f"{x[0]:x}" for x in item.meta["members"]], self.next_round)
            self._list_round = max(self._list_round, r)
            members = item.meta["members"]
            if r >= self.next_round and any(mm[0] == self.me for mm in members):
                self.lists[r] = members
        elif item.kind == "g":
            log.debug("%x gone %x", self.me, item.meta["member"])
            if self._forget_root(item.meta["member"]):
                # the list we asked it for will not come, and the re-wiring that moves the
                # root need not reach this member: ask the new root
                self._asked_in_epoch = -1
            if not item.meta.get("graceful"):
                # A failed sender is wholly out of the rounds it did not finish; one that
                # left gracefully sent its parts before leaving: they are on their way.
                self.gone.add(item.meta["member"])
        self._pulse()

    async def on_kind_message(self, sender: int, msg: m.Message) -> None:
        match msg:
            case m.Part():
                self._store_part(msg.round, msg.sender, msg.data)
            case m.NeedList():
                if not self.is_root and self.parent is not None:
                    self.send_parent(msg)  # the asker's idea of the root is stale: route it up
                self._root_wants_list(msg.round)
            case _:
                await super().on_kind_message(sender, msg)

    def on_root_ready(self) -> None:
        if self._root_wanted > self._list_round:
            self._root_wants_list(self._root_wanted)
