"""Sans-IO tree of one channel: join / remove / rebalance -> the re-wirings to send.

The controller owns one :class:`Tree` per channel. Every mutating call returns a
:class:`Changes` whose :class:`Rewire` records are the only messages the controller has to
send: each names one member and its complete neighbourhood *after* the operation, so a
member never needs to know what happened, only where it now sits.

Cost contract (DESIGN.md §3.3): ``join`` and ``remove`` do O(log n) work at most and never
walk the members, so joining the 160,000th member costs what joining the 10th does. That is
why the tree keeps, besides the parent / children links:

* ``_levels[d]``: the members at depth ``d``. Its length gives the count per depth (for the
  balance test) and its last level holds only leaves, so "a deepest leaf" is O(1).
* ``_open[d]``: the members at depth ``d`` that still have a free slot, only for depths that
  have one, so "the shallowest node with a free slot" is the first of ``_open[min(_open)]``:
  O(depth) = O(log n).

A lone root has neither index, nor a children list (they are built when the second member
joins): a process that joins many channels mostly creates one-member trees, and every container
a tree keeps is one more object for Python's cyclic garbage collector to walk on each full
collection (a lone root's tree is two of them with its channel record, instead of ten).

Both are ``OrderedDict``s used as insertion-ordered sets: unlike a plain ``dict``, taking its
first item stays O(1) after many deletions from the front (a ``dict`` iterator has to skip the
deleted slots, which makes filling a level quadratic). They also make every choice
deterministic: joins fill the oldest open node of a level first (breadth-first, like a complete
tree), repairs take the newest deepest leaf.

``work`` counts inner-loop steps of the mutating calls, so tests can prove the bound without
timing anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

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

# The depth index of a tree with at most one member: immutable, so that a lone root costs no list
# and anything that would index it by mistake fails loudly (the second join builds the index).
_NO_LEVELS: tuple = ()


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

    __slots__ = ("fanout", "depth_slack", "work", "_root", "_parent", "_children", "_depth", "_levels", "_open")

    def __init__(self, fanout: int = 4, depth_slack: int = 1) -> None:
        # A fan-out of 1 is a chain: no O(log n) depth, nothing to balance.
        if fanout < 2:
            raise ValueError(f"fanout must be >= 2, got {fanout}")
        if depth_slack < 0:
            raise ValueError(f"depth_slack must be >= 0, got {depth_slack}")
        self.fanout = fanout
        self.depth_slack = depth_slack
        self.work = 0
        self._root: Hashable | None = None
        self._parent: dict[Hashable, Hashable | None] = {}
        self._children: dict[Hashable, list[Hashable]] = {}
        self._depth: dict[Hashable, int] = {}
        # Both empty until a second member joins (see the module docstring).
        self._levels: list[OrderedDict[Hashable, None]] | tuple = _NO_LEVELS
        self._open: dict[int, OrderedDict[Hashable, None]] = {}

    # ----------------------------------------------------------------- queries

    @property
    def root(self) -> Hashable | None:
        return self._root

    @property
    def max_depth(self) -> int:
        """Depth of the deepest member; -1 when the tree is empty."""
        if not self._levels:
            return -1 if self._root is None else 0
        return len(self._levels) - 1

    def parent(self, member: Hashable) -> Hashable | None:
        return self._parent[member]

    def children(self, member: Hashable) -> tuple:
        kids = self._children.get(member)
        if kids is not None:
            return tuple(kids)
        if member in self._parent:  # a lone root, not indexed yet
            return ()
        raise KeyError(member)

    def depth(self, member: Hashable) -> int:
        return self._depth[member]

    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, member: object) -> bool:
        return member in self._parent

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._parent)

    def needs_rebalance(self) -> bool:
        return self.max_depth > ideal_depth(len(self), self.fanout) + self.depth_slack

    # ---------------------------------------------------------------- mutations

    def join(self, member: Hashable) -> Changes:
        """Add ``member`` as a leaf under the shallowest node with a free slot."""
        if member is None:
            raise ValueError("None cannot be a member: it means 'no parent' in a Rewire")
        if member in self._parent:
            raise ValueError(f"{member!r} is already a member")
        if self._root is None:
            self._root = member
            self._parent[member] = None
            self._depth[member] = 0
            return Changes([Rewire(member, None, (), 0)], root_changed=True)
        if not self._levels:
            self._index_root()
        # _take_open_node + _attach_leaf, spelled out: this is the controller's hot path (a join
        # storm of one channel), and the helpers' calls cost more than their work.
        open_nodes = self._open
        self.work += len(open_nodes)
        parent_depth = min(open_nodes)
        bucket = open_nodes[parent_depth]
        parent = next(iter(bucket))
        kids = self._children[parent]
        kids.append(member)
        depth = parent_depth + 1
        self._parent[member] = parent
        self._children[member] = []
        self._depth[member] = depth
        levels = self._levels
        if depth == len(levels):
            levels.append(OrderedDict())
        levels[depth][member] = None
        leaves = open_nodes.get(depth)  # a new leaf has free slots (fanout >= 2)
        if leaves is None:
            leaves = open_nodes[depth] = OrderedDict()
        leaves[member] = None
        if len(kids) >= self.fanout:  # the parent is full now (else it keeps its place in its bucket)
            del bucket[parent]
            if not bucket:
                del open_nodes[parent_depth]
        return Changes([_new_rewire(Rewire, (member, parent, (), depth)),
                        _new_rewire(Rewire, (parent, self._parent[parent], tuple(kids), parent_depth))], False)

    def remove(self, member: Hashable) -> Changes:
        """Graceful leave or failure: same repair, touching only the member's neighbours.

        A leaf just disappears. An interior node's place is taken by a deepest leaf, so no
        other member changes depth and the hole's children keep their slots.
        """
        if member not in self._parent:
            raise KeyError(member)
        if len(self) == 1:
            self._clear()
            return Changes([], root_changed=True, removed=member)
        if not self._children[member]:
            parent = self._unlink(member)
            self._forget(member)
            return Changes([self._rewire(parent)], root_changed=False, removed=member)

        # Interior node: the deepest level holds only leaves, and ``member`` has children,
        # so the leaf taken from it is never ``member`` itself.
        leaf = next(reversed(self._levels[-1]))
        leaf_old_parent = self._unlink(leaf)
        hole_parent = self._parent[member]
        self._fill_hole(member, leaf)
        touched = [hole_parent, *self._children[leaf], leaf]
        if leaf_old_parent != member:
            touched.append(leaf_old_parent)
        return Changes(
            self._rewires(touched), root_changed=hole_parent is None, removed=member
        )

    def rebalance(self) -> Changes:
        """Move deepest leaves up until ``max_depth <= ideal + depth_slack``.

        Does nothing (empty Changes) when not needed. The root never moves: it is never a
        deepest leaf while there is anything to rebalance.
        """
        if not self.needs_rebalance():
            return Changes([], root_changed=False)
        limit = ideal_depth(len(self), self.fanout) + self.depth_slack
        touched: list[Hashable] = []
        while self.max_depth > limit:
            self.work += 1
            leaf = next(reversed(self._levels[-1]))
            old_depth = self._depth[leaf]
            old_parent = self._unlink(leaf)
            new_parent = self._take_open_node()
            # Always a gain: were depths 0..old_depth-2 all full, the tree would outgrow a
            # complete tree of depth old_depth - 1, so ideal >= old_depth > limit.
            assert self._depth[new_parent] + 1 < old_depth, "rebalance found no higher slot"
            self._attach_leaf(leaf, new_parent)
            touched += (leaf, old_parent, new_parent)
        # A member touched by several moves gets one Rewire with its final neighbourhood.
        return Changes(self._rewires(touched), root_changed=False)

    # ------------------------------------------------------------- link surgery

    def _index_root(self) -> None:
        """Build the children list and depth indexes of a lone root (a second member is joining)."""
        root = self._root
        self._children[root] = []
        self._levels = [OrderedDict({root: None})]
        self._open[0] = OrderedDict({root: None})

    def _place(self, member: Hashable, parent: Hashable | None, depth: int) -> None:
        """Record a new childless member at ``depth`` (its parent's list is the caller's)."""
        self._parent[member] = parent
        self._children[member] = []
        self._depth[member] = depth
        if depth == len(self._levels):
            self._levels.append(OrderedDict())
        self._levels[depth][member] = None
        self._mark_open(member)

    def _attach_leaf(self, leaf: Hashable, parent: Hashable) -> None:
        """Hang ``leaf`` (new, or just unlinked) in the last slot of ``parent``."""
        self._children[parent].append(leaf)
        self._place(leaf, parent, self._depth[parent] + 1)
        self._refresh_open(parent)

    def _unlink(self, member: Hashable) -> Hashable:
        """Cut a non-root member from its parent, its level and the open buckets.

        Its own entries (and children list) stay, so it can be re-placed or forgotten.
        Returns the old parent.
        """
        parent = self._parent[member]
        self._unmark_open(member)
        del self._levels[self._depth[member]][member]
        # Depths are contiguous in a tree, so only the last level can become empty.
        while not self._levels[-1]:
            self.work += 1
            self._levels.pop()
        self._children[parent].remove(member)  # O(fanout)
        self._refresh_open(parent)
        return parent

    def _fill_hole(self, hole: Hashable, leaf: Hashable) -> None:
        """Put the unlinked ``leaf`` exactly where ``hole`` is, then drop ``hole``."""
        parent, depth = self._parent[hole], self._depth[hole]
        if parent is None:
            self._root = leaf
        else:
            siblings = self._children[parent]
            siblings[siblings.index(hole)] = leaf  # same slot: siblings keep their order
        kids = self._children[hole]
        for kid in kids:
            self.work += 1
            self._parent[kid] = leaf
        self._parent[leaf] = parent
        self._children[leaf] = kids
        self._depth[leaf] = depth
        # Add the leaf to the level before removing the hole so the level is never empty.
        self._levels[depth][leaf] = None
        self._unmark_open(hole)
        del self._levels[depth][hole]
        self._forget(hole)
        self._refresh_open(leaf)

    def _clear(self) -> None:
        self._root = None
        self._levels = _NO_LEVELS
        for index in (self._parent, self._children, self._depth, self._open):
            index.clear()

    def _forget(self, member: Hashable) -> None:
        del self._parent[member], self._children[member], self._depth[member]

    # --------------------------------------------------------- free-slot index

    def _mark_open(self, member: Hashable) -> None:
        depth = self._depth[member]
        bucket = self._open.get(depth)
        if bucket is None:
            bucket = self._open[depth] = OrderedDict()
        bucket[member] = None

    def _unmark_open(self, member: Hashable) -> None:
        depth = self._depth[member]
        bucket = self._open.get(depth)
        if bucket is not None:
            bucket.pop(member, None)
            if not bucket:
                del self._open[depth]

    def _refresh_open(self, member: Hashable) -> None:
        if len(self._children[member]) < self.fanout:
            self._mark_open(member)  # an already-open member keeps its place (FIFO)
        else:
            self._unmark_open(member)

    def _take_open_node(self) -> Hashable:
        """The oldest member with a free slot at the shallowest such depth.

        The caller attaches a child to it, which refreshes its open status. Buckets are never
        kept empty, and a non-empty tree always has an open leaf.
        """
        self.work += len(self._open)  # one step per depth that has a free slot: O(log n)
        return next(iter(self._open[min(self._open)]))

    # ---------------------------------------------------------------- messages

    def _rewire(self, member: Hashable) -> Rewire:
        return Rewire(
            member, self._parent[member], tuple(self._children[member]), self._depth[member]
        )

    def _rewires(self, touched: Iterable[Hashable | None]) -> list[Rewire]:
        """One Rewire per distinct member still in the tree, in first-touched order."""
        return [
            self._rewire(m) for m in dict.fromkeys(touched) if m is not None and m in self
        ]

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """O(n) walk for tests: raise AssertionError naming the first broken invariant."""
        n = len(self)
        lone = n == 1 and not self._levels  # a lone root, not indexed yet
        assert self._parent.keys() == self._depth.keys(), "parent / depth maps disagree on the member set"
        assert self._children.keys() == (set() if lone else self._parent.keys()), (
            "parent / children maps disagree on the member set"
        )
        if n == 0:
            assert self._root is None, f"empty tree has root {self._root!r}"
            assert not self._levels and not self._open, "empty tree keeps depth indexes"
            return
        assert self._root in self._parent, f"root {self._root!r} is not a member"
        assert self._parent[self._root] is None, f"root {self._root!r} has a parent"
        if not self._levels:
            assert lone and not self._open, f"{n} members but no depth index"
            assert self._depth[self._root] == 0, "lone root is not at depth 0"
            return

        seen: set[Hashable] = set()
        per_depth: list[list[Hashable]] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            assert node not in seen, f"{node!r} reached twice: not a tree"
            seen.add(node)
            depth, kids = self._depth[node], self._children[node]
            parent = self._parent[node]
            expected = 0 if parent is None else self._depth[parent] + 1
            assert depth == expected, f"{node!r} has depth {depth}, expected {expected}"
            assert len(kids) <= self.fanout, (
                f"{node!r} has {len(kids)} children > fanout {self.fanout}"
            )
            while len(per_depth) <= depth:
                per_depth.append([])
            per_depth[depth].append(node)
            for kid in kids:
                assert kid in self._parent, f"child {kid!r} of {node!r} is not a member"
                assert self._parent[kid] == node, (
                    f"{kid!r} is a child of {node!r} but its parent is "
                    f"{self._parent[kid]!r}"
                )
            stack.extend(kids)
        assert len(seen) == n, f"only {len(seen)} of {n} members reachable from the root"

        assert len(self._levels) == len(per_depth), (
            f"max_depth is {self.max_depth}, walk found {len(per_depth) - 1}"
        )
        for depth, nodes in enumerate(per_depth):
            assert set(self._levels[depth]) == set(nodes), f"level {depth} index is wrong"
            open_nodes = {m for m in nodes if len(self._children[m]) < self.fanout}
            assert set(self._open.get(depth, ())) == open_nodes, (
                f"free-slot index at depth {depth} is wrong"
            )
        assert all(self._open.values()), "an empty free-slot bucket was kept"
