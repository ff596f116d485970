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
from typing import Any

from ..errors import ChannelClosed, CollectiveTimeout
from ..ops import freeze
from ..protocol import messages as m
from ..protocol.payload import snapshot_payload
from .core import ChannelCore, get_or_stop

# Without the item coming back this long, ask the controller for the root again and
# re-send (de-duplicated). A lost connection to the root re-sends at once, and so does
# a new root term (seen in a re-wiring or in the stream): the old root may have left,
# or dropped what it was handed while it was leaving.
RESUBMIT_AFTER = 10.0


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
        self.rt.send_to(root[0], root[1], submit)
        await self.rt.drain_to(root[0])

    def _submit_here(self, submit: m.Submit, owned: bool = False) -> None:
        # The stream keeps the data after send() returns (sockets, repair history): it
        # must be ours, not the caller's buffer. A remote root receives its own copy.
        self.on_submit(m.Submit(channel=submit.channel, origin=submit.origin, msg_id=submit.msg_id,
                                data=submit.data if owned else snapshot_payload(submit.data)))

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

    def on_rewire(self, msg: m.Rewire) -> None:
        term = self.term
        super().on_rewire(msg)
        if self.term != term:
            self._root_moved()

    def _root_moved(self) -> None:
        """Another root sequences the stream: sends under way re-submit to it now."""
        self._root = None
        self._root_lost.set()

    async def _deliver(self, source: int | None, item: m.Item) -> None:
        if item.key[0] != self._stream_term:
            self._stream_term = item.key[0]
            self._root_moved()
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
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(exc)
