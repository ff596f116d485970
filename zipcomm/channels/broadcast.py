"""Broadcast: one sender per round, every member receives every item in the same order.

The sender hands its data to the root (address cached, re-resolved when the
root stops answering); the root sequences it into the channel stream. ``send``
returns once the item came back to the sender through the tree, so it is in
the stream for good: a retry after a root failure is de-duplicated by
``(origin, msg_id)``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ChannelClosed, CollectiveTimeout
from ..ops import freeze
from ..protocol import messages as m
from ..buffers import snapshot
from . import parts
from .core import ChannelCore, get_or_stop

log = logging.getLogger("zipcomm.channels")

# Without the item coming back this long, ask the controller for the root again and
# re-send (de-duplicated). A lost connection to the root re-sends at once, and so does
# a new root term (seen in a re-wiring or in the stream): the old root may have left,
# or dropped what it was handed while it was leaving.
RESUBMIT_AFTER = 10.0

# A large array goes to a remote root as parts, and the root publishes each part as it arrives
# (the item is pipelined from the sender through the root and the tree). A sender that stops
# sending parts for this long loses its place; its send() re-submits the item later.
RELAY_IDLE = 5.0
GATHERS = 16  # items of other senders gathered whole at the root while one is relayed


@dataclass(slots=True)
class _Relay:
    ident: tuple[int, int]  # (origin, msg_id)
    n: int
    next_i: int = 0
    timer: asyncio.TimerHandle | None = None


def _part_spec(msg: m.Submit) -> tuple[int, int, np.dtype, tuple] | None:
    """(i, n, dtype, shape) of a submitted part, or None if it is malformed."""
    part, data = msg.part, msg.data
    if type(part) is not list or len(part) != 4 or not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        return None
    i, n, dt, shape = part
    spec = parts.array_spec(dt, shape)
    if type(i) is not int or type(n) is not int or not 0 <= i < n or spec is None:
        return None
    return i, n, *spec


class BroadcastChannel(ChannelCore):
    kind = "broadcast"

    def __init__(self, runtime, name: str, *, queue_size: int = 64) -> None:
        super().__init__(runtime, name, "member")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self._msg_ids = itertools.count(1)
        self._acks: dict[tuple[int, int], asyncio.Future] = {}
        self._root: list | None = None
        self._root_lost = asyncio.Event()
        self._stream_term = 0  # the term of the last item delivered here
        self._relay: _Relay | None = None  # root: the item relayed as its parts arrive
        self._gathers: dict[tuple[int, int], parts.Filling] = {}

    def resume(self, last_key: tuple, next_msg_id: int = 1, history=(),  # type: ignore[override]
               last_msg: dict | None = None) -> None:
        super().resume(last_key, history)
        self._msg_ids = itertools.count(next_msg_id)
        self.last_msg.update(last_msg or {})

    async def send(self, data: Any, *, timeout: float | None = 30.0) -> None:
        """Broadcast ``data`` to every other member of the channel."""
        await self.send_as(self.me, next(self._msg_ids), data, timeout=timeout)

    async def send_as(self, origin: int, msg_id: int, data: Any, *, timeout: float | None = 30.0,
                      owned: bool = False) -> None:
        """Broadcast on behalf of ``origin`` (this member, or a local member of a daemon);
        ``owned``: ``data`` is ours already (no private copy is taken)."""
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        submit = m.Submit(channel=self.name, origin=origin, msg_id=msg_id, data=data)
        submit.to_frame()  # refuse an unsupported payload here, at the sender
        ack = asyncio.get_running_loop().create_future()
        self._acks[(origin, msg_id)] = ack
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.last_msg.get(origin, -1) >= msg_id:
                        return  # in the stream already (e.g. a re-send after a daemon's death)
                    self._root_lost = asyncio.Event()
                    await self._submit(submit, owned)
                    lost = asyncio.ensure_future(self._root_lost.wait())
                    try:
                        done, _ = await asyncio.wait([ack, lost], timeout=RESUBMIT_AFTER,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        lost.cancel()
                    if ack in done:
                        ack.result()
                        return
                    self._root = None  # no echo yet: the root may have changed
        except TimeoutError:
            raise CollectiveTimeout(
                "broadcast not delivered", channel=self.name, epoch=self.epoch, round=msg_id
            ) from None
        finally:
            self._acks.pop((origin, msg_id), None)

    async def _submit(self, submit: m.Submit, owned: bool = False) -> None:
        if self.is_root:
            self._submit_here(submit, owned)
            return
        if self._root is None:
            info = await self.rt.request(m.LookupRoot, channel=self.name)
            self._root = info["root"]
        root = self._root
        if root[0] == self.me:
            self._submit_here(submit, owned)
            return
        for piece in self._parts_of(submit):
            self.rt.send_to(root[0], root[1], piece)
        await self.rt.drain_to(root[0])

    def _parts_of(self, submit: m.Submit) -> list[m.Submit]:
        """A large array as parts (each is sent as soon as it is queued), anything else whole."""
        if not parts.splittable(submit.data, self.chunk_bytes):
            return [submit]
        spec, pieces = parts.split(submit.data, self.chunk_bytes)
        n = len(pieces)
        return [m.Submit(channel=submit.channel, origin=submit.origin, msg_id=submit.msg_id, part=[i, n, *spec],
                         data=piece) for i, piece in enumerate(pieces)]

    # -- root: parts of a large item ------------------------------------------

    def _sequence(self, msg: m.Submit) -> None:
        if msg.part is None:
            super()._sequence(msg)
            return
        if self.last_msg.get(msg.origin, -1) >= msg.msg_id:
            return  # in the stream already
        spec = _part_spec(msg)
        if spec is None:
            log.error("channel %s: malformed part submitted by %x; dropped", self.name, msg.origin)
            return
        i, n, dtype, shape = spec
        ident = (msg.origin, msg.msg_id)
        relay = self._relay
        if relay is None and i == 0 and ident not in self._gathers:
            relay = self._relay = _Relay(ident, n)
            self.holding = True
        if relay is not None and relay.ident == ident:
            if i != relay.next_i and i != 0:
                self._end_relay()  # a part lost on the way: the sender re-submits the item
                return
            if i == 0:
                meta = {"k": "b", "m": {"origin": msg.origin, "msg_id": msg.msg_id}, "i": 0, "n": n,
                        "dt": dtype.str, "sh": list(shape)}
            else:
                meta = {"i": i, "n": n}
            self._publish_one("p", meta, msg.data)
            relay.next_i = i + 1
            if relay.timer is not None:
                relay.timer.cancel()
            if relay.next_i == n:
                self.last_msg[msg.origin] = msg.msg_id
                self._end_relay()
            else:
                relay.timer = asyncio.get_running_loop().call_later(RELAY_IDLE, self._relay_idle, relay)
            return
        self._gather(ident, i, n, dtype, shape, msg.data)

    def _gather(self, ident: tuple[int, int], i: int, n: int, dtype: np.dtype, shape: tuple, data) -> None:
        """Parts of a sender while another one's item is relayed: assembled here, then sequenced whole."""
        gather = self._gathers.get(ident)
        if i == 0:
            while len(self._gathers) >= GATHERS:
                self._gathers.pop(next(iter(self._gathers)))
            nbytes = dtype.itemsize * math.prod(shape)
            gather = self._gathers[ident] = parts.Filling(n=n, dtype=dtype, shape=shape,
                                                          buf=self.rt.buffers.take(nbytes))
        got = gather.put(i, n, data) if gather is not None else parts.SKIP
        if got is parts.MORE:
            return
        self._gathers.pop(ident, None)
        if got is parts.BAD:
            log.error("channel %s: parts submitted by %x do not add up; dropped", self.name, ident[0])
        elif got is parts.DONE:
            super()._sequence(m.Submit(channel=self.name, origin=ident[0], msg_id=ident[1], data=gather.value))

    def _relay_idle(self, relay: _Relay) -> None:
        if self._relay is relay:
            log.info("channel %s: the parts of %x's item stopped coming; the stream goes on without it",
                     self.name, relay.ident[0])
            self._end_relay()

    def _end_relay(self) -> None:
        relay, self._relay = self._relay, None
        if relay is not None and relay.timer is not None:
            relay.timer.cancel()
        self.release()

    def _submit_here(self, submit: m.Submit, owned: bool = False) -> None:
        # The stream keeps the data after send() returns (sockets, repair history): it
        # must be ours, not the caller's buffer. A remote root receives its own copy.
        self.on_submit(m.Submit(channel=submit.channel, origin=submit.origin, msg_id=submit.msg_id,
                                data=submit.data if owned else snapshot(submit.data, self.rt.buffers)))

    async def receive(self, *, timeout: float | None = None) -> Any:
        """The next broadcast sent by another member (in the channel's order)."""
        if not self._queue.empty():  # the common case under load: no tasks, no waiting
            return self._queue.get_nowait()
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        outcome, value = await get_or_stop(self._queue, self._closed_event(), timeout)
        if outcome == "item":
            return value
        if outcome == "stop":
            raise ChannelClosed(f"channel {self.name!r} closed")
        raise CollectiveTimeout("no broadcast received", channel=self.name, epoch=self.epoch,
                                round=self.last_key[1])

    async def _closed_event(self) -> None:
        while not self.closed:
            await self.changed.wait()

    def on_controller(self, msg: m.Message) -> None:
        if isinstance(msg, m.Gone) and self._relay is not None and self._relay.ident[0] == msg.member:
            self._end_relay()  # its departure is not held up behind its unfinished item
        super().on_controller(msg)

    def on_rewire(self, msg: m.Rewire) -> None:
        term = self.term
        super().on_rewire(msg)
        if not self.is_root:
            self._gathers.clear()
            if self._relay is not None:
                self._end_relay()
        if self.term != term:
            self._root_moved()

    def _root_moved(self) -> None:
        """Another root sequences the stream: sends under way re-submit to it now."""
        self._root = None
        self._root_lost.set()

    async def _deliver(self, source: int | None, item: m.Item) -> None:
        if item.key[0] != self._stream_term:
            if self._stream_term:  # (the first item we see is of the term we joined in)
                self._root_moved()
            self._stream_term = item.key[0]
        await super()._deliver(source, item)

    async def on_item(self, item: m.Item) -> None:
        if item.kind != "b":
            return
        if self._ack(item):
            return
        await self._queue.put(freeze(item.data))

    def _ack(self, item: m.Item) -> bool:
        """Resolve the send() waiting for ``item``; True if it is our own broadcast."""
        origin = item.meta["origin"]
        ack = self._acks.get((origin, item.meta["msg_id"]))
        if ack is not None and not ack.done():
            ack.set_result(None)
        return origin == self.me

    def on_peer_lost(self, member: int) -> None:
        if self._root is not None and self._root[0] == member:
            self._root_lost.set()

    def _fail_waiters(self, exc: BaseException) -> None:
        if self._relay is not None:
            self._end_relay()
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(exc)
