"""Reduce and allreduce: contributions combined up the tree, exact under churn.

A round's values travel up as *pieces*: an atomic value plus the exact set of
members it covers. A node merges its own value with its children's first pieces
into one piece and sends it up once (``sent_up_to`` records how far it got).
Anything that arrives after that (a re-sent piece of an orphaned child, or a
child that came late) is forwarded up *unmerged*, so the pieces reaching the
root form a laminar family: any two are disjoint or one contains the other.
The root keeps the largest disjoint pieces — a contributor is counted once or
not at all, and its piece is whole — and publishes the round's completion in
the channel stream, which tells every node it may drop what it retained.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ChannelClosed, CollectiveTimeout
from ..ops import FastOp, freeze, reduce_by_name, reduce_name, resolve_reduce
from ..protocol import messages as m
from ..buffers import snapshot
from .core import ChannelCore

log = logging.getLogger("zipcomm.reduce")

_NOTHING = object()

# First pieces of at least this many bytes are combined as they arrive (``ReduceChannel._fold``).
FOLD_MIN = int(os.environ.get("ZIPCOMM_FOLD_BYTES", 1 << 20))  # (small values: for fault tests)

# Past the controller's heartbeat timeout, how long a rebuilt tree's root waits for the
# members of the rounds under way to re-join (their reconnection backoff is at most 1.5 s).
REASSEMBLY_MARGIN = 2.0


@dataclass(slots=True)
class _Round:
    own: Any = _NOTHING
    own_ids: list | None = None  # who ``own`` covers (None: this member alone)
    own_set: bool = False
    allreduce: bool = False
    wants: list = field(default_factory=list)
    first: dict = field(default_factory=dict)  # child -> Piece
    # Large first pieces already combined, as they came, into ``acc`` (see ``_fold``): their
    # senders, and who ``acc`` covers. Their Piece objects stay in ``first``, without data.
    folded: set = field(default_factory=set)
    acc: Any = None
    acc_ids: list = field(default_factory=list)
    late: list = field(default_factory=list)  # pieces that arrived after our own first piece (root only)
    sent: bool = False


class ReduceAPI:
    """The reduce / allreduce calls over ``_contribute``: shared by the direct channel and
    the handle that goes through a host daemon."""

    handler: Callable[[Any, int], Any] | None

    async def reduce(self, data: Any = _NOTHING, *, timeout: float | None = 30.0) -> Any:
        """Contribute ``data`` to the next round (no data: take part without contributing).

        A member with a ``handler`` waits for the round's result, calls
        ``handler(result, num_lambdas)`` and returns the result; others return
        once their part is on its way.
        """
        want = self.handler is not None
        result = await self._contribute(data, allreduce=False, want=want, timeout=timeout)
        if want:
            value, contributors = result
            outcome = self.handler(value, len(contributors))
            if asyncio.iscoroutine(outcome):
                await outcome
            return value
        return None

    async def allreduce(self, data: Any = _NOTHING, *, timeout: float | None = 30.0,
                        with_contributors: bool = False) -> Any:
        """Contribute and return the round's result to every member."""
        value, contributors = await self._contribute(data, allreduce=True, want=True, timeout=timeout)
        return (value, contributors) if with_contributors else value



class ReduceChannel(ReduceAPI, ChannelCore):
    kind = "reduce"

    def __init__(self, runtime, name: str, *, reduce_f: Any = None,
                 handler: Callable[[Any, int], Any] | None = None) -> None:
        super().__init__(runtime, name, "member")
        self.reduce_f = resolve_reduce(reduce_f) if reduce_f is not None else None
        self.handler = handler
        self.fn_name = reduce_name(self.reduce_f)
        self.next_round = 0
        self._sent_up_to = -1
        self.done_up_to = -1
        self.rounds: dict[int, _Round] = {}
        self.retained: dict[int, list[m.Piece]] = {}
        self._waiters: dict[int, asyncio.Future] = {}
        # Whether our own values are the caller's (never combined in place): a daemon
        # hands over arena ranges it owns, which it may overwrite.
        self._own_is_callers = True
        # Who the last complete round counted, and who left since (stream items).
        self._last_contributors: list = []
        self._gone_since: set = set()
        # While a tree is rebuilt after a controller restart: the members a round must
        # cover before this member, as root, may complete it (or until the timer fires).
        self._expect: set | None = None
        self._expect_known = True
        self._expect_timer: asyncio.TimerHandle | None = None
        # Rounds the root holds because members the last round counted are missing and
        # not known gone (e.g. members of a host daemon that died, re-joining directly):
        # round -> the timer that ends the wait (None once it has ended).
        self._short: dict[int, asyncio.TimerHandle | None] = {}
        # Failures seen before any round completed: member -> until when the first round
        # waits for members nobody knows of (see ``_gone``).
        self._blind: dict[int, float] = {}

    # -- API -----------------------------------------------------------------

    async def _contribute(self, data: Any, *, allreduce: bool, want: bool, timeout: float | None):
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} closed")
        if data is not _NOTHING:
            data = snapshot(data, self.rt.buffers)  # refuses bad payloads here; the caller may reuse its buffer
        r, fut = self.start_round(data, allreduce=allreduce, want=want)
        if fut is None:
            if self.parent is not None:
                await self.rt.drain_to(self.parent[0])
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise CollectiveTimeout("reduce round did not complete", channel=self.name, epoch=self.epoch,
                                    round=r, missing=self._missing(r)) from None
        finally:
            self._waiters.pop(r, None)

    def start_round(self, data: Any = _NOTHING, *, ids: list | None = None, allreduce: bool = False,
                    want: bool = False) -> tuple[int, asyncio.Future | None]:
        """Take part in the next round without waiting: ``data`` (ours from now on, may be
        combined in place) covers the contributors ``ids`` (default: this member). Returns
        the round and, if ``want`` or ``allreduce``, a future of ``(value, contributors)``."""
        r = self.next_round
        self.next_round += 1
        if r <= self.done_up_to:
            # The round is complete already, without us: we were out of the tree (e.g.
            # stopped past the heartbeat timeout). A typed error, not a wait for nothing.
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(self._left_out(r))
            return r, fut
        rnd = self.rounds.setdefault(r, _Round())
        rnd.own, rnd.own_set, rnd.allreduce = data, True, allreduce
        rnd.own_ids = list(ids) if ids is not None else None
        fut = None
        if want or allreduce:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[r] = fut
            if not allreduce:
                rnd.wants.append([self.me, self.rt.address])
        self.progress()
        return r, fut

    def resume(self, next_round: int, given: dict, waiters: dict,  # type: ignore[override]
               last_key: tuple = (0, 0), history=()) -> None:
        """Before joining, after the host daemon that stood for this member died: the
        rounds in ``given`` (round -> (value, allreduce, want)) have no result here
        yet; their values go up again as late pieces (the root counts each member
        once or not at all), and ``waiters`` get those rounds' results."""
        super().resume(last_key, history)
        self.next_round = next_round
        self._sent_up_to = next_round - 1
        self.done_up_to = (min(given) if given else next_round) - 1
        for r, (value, allreduce, want) in sorted(given.items()):
            has = value is not _NOTHING
            wants = [[self.me, self.rt.address]] if want and not allreduce else []
            self.retained[r] = [m.Piece(channel=self.name, round=r, contributors=[self.me] if has else [],
                                        wants=wants, late=True, allreduce=allreduce, fn=self.fn_name,
                                        data=value if has else None)]
        self._waiters.update(waiters)

    async def aclose(self, graceful: bool = True, *, timeout: float = 10.0) -> None:
        """Leave the channel. A graceful leave first waits (up to ``timeout``) until
        every round this member took part in has gone up from here (for the root: is
        complete): its subtree's first pieces may still need it as their way up.
        Past that point nothing is waited for: what went up is retained below and
        re-sent if the path above breaks, so the rest of the round (which may wait
        for other members' calls for any time) does not need this member."""
        if graceful and not self.closed:
            try:
                async with asyncio.timeout(timeout):
                    while self._sent_up_to < self.next_round - 1 and self.done_up_to < self.next_round - 1:
                        await self.wait_changed()
            except (TimeoutError, ChannelClosed):
                log.warning("channel %s: leaving with rounds up to %d unfinished", self.name, self.next_round - 1)
        await super().aclose(graceful)

    def rebuilt(self) -> None:
        """After a controller restart the first member to re-announce the channel is the
        root of the new tree, alone at first; the others re-join one by one (each
        within its reconnection backoff) and re-send what they had sent up. A root that
        completed the rounds under way at once would drop those live contributors, and
        their own calls for rounds already complete would never be answered. So the
        root completes no round until the pieces it holds cover every member the last
        complete round counted (less those gone since), or until the members that are
        not back by then cannot be alive: a heartbeat timeout (to notice the lost
        session) plus the reconnection backoff (at most 1.5 s) plus a margin."""
        self._end_reassembly()
        # Before any round completed, who takes part is not known: wait out the grace.
        self._expect_known = self.done_up_to >= 0
        self._expect = set(self._last_contributors) - self._gone_since - {self.me}
        grace = self.rt.heartbeat_timeout + REASSEMBLY_MARGIN
        self._expect_timer = asyncio.get_running_loop().call_later(grace, self._reassembly_timeout)
        log.debug("%x %s rebuilt: rounds wait for %d members or %.1f s", self.me, self.name,
                  len(self._expect), grace)

    def _reassembly_timeout(self) -> None:
        self._expect_timer = None
        if self._expect:
            log.info("channel %s: members %s did not re-join within the grace after a controller restart",
                     self.name, sorted(f"{x:x}" for x in self._expect))
        self._expect = None
        self.progress()

    def _end_reassembly(self) -> None:
        self._expect = None
        if self._expect_timer is not None:
            self._expect_timer.cancel()
            self._expect_timer = None

    def _end_holds(self) -> None:
        self._end_reassembly()
        for timer in self._short.values():
            if timer is not None:
                timer.cancel()
        self._short.clear()

    @staticmethod
    def _covered(rnd: _Round, me: int) -> set:
        covered: set = set()
        if rnd.own is not _NOTHING:
            covered.update(rnd.own_ids if rnd.own_ids is not None else [me])
        for piece in rnd.first.values():
            covered.update(piece.contributors)
        for piece in rnd.late:
            covered.update(piece.contributors)
        return covered

    def _may_complete(self, r: int, rnd: _Round) -> bool:
        """Root only, once every child is done with round ``r``: whether it may complete.

        A member the last round counted, not known gone, whose piece is missing may be
        on its way back into the tree: the members of a host daemon that died re-join
        directly and re-send their contributions, and the controller removes the daemon
        from the tree (its parent stops waiting) before they are back. Such a round
        waits for them for a heartbeat timeout plus a margin at most (they re-join at
        once: the daemon's socket closes under them). After a controller restart the
        rebuilt tree waits likewise for everyone (see ``rebuilt``)."""
        covered = self._covered(rnd, self.me)
        if self._blind:
            if self.done_up_to >= 0:
                self._blind.clear()
            else:
                loop = asyncio.get_running_loop()
                until = max(self._blind.values())
                if loop.time() < until:
                    if self._short.get(r) is None:
                        self._short[r] = loop.call_at(until, self._short_over, r)
                    return False
                self._blind.clear()
                self._short.pop(r, None)
        if self._expect is not None:
            # Every round until the grace ends: pieces that reached us before the restart
            # may cover one round while the members are not back in the tree for the next.
            if not self._expect_known or self._expect - covered:
                return False
        missing = set(self._last_contributors) - self._gone_since - covered - {self.me}
        if not missing:
            timer = self._short.pop(r, None)
            if timer is not None:
                timer.cancel()
            return True
        if r not in self._short:
            grace = self.rt.heartbeat_timeout + REASSEMBLY_MARGIN
            self._short[r] = asyncio.get_running_loop().call_later(grace, self._short_over, r)
            log.debug("%x %s round %d waits up to %.1f s for %s", self.me, self.name, r, grace,
                      sorted(f"{x:x}" for x in missing))
            return False
        if self._short[r] is None:
            log.info("channel %s round %d: completing without %s (not back within the grace)", self.name, r,
                     sorted(f"{x:x}" for x in missing))
            return True
        return False

    def _short_over(self, r: int) -> None:
        if r in self._short:
            self._short[r] = None
            self.progress()

    def _left_out(self, r: int) -> CollectiveTimeout:
        return CollectiveTimeout("reduce round completed without this member (it was out of the tree)",
                                 channel=self.name, epoch=self.epoch, round=r)

    def _missing(self, r: int) -> list:
        rnd = self.rounds.get(r)
        if rnd is None:
            return []
        missing = [f"{c.member:x}" for c in self.children.values() if not self._child_done(c, r, rnd)]
        if not rnd.own_set:
            missing.append(f"{self.me:x} (own call)")
        if rnd.sent and not self.is_root:
            missing.append("root result")
        return missing

    # -- hooks ---------------------------------------------------------------

    def sent_up_to(self) -> int:
        return self._sent_up_to

    def first_round_for_child(self) -> int:
        return self._sent_up_to + 1

    def first_join(self, next_round: int, list_round: int) -> None:
        self.next_round = next_round
        self._sent_up_to = next_round - 1
        self.done_up_to = next_round - 1

    def after_link_sent(self) -> None:
        for r in sorted(self.retained):
            for piece in self.retained[r]:
                self.send_parent(m.Piece(channel=self.name, round=r, contributors=piece.contributors,
                                         wants=piece.wants, late=True, allreduce=piece.allreduce,
                                         data=piece.data))

    def after_became_root(self) -> None:
        # What we sent up before becoming root now counts as late pieces here.
        for r, pieces in self.retained.items():
            rnd = self.rounds.setdefault(r, _Round())
            rnd.late.extend(pieces)
            rnd.own_set = True
            rnd.sent = False
        self.retained.clear()
        self._sent_up_to = self.done_up_to

    # -- the round machine ---------------------------------------------------

    def _child_done(self, child, r: int, rnd: _Round) -> bool:
        if child.member in rnd.first:
            return True
        if not child.linked:
            return False
        if child.first_round > r:
            return True
        return child.synced and child.sent_up_to >= r

    def progress(self) -> None:
        if self.closed:
            return
        while True:
            r = self._sent_up_to + 1
            rnd = self.rounds.get(r)
            if rnd is None or not rnd.own_set:
                return
            if self.is_root:
                if not self.root_ready:
                    return
            elif self.parent is None:
                return
            if not all(self._child_done(c, r, rnd) for c in self.children.values()):
                return
            if self.is_root and not self._may_complete(r, rnd):
                return
            self._sent_up_to = r
            if self.is_root:
                self._complete(r, rnd)
            else:
                self._send_first(r, rnd)

    def _reduce_fn(self) -> Callable[[list], Any] | None:
        """This member's reduce_f, else the well-known one the other members named."""
        return self.reduce_f or reduce_by_name(self.fn_name)

    def _combine(self, values: list, own_first: bool) -> Any:
        """reduce_f over values; in-place built-ins may reuse values[0] unless it is the
        application's own (``own_first``): received buffers are ours to overwrite."""
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        reduce_f = self._reduce_fn()
        if reduce_f is None:
            raise ChannelClosed(
                f"channel {self.name!r}: this member must combine values but has no reduce_f, and the "
                "other members' reduce_f is not a built-in (sum, min, max, zipcomm.SUM/MIN/MAX/PROD)"
            )
        if isinstance(reduce_f, FastOp):
            if own_first:
                # (commutative) into a received value, which is ours: no new array
                values.append(values.pop(0))
                own_first = False
            return reduce_f.combine(values, reuse_first=not own_first)
        return reduce_f(values)

    def _fold(self, sender: int, rnd: _Round, piece: m.Piece) -> None:
        """Combine a large first piece into the round's running value as it arrives, while the
        other children's pieces are still coming, instead of all of them once the last is in.
        Only first pieces: a member's first pieces are disjoint and every one of them goes into
        what it sends up (at the root: they are the largest, so all are kept), which is what
        makes combining them early the same as combining them at the end."""
        data = piece.data
        op = self._reduce_fn()
        if (type(data) is not np.ndarray or data.nbytes < FOLD_MIN or not piece.contributors
                or not isinstance(op, FastOp)):
            return
        acc = rnd.acc
        if acc is None:
            if not (data.flags.writeable and data.flags.c_contiguous):
                return  # not ours to combine into: left for the end
            rnd.acc = data
        elif data.dtype != acc.dtype or data.shape != acc.shape:
            return  # left for the end, where a mismatch fails as it always did
        else:
            op.combine([acc, data], reuse_first=True)
        rnd.acc_ids.extend(piece.contributors)
        rnd.folded.add(sender)
        piece.data = None  # (its bytes are in ``acc`` now)

    def _send_first(self, r: int, rnd: _Round) -> None:
        values, contributors, wants = [], [], list(rnd.wants)
        allreduce = rnd.allreduce
        if rnd.acc is not None:
            values.append(rnd.acc)  # received buffers combined: ours, combined into again
        if rnd.own is not _NOTHING:
            values.append(rnd.own)
            contributors.extend(rnd.own_ids if rnd.own_ids is not None else [self.me])
        for sender, piece in rnd.first.items():
            if piece.contributors:
                if sender not in rnd.folded:
                    values.append(piece.data)
                contributors.extend(piece.contributors)
            wants.extend(piece.wants)
            allreduce = allreduce or piece.allreduce
        own_first = bool(values) and rnd.acc is None and rnd.own is not _NOTHING and self._own_is_callers
        piece = m.Piece(channel=self.name, round=r, contributors=sorted(contributors), wants=wants,
                        late=False, allreduce=allreduce, fn=self.fn_name,
                        data=self._combine(values, own_first))
        self.retained.setdefault(r, []).append(piece)
        rnd.sent = True
        rnd.first.clear()
        rnd.folded.clear()
        rnd.acc = None
        rnd.own = _NOTHING  # it lives on in the retained piece
        self.send_parent(piece)

    def _complete(self, r: int, rnd: _Round) -> None:
        pieces: list[m.Piece] = [p for k, p in rnd.first.items() if k not in rnd.folded] + list(rnd.late)
        for k in rnd.folded:  # their wants and allreduce flags, without their data
            p = rnd.first[k]
            pieces.append(m.Piece(channel=self.name, round=r, contributors=[], wants=p.wants,
                                  allreduce=p.allreduce))
        if rnd.acc is not None:
            pieces.append(m.Piece(channel=self.name, round=r, contributors=rnd.acc_ids, data=rnd.acc))
        own_piece = None
        if rnd.own is not _NOTHING:
            own_piece = m.Piece(channel=self.name, round=r, data=rnd.own,
                                contributors=rnd.own_ids if rnd.own_ids is not None else [self.me])
            pieces.append(own_piece)
        # Largest first: in a laminar family that keeps the maximal disjoint cover.
        pieces.sort(key=lambda p: len(p.contributors), reverse=True)
        covered: set[int] = set()
        own_first = False
        values, wants = [], list(rnd.wants)
        allreduce = rnd.allreduce
        for piece in pieces:
            wants.extend(piece.wants)
            allreduce = allreduce or piece.allreduce
            ids = set(piece.contributors)
            if not ids:
                continue
            if ids & covered:
                if not ids <= covered:
                    log.error("channel %s round %d: overlapping pieces; dropping %d contributors",
                              self.name, r, len(ids - covered))
                continue
            covered |= ids
            values.append(piece.data)
            own_first = own_first or (len(values) == 1 and piece is own_piece and self._own_is_callers)
        value = self._combine(values, own_first)
        ids = sorted(covered)
        log.debug("%x %s round %d complete: %d contributors from %d pieces", self.me, self.name, r, len(ids), len(pieces))
        del self.rounds[r]
        self._short.pop(r, None)
        seen = set()
        for member, address in wants:
            if member in seen:
                continue
            seen.add(member)
            if member == self.me:
                self._resolve(r, value, ids)
            else:
                self.rt.send_to(member, address,
                                m.Result(channel=self.name, round=r, contributors=ids, data=value))
        self.publish("r", {"round": r, "contributors": ids, "all": allreduce},
                     value if allreduce else None)

    def _resolve(self, r: int, value: Any, contributors: list) -> None:
        fut = self._waiters.get(r)
        if fut is not None and not fut.done():
            fut.set_result((value, contributors))

    def holds_early(self, msg: m.Message) -> bool:
        # A child re-wired under us may send its first piece of a round before our own
        # re-wiring names it: taken as a stranger's (late) piece, the child would never
        # count as done for that round, and the round would wait for it for ever.
        return isinstance(msg, m.Piece)

    def on_early_message(self, sender: int, msg: m.Message) -> None:
        self._on_piece(sender, msg)  # type: ignore[arg-type]

    def on_controller(self, msg: m.Message) -> None:
        if isinstance(msg, m.Gone):  # known at once, before its item is in the stream
            self._gone(msg.member, graceful=bool(msg.graceful))
        super().on_controller(msg)

    def on_rewire(self, msg: m.Rewire) -> None:
        if msg.removed is not None and msg.removed != self.me:
            self._gone(msg.removed, progress=False)  # before the re-wiring lets a round complete
        super().on_rewire(msg)

    def _gone(self, member: int, progress: bool = True, graceful: bool | None = None) -> None:
        self._gone_since.add(member)
        if self._expect is not None:
            self._expect.discard(member)
        if graceful:
            self._blind.pop(member, None)
        elif self.done_up_to < 0 and member not in self._blind:
            # A failure before any round completed: who else took part (e.g. the members
            # of a host daemon that died, on their way back directly) is not known, so the
            # first round waits out the grace at the root (see ``_may_complete``). (A
            # graceful leave, told by the controller right after, lifts this.)
            self._blind[member] = asyncio.get_running_loop().time() + self.rt.heartbeat_timeout + REASSEMBLY_MARGIN
        if progress:
            self.progress()

    async def on_kind_message(self, sender: int, msg: m.Message) -> None:
        match msg:
            case m.Piece():
                self._on_piece(sender, msg)
            case m.Result():
                self._resolve(msg.round, msg.data, msg.contributors)
            case _:
                await super().on_kind_message(sender, msg)

    def _on_piece(self, sender: int, piece: m.Piece) -> None:
        r = piece.round
        log.debug("%x %s piece round %d from %x late=%s (sent_up_to %d, done_up_to %d)", self.me, self.name, r,
                  sender, piece.late, self._sent_up_to, self.done_up_to)
        if not self.fn_name and piece.fn:
            self.fn_name = piece.fn
        if r <= self.done_up_to:
            return  # the round is complete: this is a copy of something already counted
        if piece.late or r <= self._sent_up_to or sender not in self.children:
            if self.is_root:
                self.rounds.setdefault(r, _Round()).late.append(piece)
            else:
                piece.late = True
                self.retained.setdefault(r, []).append(piece)
                self.send_parent(piece)
        else:
            rnd = self.rounds.setdefault(r, _Round())
            if sender in rnd.first:
                log.warning("channel %s: duplicate piece for round %d from %x", self.name, r, sender)
                return
            rnd.first[sender] = piece
            self._fold(sender, rnd, piece)
        self.progress()

    async def on_item(self, item: m.Item) -> None:
        if item.kind == "g":
            self._gone(item.meta["member"], graceful=bool(item.meta.get("graceful")))
            return
        if item.kind != "r":
            return
        r = item.meta["round"]
        if r > self.done_up_to:
            # (a departure already known may have come before the round's item)
            self._last_contributors = [x for x in item.meta["contributors"] if x not in self._gone_since]
            self._gone_since.clear()
        self.done_up_to = max(self.done_up_to, r)
        for old in [k for k in self.retained if k <= r]:
            del self.retained[old]
        if item.meta.get("all"):
            self._resolve(r, freeze(item.data), item.meta["contributors"])
        if not self.is_root:
            if r > self._sent_up_to:
                # Complete without what we had still to send: we were out of the tree.
                # Those rounds are over for us (a plain reduce's result will not come).
                for k in range(self._sent_up_to + 1, r + 1):
                    fut = self._waiters.get(k)
                    if fut is not None and not fut.done():
                        fut.set_exception(self._left_out(k))
                self._sent_up_to = r
                for old in [k for k in self.rounds if k <= r]:
                    del self.rounds[old]
            for old in [k for k in self.rounds if k <= r and self.rounds[k].sent]:
                del self.rounds[old]

    def _fail_waiters(self, exc: BaseException) -> None:
        self._end_holds()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
