"""Sans-IO tree of one channel: join / remove / rebalance -> the re-wirings to send.

The controller owns one :class:`Tree` per channel. Every mutating call returns a
:class:`Changes` whose :class:`Rewire` records are the only messages the controller has to
send: each names one member and its complete neighbourhood *after* the operation, so a
member never needs to know what happened, only where it now sits.

Cost contract (DESIGN.md §3.3): ``join`` and ``remove`` do O(log n) work at most and never
walk the members, so joining the 160,000th member costs what joining the 10th does.

Dense slots. Every member has a slot, a small integer, and everything the tree knows about it
lives in lists indexed by slot; the member -> slot map (``_slot``) is the only hash table, and a
join touches it once, to add the joiner. Besides being O(1), that keeps a join's memory traffic
flat as the channel grows: a dict keyed by member ids that differ only in their high bits
(``host << 32 | counter``: Python hashes an int by its value, so such ids share their low hash
bits) puts the ids of different hosts on the same probe chains, and with 160,000 members every
probe of those chains is a cache miss. Per slot:

* ``_ids`` the member (None: a free slot, kept in ``_free`` for the next join), ``_data`` a
  value the caller keeps with the member (the controller: its wire entry, which it sends in
  every Rewire naming the member), ``_up`` the parent's slot (-1: the root), ``_depth``;
* ``_kids[slot * fanout:][:_nkids[slot]]`` the children's slots, in slot order;
* links of two kinds of insertion-ordered lists, one list per depth, intrusive (doubly linked
  through ``_lprev``/``_lnext`` and ``_oprev``/``_onext``), so that appending, unlinking any
  member, and taking the first or last are O(1):

  - level ``d`` (heads / tails / sizes in ``_lhead``/``_ltail``/``_lsize``): the members at depth
    ``d``. Its size gives the count per depth (for the balance test) and the last level holds
    only leaves, so "a deepest leaf" is O(1);
  - open list ``d`` (``_ohead``/``_otail``): the members at depth ``d`` that still have a free
    slot (``_oprev[slot] == _SHUT`` marks the others). ``_min_open`` is a depth no open member
    is above, so "the shallowest node with a free slot" is the head of the first non-empty open
    list from there: O(depth) = O(log n) at worst, one step in a join storm.

The lists make every choice deterministic: joins fill the oldest open node of a level first
(breadth-first, like a complete tree), repairs take the newest deepest leaf.

A lone root has no slot lists (they are built when the second member joins): a process that
joins many channels mostly creates one-member trees, and every list is one more object for
Python's cyclic garbage collector to walk on each full collection. A lone root is ``_root``,
its slot 0 in ``_slot`` and its value in ``_lone_data``. The slot lists hold no per-member
container either (no children list per member), so a tree of any size is a fixed number of
objects for the collector.

``work`` counts inner-loop steps of the mutating calls, so tests can prove the bound without
timing anything.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Changes", "Rewire", "Tree", "ideal_depth"]


class Rewire(NamedTuple):
    """One message to one member: its neighbourhood after the whole operation.

    A named tuple rather than a frozen dataclass: two are built per join, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) cost more than the join itself."""

    member: Hashable
    parent: Hashable | None  # None = the member is the root
    children: tuple  # in slot order
    depth: int


@dataclass(slots=True)
class Changes:
    """What one operation changed; each member appears at most once in ``rewires``."""

    rewires: list[Rewire]
    root_changed: bool
    removed: Hashable | None = None


# Rewire(*fields) without the Python-level __new__ a NamedTuple has (Tree.join makes two per join).
_new_rewire = tuple.__new__

# The slot lists of a tree with at most one member: immutable, so that a lone root costs no list
# and anything that would index them by mistake fails loudly (the second join builds them).
_NO_SLOTS: tuple = ()

_NIL = -1  # no slot: the root's parent, the ends of a list, an empty list's head
_SHUT = -2  # in _oprev: the member is in no open list (all its child slots are taken)


def ideal_depth(n: int, fanout: int) -> int:
    """Depth of a complete ``fanout``-ary tree with ``n`` nodes (0 for n <= 1). O(log n)."""
    depth, capacity, width = 0, 1, 1
    while capacity < n:
        width *= fanout
        capacity += width
        depth += 1
    return depth


class Tree:
    """The tree of one channel. Members are hashable ids; ``None`` is reserved (no parent)."""

    __slots__ = ("fanout", "depth_slack", "work", "_blank", "_root", "_slot", "_lone_data", "_free",
                 "_ids", "_data", "_up", "_depth", "_kids", "_nkids", "_lprev", "_lnext", "_oprev", "_onext",
                 "_lhead", "_ltail", "_lsize", "_ohead", "_otail", "_min_open")

    def __init__(self, fanout: int = 4, depth_slack: int = 1) -> None:
        # A fan-out of 1 is a chain: no O(log n) depth, nothing to balance.
        if fanout < 2:
            raise ValueError(f"fanout must be >= 2, got {fanout}")
        if depth_slack < 0:
            raise ValueError(f"depth_slack must be >= 0, got {depth_slack}")
        self.fanout = fanout
        self.depth_slack = depth_slack
        self.work = 0
        self._blank = (_NIL,) * fanout  # the child slots of a new slot
        self._reset()

    def _reset(self) -> None:
        """Empty: no member, no slot lists."""
        self._root: Hashable | None = None
        self._slot: dict[Hashable, int] = {}
        self._lone_data: Any = None
        self._min_open = 0
        # All empty until a second member joins (see the module docstring).
        self._free = self._ids = self._data = self._up = self._depth = self._kids = self._nkids = _NO_SLOTS
        self._lprev = self._lnext = self._oprev = self._onext = _NO_SLOTS
        self._lhead = self._ltail = self._lsize = self._ohead = self._otail = _NO_SLOTS

    # ----------------------------------------------------------------- queries

    @property
    def root(self) -> Hashable | None:
        return self._root

    @property
    def max_depth(self) -> int:
        """Depth of the deepest member; -1 when the tree is empty."""
        if not self._lhead:
            return -1 if self._root is None else 0
        return len(self._lhead) - 1

    def parent(self, member: Hashable) -> Hashable | None:
        slot = self._slot[member]
        if not self._ids:  # a lone root
            return None
        up = self._up[slot]
        return None if up == _NIL else self._ids[up]

    def children(self, member: Hashable) -> tuple:
        slot = self._slot[member]
        if not self._ids:
            return ()
        ids, base = self._ids, slot * self.fanout
        return tuple([ids[kid] for kid in self._kids[base:base + self._nkids[slot]]])

    def depth(self, member: Hashable) -> int:
        slot = self._slot[member]
        return self._depth[slot] if self._ids else 0

    def data(self, member: Hashable) -> Any:
        """The value kept with ``member`` (given to :meth:`join`, changed by :meth:`set_data`)."""
        slot = self._slot[member]
        return self._data[slot] if self._ids else self._lone_data

    def set_data(self, member: Hashable, value: Any) -> None:
        slot = self._slot[member]
        if self._ids:
            self._data[slot] = value
        else:
            self._lone_data = value

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, member: object) -> bool:
        return member in self._slot

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._slot)

    def needs_rebalance(self) -> bool:
        return self.max_depth > ideal_depth(len(self), self.fanout) + self.depth_slack

    # ---------------------------------------------------------------- mutations

    def join(self, member: Hashable, data: Any = None) -> Changes:
        """Add ``member`` (keeping ``data`` with it) as a leaf under the shallowest node with a
        free slot."""
        slot, up = self._join(member, data)
        if up == _NIL:
            return Changes([Rewire(member, None, (), 0)], root_changed=True)
        ids, depths = self._ids, self._depth
        parent, grand, base = ids[up], self._up[up], up * self.fanout
        return Changes([_new_rewire(Rewire, (member, parent, (), depths[slot])),
                        _new_rewire(Rewire, (parent, None if grand == _NIL else ids[grand],
                                             tuple([ids[kid] for kid in self._kids[base:base + self._nkids[up]]]),
                                             depths[up]))], False)

    def join_data(self, member: Hashable, data: Any) -> tuple | None:
        """:meth:`join` for a caller that sends the members' data rather than their ids (the
        controller: data = wire entry). None when ``member`` became the root (alone); else
        ``(parent, parent's data, depth, parent's parent's data or None, [parent's children's
        data], parent's depth)``: the joiner's place, and its parent's neighbourhood."""
        slot, up = self._join(member, data)
        if up == _NIL:
            return None
        values, depths = self._data, self._depth
        grand, base = self._up[up], up * self.fanout
        return (self._ids[up], values[up], depths[slot], None if grand == _NIL else values[grand],
                [values[kid] for kid in self._kids[base:base + self._nkids[up]]], depths[up])

    def remove(self, member: Hashable) -> Changes:
        """Graceful leave or failure: same repair, touching only the member's neighbours.

        A leaf just disappears. An interior node's place is taken by a deepest leaf, so no
        other member changes depth and the hole's children keep their slots.
        """
        slot = self._slot[member]  # KeyError for a stranger
        if len(self._slot) == 1:
            self._clear()
            return Changes([], root_changed=True, removed=member)
        if not self._nkids[slot]:
            parent = self._unlink(slot)
            self._forget(slot)
            return Changes([self._rewire(parent)], root_changed=False, removed=member)

        # Interior node: the deepest level holds only leaves, and ``member`` has children,
        # so the leaf taken from it is never ``member`` itself.
        leaf = self._ltail[-1]
        leaf_old_parent = self._unlink(leaf)
        hole_parent = self._up[slot]
        self._fill_hole(slot, leaf)
        base = leaf * self.fanout
        touched = [hole_parent, *self._kids[base:base + self._nkids[leaf]], leaf]
        if leaf_old_parent != slot:
            touched.append(leaf_old_parent)
        return Changes(self._rewires(touched), root_changed=hole_parent == _NIL, removed=member)

    def rebalance(self) -> Changes:
        """Move deepest leaves up until ``max_depth <= ideal + depth_slack``.

        Does nothing (empty Changes) when not needed. The root never moves: it is never a
        deepest leaf while there is anything to rebalance.
        """
        if not self.needs_rebalance():
            return Changes([], root_changed=False)
        limit = ideal_depth(len(self), self.fanout) + self.depth_slack
        touched: list[int] = []
        depths = self._depth
        while self.max_depth > limit:
            self.work += 1
            leaf = self._ltail[-1]
            old_depth = depths[leaf]
            old_parent = self._unlink(leaf)
            new_parent = self._take_open_node()
            # Always a gain: were depths 0..old_depth-2 all full, the tree would outgrow a
            # complete tree of depth old_depth - 1, so ideal >= old_depth > limit.
            assert depths[new_parent] + 1 < old_depth, "rebalance found no higher slot"
            self._attach(leaf, new_parent)
            touched += (leaf, old_parent, new_parent)
        # A member touched by several moves gets one Rewire with its final neighbourhood.
        return Changes(self._rewires(touched), root_changed=False)

    # ------------------------------------------------------------- link surgery

    def _join(self, member: Hashable, data: Any) -> tuple[int, int]:
        """Place ``member``: (its slot, its parent's slot or _NIL when it is the first member)."""
        if member is None:
            raise ValueError("None cannot be a member: it means 'no parent' in a Rewire")
        slots = self._slot
        if member in slots:
            raise ValueError(f"{member!r} is already a member")
        if self._root is None:
            self._root = member
            slots[member] = 0
            self._lone_data = data
            return 0, _NIL
        if not self._ids:
            self._index_root()
        # _take_open_node and _attach spelled out, with the new slot's lists: this is the controller's
        # hot path (a join storm of one channel), and the helpers' calls cost more than their work.
        ohead, depth = self._ohead, self._min_open
        up = ohead[depth]
        while up == _NIL:  # the shallowest open list moved down (its last node filled up)
            self.work += 1
            depth += 1
            up = ohead[depth]
        self.work += 1
        self._min_open = depth
        free = self._free
        if free:
            slot = free.pop()
            self._ids[slot], self._data[slot], self._up[slot], self._depth[slot] = member, data, up, depth + 1
            self._nkids[slot] = 0
        else:
            slot = len(self._ids)
            self._ids.append(member)
            self._data.append(data)
            self._up.append(up)
            self._depth.append(depth + 1)
            self._nkids.append(0)
            self._kids.extend(self._blank)
            self._lprev.append(_NIL)
            self._lnext.append(_NIL)
            self._oprev.append(_SHUT)
            self._onext.append(_NIL)
        slots[member] = slot
        nkids = self._nkids
        count = nkids[up]
        self._kids[up * self.fanout + count] = slot
        nkids[up] = count = count + 1
        if depth + 1 == len(self._lhead):
            self._add_level()
        self._append_level(slot, depth + 1)
        self._append_open(slot, depth + 1)  # a new leaf has free slots (fanout >= 2)
        if count >= self.fanout:  # the parent is full now (else it keeps its place in its list)
            self._remove_open(up, depth)
        return slot, up

    def _index_root(self) -> None:
        """Build the slot lists around a lone root (a second member is joining): slot 0."""
        self._ids, self._data, self._up, self._depth, self._nkids = [self._root], [self._lone_data], [_NIL], [0], [0]
        self._lone_data = None
        self._kids = list(self._blank)
        self._lprev, self._lnext, self._oprev, self._onext = [_NIL], [_NIL], [_SHUT], [_NIL]
        self._free = []
        self._lhead, self._ltail, self._lsize, self._ohead, self._otail = [], [], [], [], []
        self._add_level()
        self._append_level(0, 0)
        self._append_open(0, 0)

    def _attach(self, leaf: int, parent: int) -> None:
        """Hang ``leaf`` (just unlinked) in the last slot of ``parent``."""
        count = self._nkids[parent]
        self._kids[parent * self.fanout + count] = leaf
        self._nkids[parent] = count + 1
        depth = self._depth[parent] + 1
        self._up[leaf], self._depth[leaf] = parent, depth
        if depth == len(self._lhead):
            self._add_level()
        self._append_level(leaf, depth)
        self._refresh_open(leaf)
        self._refresh_open(parent)

    def _unlink(self, slot: int) -> int:
        """Cut a non-root member from its parent, its level and the open lists.

        Its own slot (and children) stay, so it can be re-placed or forgotten. Returns the old
        parent's slot.
        """
        parent = self._up[slot]
        self._remove_open(slot, self._depth[slot])
        self._remove_level(slot, self._depth[slot])
        # Depths are contiguous in a tree, so only the last level can become empty.
        while not self._lsize[-1]:
            self.work += 1
            for column in (self._lhead, self._ltail, self._lsize, self._ohead, self._otail):
                column.pop()
        if self._min_open >= len(self._lhead):
            self._min_open = len(self._lhead) - 1
        kids, base, count = self._kids, parent * self.fanout, self._nkids[parent]
        at = kids.index(slot, base, base + count)  # O(fanout); the later siblings move up one place
        kids[at:base + count - 1] = kids[at + 1:base + count]
        kids[base + count - 1] = _NIL
        self._nkids[parent] = count - 1
        self._refresh_open(parent)
        return parent

    def _fill_hole(self, hole: int, leaf: int) -> None:
        """Put the unlinked ``leaf`` exactly where ``hole`` is, then drop ``hole``."""
        parent, depth = self._up[hole], self._depth[hole]
        if parent == _NIL:
            self._root = self._ids[leaf]
        else:
            kids, base = self._kids, parent * self.fanout
            kids[kids.index(hole, base, base + self._nkids[parent])] = leaf  # same slot: siblings keep their order
        fanout, count = self.fanout, self._nkids[hole]
        hole_base, leaf_base = hole * fanout, leaf * fanout
        for at in range(count):
            self.work += 1
            kid = self._kids[hole_base + at]
            self._up[kid] = leaf
            self._kids[leaf_base + at] = kid
        self._nkids[leaf] = count
        self._up[leaf], self._depth[leaf] = parent, depth
        # Add the leaf to the level before removing the hole so the level is never empty.
        self._append_level(leaf, depth)
        self._remove_open(hole, depth)
        self._remove_level(hole, depth)
        self._forget(hole)
        self._refresh_open(leaf)

    def _clear(self) -> None:
        self._reset()

    def _forget(self, slot: int) -> None:
        """Free ``slot`` (unlinked from everything) for a later join."""
        del self._slot[self._ids[slot]]
        self._ids[slot] = self._data[slot] = None
        base = slot * self.fanout
        self._kids[base:base + self.fanout] = self._blank
        self._nkids[slot] = 0
        self._free.append(slot)

    # ------------------------------------------------------ the per-depth lists

    def _add_level(self) -> None:
        for column in (self._lhead, self._ltail, self._ohead, self._otail):
            column.append(_NIL)
        self._lsize.append(0)

    def _append_level(self, slot: int, depth: int) -> None:
        tail = self._ltail[depth]
        self._lprev[slot], self._lnext[slot] = tail, _NIL
        if tail == _NIL:
            self._lhead[depth] = slot
        else:
            self._lnext[tail] = slot
        self._ltail[depth] = slot
        self._lsize[depth] += 1

    def _remove_level(self, slot: int, depth: int) -> None:
        prev, after = self._lprev[slot], self._lnext[slot]
        if prev == _NIL:
            self._lhead[depth] = after
        else:
            self._lnext[prev] = after
        if after == _NIL:
            self._ltail[depth] = prev
        else:
            self._lprev[after] = prev
        self._lsize[depth] -= 1

    def _append_open(self, slot: int, depth: int) -> None:
        tail = self._otail[depth]
        self._oprev[slot], self._onext[slot] = tail, _NIL
        if tail == _NIL:
            self._ohead[depth] = slot
        else:
            self._onext[tail] = slot
        self._otail[depth] = slot
        if depth < self._min_open:
            self._min_open = depth

    def _remove_open(self, slot: int, depth: int) -> None:
        """Take ``slot`` out of its open list (nothing if it is in none)."""
        prev = self._oprev[slot]
        if prev == _SHUT:
            return
        after = self._onext[slot]
        if prev == _NIL:
            self._ohead[depth] = after
        else:
            self._onext[prev] = after
        if after == _NIL:
            self._otail[depth] = prev
        else:
            self._oprev[after] = prev
        self._oprev[slot] = _SHUT

    def _refresh_open(self, slot: int) -> None:
        if self._nkids[slot] < self.fanout:
            if self._oprev[slot] == _SHUT:  # an already-open member keeps its place (FIFO)
                self._append_open(slot, self._depth[slot])
        else:
            self._remove_open(slot, self._depth[slot])

    def _take_open_node(self) -> int:
        """The oldest member with a free slot at the shallowest such depth.

        The caller attaches a child to it, which refreshes its open status. A non-empty tree
        always has an open leaf, and no open member is above ``_min_open``.
        """
        ohead, depth = self._ohead, self._min_open
        self.work += 1
        while ohead[depth] == _NIL:  # one step per depth: O(log n)
            self.work += 1
            depth += 1
        self._min_open = depth
        return ohead[depth]

    # ---------------------------------------------------------------- messages

    def _rewire(self, slot: int) -> Rewire:
        ids, up, base = self._ids, self._up[slot], slot * self.fanout
        return Rewire(ids[slot], None if up == _NIL else ids[up],
                      tuple([ids[kid] for kid in self._kids[base:base + self._nkids[slot]]]), self._depth[slot])

    def _rewires(self, touched: Iterable[int]) -> list[Rewire]:
        """One Rewire per distinct slot still holding a member, in first-touched order."""
        ids = self._ids
        return [self._rewire(s) for s in dict.fromkeys(touched) if s != _NIL and ids[s] is not None]

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """O(n) walk for tests: raise AssertionError naming the first broken invariant."""
        n = len(self)
        if n == 0:
            assert self._root is None, f"empty tree has root {self._root!r}"
            assert not self._ids and not self._lhead, "empty tree keeps slot lists"
            return
        assert self._root in self._slot, f"root {self._root!r} is not a member"
        if not self._ids:
            assert n == 1 and self._slot[self._root] == 0, f"{n} members but no slot lists"
            return
        ids, fanout = self._ids, self.fanout
        slots = len(ids)
        for column in (self._data, self._up, self._depth, self._nkids, self._lprev, self._lnext,
                       self._oprev, self._onext):
            assert len(column) == slots, "slot lists differ in length"
        assert len(self._kids) == slots * fanout, "child slots do not match the slot count"
        for member, slot in self._slot.items():
            assert 0 <= slot < slots and ids[slot] == member, f"{member!r} is not in its slot {slot}"
        free = set(self._free)
        assert len(free) == len(self._free), "a slot is free twice"
        assert {s for s in range(slots) if ids[s] is None} == free, "free slots and empty slots differ"
        assert n + len(free) == slots, "members and free slots do not add up"
        root = self._slot[self._root]
        assert self._up[root] == _NIL, f"root {self._root!r} has a parent"

        seen: set[int] = set()
        per_depth: list[list[int]] = []
        stack = [root]
        while stack:
            node = stack.pop()
            assert node not in seen, f"{ids[node]!r} reached twice: not a tree"
            seen.add(node)
            depth, count = self._depth[node], self._nkids[node]
            up = self._up[node]
            expected = 0 if up == _NIL else self._depth[up] + 1
            assert depth == expected, f"{ids[node]!r} has depth {depth}, expected {expected}"
            assert 0 <= count <= fanout, f"{ids[node]!r} has {count} children > fanout {fanout}"
            block = self._kids[node * fanout:(node + 1) * fanout]
            assert all(k == _NIL for k in block[count:]), f"{ids[node]!r} keeps stale child slots"
            while len(per_depth) <= depth:
                per_depth.append([])
            per_depth[depth].append(node)
            for kid in block[:count]:
                assert 0 <= kid < slots and ids[kid] is not None, f"a child of {ids[node]!r} is not a member"
                assert self._up[kid] == node, (
                    f"{ids[kid]!r} is a child of {ids[node]!r} but its parent is "
                    f"{ids[self._up[kid]] if self._up[kid] != _NIL else None!r}"
                )
            stack.extend(block[:count])
        assert len(seen) == n, f"only {len(seen)} of {n} members reachable from the root"

        assert len(self._lhead) == len(per_depth), f"max_depth is {self.max_depth}, walk found {len(per_depth) - 1}"
        for column in (self._ltail, self._lsize, self._ohead, self._otail):
            assert len(column) == len(per_depth), "per-depth lists differ in length"
        for depth, nodes in enumerate(per_depth):
            level = self._walk(self._lhead[depth], self._lnext, self._lprev, self._ltail[depth])
            assert set(level) == set(nodes) and len(level) == len(nodes) == self._lsize[depth], (
                f"level {depth} index is wrong"
            )
            open_nodes = {s for s in nodes if self._nkids[s] < fanout}
            listed = self._walk(self._ohead[depth], self._onext, self._oprev, self._otail[depth])
            assert set(listed) == open_nodes and len(listed) == len(open_nodes), (
                f"free-slot index at depth {depth} is wrong"
            )
            assert all(self._oprev[s] == _SHUT for s in nodes if s not in open_nodes), (
                f"a full member at depth {depth} is marked open"
            )
            assert not open_nodes or depth >= self._min_open, f"an open member is above _min_open at depth {depth}"

    def _walk(self, head: int, after: list, before: list, tail: int) -> list[int]:
        """The slots of one list, head to tail, checking the backward links on the way."""
        out: list[int] = []
        prev, node = _NIL, head
        while node != _NIL:
            assert before[node] == prev, "a list's backward link is wrong"
            assert len(out) <= len(after), "a list loops"
            out.append(node)
            prev, node = node, after[node]
        assert prev == tail, "a list's tail is wrong"
        return out
