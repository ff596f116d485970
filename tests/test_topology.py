"""Tests for zipcomm.topology: the channel tree's shape, its messages and its cost bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from zipcomm.topology import Changes, Rewire, Tree, ideal_depth

# When a @given test fails, Hypothesis's pytest plugin imports libcst to suggest a patch, and
# libcst trips a mypy_extensions DeprecationWarning that filterwarnings=error turns into an
# INTERNALERROR hiding the real failure. Ignore exactly that warning, nothing else.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

# A join or a remove may take this many inner-loop steps at most, whatever n is.
WORK_BOUND = 64


def build(n: int, fanout: int = 2, depth_slack: int = 1) -> Tree:
    tree = Tree(fanout=fanout, depth_slack=depth_slack)
    for member in range(1, n + 1):
        tree.join(member)
    return tree


def by_member(changes: Changes) -> dict:
    members = [r.member for r in changes.rewires]
    assert len(members) == len(set(members)), f"a member is rewired twice: {members}"
    return {r.member: r for r in changes.rewires}


def neighbourhood(tree: Tree, member) -> Rewire:
    return Rewire(member, tree.parent(member), tree.children(member), tree.depth(member))


def shape(tree: Tree) -> dict:
    return {m: neighbourhood(tree, m) for m in tree}


def check_changes(tree: Tree, before: dict, changes: Changes) -> None:
    """Rewires are unique, describe the final tree, and reach everyone who moved."""
    after = shape(tree)
    rewired = by_member(changes)
    for rewire in changes.rewires:
        assert after.get(rewire.member) == rewire, f"stale {rewire}"
    moved = {m for m, n in after.items() if before.get(m) != n}
    assert moved <= rewired.keys(), f"not told: {moved - rewired.keys()}"
    old_root = next((m for m, n in before.items() if n.parent is None), None)
    assert changes.root_changed == (old_root != tree.root)


def complete_depth(n: int, fanout: int) -> int:
    """Oracle for ideal_depth, written differently: grow a complete tree level by level."""
    levels = [1]
    while sum(levels) < n:
        levels.append(levels[-1] * fanout)
    return len(levels) - 1


def balance_limit(tree: Tree) -> int:
    return complete_depth(len(tree), tree.fanout) + tree.depth_slack


def shallow_leaves(tree: Tree) -> list:
    return sorted(m for m in tree if not tree.children(m) and tree.depth(m) < tree.max_depth)


# ------------------------------------------------------------------------- construction


def test_constructor_rejects_bad_parameters():
    with pytest.raises(ValueError):
        Tree(fanout=1)
    with pytest.raises(ValueError):
        Tree(depth_slack=-1)


def test_ideal_depth_is_that_of_a_complete_tree():
    assert [ideal_depth(n, 2) for n in range(0, 16)] == [0, 0] + [1] * 2 + [2] * 4 + [3] * 8
    assert [ideal_depth(n, 4) for n in (1, 5, 6, 21, 22, 85, 86)] == [0, 1, 2, 2, 3, 3, 4]


def test_empty_tree():
    tree = Tree()
    assert len(tree) == 0 and tree.root is None and tree.max_depth == -1
    assert list(tree) == [] and 1 not in tree
    assert not tree.needs_rebalance()
    assert tree.rebalance() == Changes([], root_changed=False)
    tree.check_invariants()


# --------------------------------------------------------------------------------- join


def test_first_member_becomes_root_with_one_rewire():
    tree = Tree()
    changes = tree.join(1)
    assert changes == Changes([Rewire(1, None, (), 0)], root_changed=True)
    assert tree.root == 1 and len(tree) == 1 and 1 in tree and tree.max_depth == 0


def test_join_fills_shallowest_level_breadth_first():
    tree = build(7, fanout=2)
    assert tree.children(1) == (2, 3)
    assert tree.children(2) == (4, 5)
    assert tree.children(3) == (6, 7)
    assert [tree.depth(m) for m in range(1, 8)] == [0, 1, 1, 2, 2, 2, 2]
    assert tree.max_depth == 2
    tree.check_invariants()


def test_join_sends_two_rewires_new_member_and_parent():
    tree = build(7, fanout=2)
    changes = tree.join(8)
    assert changes == Changes(
        [Rewire(8, 4, (), 3), Rewire(4, 2, (8,), 2)], root_changed=False
    )


def test_join_rejects_duplicates_and_none():
    tree = build(3)
    with pytest.raises(ValueError, match="already a member"):
        tree.join(2)
    with pytest.raises(ValueError):
        tree.join(None)
    tree.check_invariants()


def test_join_reuses_a_slot_freed_higher_up():
    tree = build(7, fanout=2)
    tree.remove(6)
    changes = tree.join(8)
    assert tree.parent(8) == 3 and tree.children(3) == (7, 8) and tree.depth(8) == 2
    assert len(changes.rewires) == 2


# ------------------------------------------------------------------------------- remove


def test_remove_leaf_rewires_only_its_parent():
    tree = build(7, fanout=2)
    changes = tree.remove(7)
    assert changes == Changes([Rewire(3, 1, (6,), 1)], root_changed=False, removed=7)
    assert 7 not in tree and len(tree) == 6
    tree.check_invariants()


def test_remove_unknown_member_raises_key_error():
    tree = build(3)
    with pytest.raises(KeyError):
        tree.remove(99)
    with pytest.raises(KeyError):
        Tree().remove(1)


def test_remove_interior_moves_deepest_leaf_into_the_hole():
    tree = build(7, fanout=2)
    changes = tree.remove(2)
    # 7 is the newest deepest leaf: it takes 2's slot, children and depth.
    assert tree.children(1) == (7, 3)
    assert neighbourhood(tree, 7) == Rewire(7, 1, (4, 5), 1)
    assert tree.children(3) == (6,)
    assert by_member(changes) == {
        1: Rewire(1, None, (7, 3), 0),  # hole's parent
        4: Rewire(4, 7, (), 2),  # hole's children
        5: Rewire(5, 7, (), 2),
        7: Rewire(7, 1, (4, 5), 1),  # moved leaf
        3: Rewire(3, 1, (6,), 1),  # moved leaf's old parent
    }
    assert len(changes.rewires) == 2 + 3
    assert not changes.root_changed and changes.removed == 2
    tree.check_invariants()


def test_remove_interior_whose_own_child_is_the_deepest_leaf():
    tree = build(4, fanout=2)  # 1 -> (2, 3), 2 -> (4,)
    changes = tree.remove(2)
    assert tree.children(1) == (4, 3) and tree.children(4) == ()
    assert by_member(changes) == {1: Rewire(1, None, (4, 3), 0), 4: Rewire(4, 1, (), 1)}
    tree.check_invariants()


def test_remove_interior_keeps_every_other_depth():
    tree = build(40, fanout=3)
    before = {m: tree.depth(m) for m in tree}
    moved = next(reversed([m for m in tree if tree.depth(m) == tree.max_depth]))
    tree.remove(2)
    assert tree.depth(moved) == before[2]
    assert all(tree.depth(m) == before[m] for m in tree if m != moved)
    tree.check_invariants()


def test_remove_root_promotes_the_moved_leaf():
    tree = build(7, fanout=2)
    changes = tree.remove(1)
    assert tree.root == 7 and changes.root_changed and changes.removed == 1
    assert by_member(changes) == {
        2: Rewire(2, 7, (4, 5), 1),
        3: Rewire(3, 7, (6,), 1),  # a hole's child and the leaf's old parent: once
        7: Rewire(7, None, (2, 3), 0),
    }
    tree.check_invariants()


def test_remove_root_of_two_members():
    tree = build(2)
    changes = tree.remove(1)
    assert changes == Changes([Rewire(2, None, (), 0)], root_changed=True, removed=1)
    assert tree.root == 2 and tree.max_depth == 0
    tree.check_invariants()


def test_removing_the_last_member_empties_the_tree():
    tree = build(1)
    assert tree.remove(1) == Changes([], root_changed=True, removed=1)
    assert len(tree) == 0 and tree.root is None and tree.max_depth == -1
    tree.check_invariants()
    assert tree.join(5) == Changes([Rewire(5, None, (), 0)], root_changed=True)
    tree.check_invariants()


# ---------------------------------------------------------------------------- rebalance


def unbalanced() -> Tree:
    """1 -> (2, 3), 2 -> (4,), 3 -> (7,), 4 -> (8, 9): depth 3 where 2 would do."""
    tree = build(9, fanout=2, depth_slack=0)
    tree.remove(5)
    tree.remove(6)
    return tree


def test_needs_rebalance_compares_max_depth_with_ideal_plus_slack():
    tree = unbalanced()
    assert len(tree) == 7 and tree.max_depth == 3 and ideal_depth(7, 2) == 2
    assert tree.needs_rebalance()
    tree.depth_slack = 1
    assert not tree.needs_rebalance()
    assert tree.rebalance() == Changes([], root_changed=False)


def test_rebalance_moves_deepest_leaves_up_and_merges_rewires():
    tree = unbalanced()
    changes = tree.rebalance()
    # 9 moves under 2, then 8 under 3; 4 is the old parent of both but is told once.
    assert by_member(changes) == {
        9: Rewire(9, 2, (), 2),
        4: Rewire(4, 2, (), 2),
        2: Rewire(2, 1, (4, 9), 1),
        8: Rewire(8, 3, (), 2),
        3: Rewire(3, 1, (7, 8), 1),
    }
    assert not changes.root_changed and changes.removed is None
    assert tree.max_depth == 2 and not tree.needs_rebalance()
    tree.check_invariants()
    assert tree.rebalance() == Changes([], root_changed=False)


@settings(max_examples=200, deadline=None)
@given(
    fanout=st.integers(2, 6),
    slack=st.integers(0, 2),
    size=st.integers(1, 200),
    just_past_full=st.booleans(),
    data=st.data(),
)
def test_rebalance_after_losing_shallow_leaves(fanout, slack, size, just_past_full, data):
    # Losing leaves above the deepest level is what unbalances a tree; a tree with a few
    # members past a full level, stripped of all of them, is bare chains several levels
    # deeper than ideal.
    if just_past_full:
        full_depth = data.draw(st.integers(1, 4 if fanout <= 3 else 2), label="full_depth")
        size = sum(fanout**d for d in range(full_depth + 1)) + size % fanout + 1
    tree = build(size, fanout=fanout, depth_slack=slack)
    prunes = data.draw(st.just(size) | st.integers(0, size), label="prunes")
    for _ in range(prunes):
        candidates = shallow_leaves(tree)
        if not candidates:
            break
        tree.remove(data.draw(st.sampled_from(candidates), label="leaf"))
    limit = balance_limit(tree)
    assert tree.needs_rebalance() == (tree.max_depth > limit)
    before, root = shape(tree), tree.root
    changes = tree.rebalance()
    tree.check_invariants()
    check_changes(tree, before, changes)
    assert set(tree) == before.keys() and tree.root == root
    assert not tree.needs_rebalance() and tree.max_depth <= limit
    assert changes.rewires or before == shape(tree)


# ------------------------------------------------------------------------------- data


def test_each_member_keeps_its_data_through_moves_and_slot_reuse():
    tree = Tree(fanout=2)
    tree.join(1, "one")
    assert tree.data(1) == "one"  # a lone root keeps it without slot lists
    tree.set_data(1, "root")
    for member in range(2, 16):
        tree.join(member, f"d{member}")
    assert tree.data(1) == "root" and tree.data(2) == "d2"
    filler = tree.remove(2).rewires[-1].member  # a deepest leaf fills the hole, with its own data
    assert tree.data(filler) == f"d{filler}"
    tree.remove(1)  # the root too
    tree.join(2, "again")  # in a freed slot: the new value, not the old one
    assert tree.data(2) == "again"
    for gone in (1, 99):
        with pytest.raises(KeyError):
            tree.data(gone)
    rebalanced = unbalanced()
    for member in rebalanced:
        rebalanced.set_data(member, -member)
    assert rebalanced.rebalance().rewires  # 9 and 8 move up
    assert {m: rebalanced.data(m) for m in rebalanced} == {m: -m for m in rebalanced}
    tree.check_invariants()
    rebalanced.check_invariants()


# --------------------------------------------------------------------- invariant checker


def test_check_invariants_catches_corruption():
    tree = build(7, fanout=2)
    tree._depth[tree._slot[5]] = 7
    with pytest.raises(AssertionError, match="depth"):
        tree.check_invariants()
    tree = build(7, fanout=4)  # 1 -> (2, 3, 4, 5), 2 -> (6, 7)
    three, six = tree._slot[3], tree._slot[6]
    tree._kids[three * 4] = six  # 6 now has two parents
    tree._nkids[three] = 1
    with pytest.raises(AssertionError, match="6"):
        tree.check_invariants()
    tree = build(7, fanout=4)
    tree._remove_open(tree._slot[7], 2)  # a leaf with free slots missing from the free-slot index
    with pytest.raises(AssertionError, match="free-slot index at depth 2"):
        tree.check_invariants()


# -------------------------------------------------------------------------------- scale


def join_all(tree: Tree, members) -> list[int]:
    """Join each member, checking its two Rewires; returns the work each join took."""
    costs = []
    for member in members:
        before = tree.work
        assert len(tree.join(member).rewires) == 2
        costs.append(tree.work - before)
    return costs


def test_scale_160k_joins_then_1000_random_removes():
    seed = 20_240_160
    rng = random.Random(seed)
    tree = Tree(fanout=4)
    tree.join(0)
    costs = join_all(tree, range(1, 160_000))  # costs[i] is the join of member i + 1
    tenth, last = costs[8], costs[-1]
    # Work, not time: the 160,000th join costs what the 10th did, and no join walks members.
    assert last <= tenth + 2 and max(costs) <= WORK_BOUND, (tenth, last, max(costs))
    assert tree.max_depth == ideal_depth(160_000, 4)

    members = list(range(160_000))
    worst_remove = 0
    for _ in range(1_000):
        victim = members.pop(rng.randrange(len(members)))
        fanout_before = len(tree.children(victim))
        before = tree.work
        changes = tree.remove(victim)
        worst_remove = max(worst_remove, tree.work - before)
        assert len(changes.rewires) <= fanout_before + 3, f"seed={seed}, victim={victim}"
    assert worst_remove <= WORK_BOUND, f"seed={seed}: a remove took {worst_remove} steps"
    tree.check_invariants()
    assert len(tree) == 159_000 and set(tree) == set(members)

    # Joins after the removes refill the freed slots and still cost the same.
    assert max(join_all(tree, range(160_000, 161_000))) <= WORK_BOUND, f"seed={seed}"
    tree.check_invariants()


# --------------------------------------------------------------------------- stateful


class TreeMachine(RuleBasedStateMachine):
    """Random joins, leaves, failures and rebalances against a set-of-members model."""

    def __init__(self) -> None:
        super().__init__()
        self.tree: Tree | None = None
        self.model: set[int] = set()
        self.gone: set[int] = set()
        self.next_id = 0

    @initialize(fanout=st.integers(2, 6), slack=st.integers(0, 2))
    def setup(self, fanout: int, slack: int) -> None:
        self.tree = Tree(fanout=fanout, depth_slack=slack)

    # ---- operations, each checked against the shape before and after

    def _join(self, member: int) -> None:
        before = shape(self.tree)
        changes = self.tree.join(member)
        self.model.add(member)
        self.gone.discard(member)
        expected = 1 if len(self.model) == 1 else 2
        assert len(changes.rewires) == expected and changes.removed is None
        if expected == 2:
            parent = self.tree.parent(member)
            assert {r.member for r in changes.rewires} == {member, parent}
            shallowest_free = min(
                n.depth for n in before.values() if len(n.children) < self.tree.fanout
            )
            assert self.tree.depth(parent) == shallowest_free
        check_changes(self.tree, before, changes)

    def _remove(self, data, candidates: list[int]) -> None:
        member = data.draw(st.sampled_from(candidates), label="member")
        before = shape(self.tree)
        children = before[member].children
        changes = self.tree.remove(member)
        self.model.discard(member)
        self.gone.add(member)
        assert changes.removed == member and member not in by_member(changes)
        assert len(changes.rewires) <= len(children) + 3
        if not children and self.model:
            assert len(changes.rewires) == 1, "a leaf's removal tells only its parent"
        check_changes(self.tree, before, changes)
        if self.model:
            self._check_hole_filled(before, member)

    def _check_hole_filled(self, before: dict, member: int) -> None:
        """A leaf just goes; an interior hole is filled in place by a deepest leaf."""
        tree, hole = self.tree, before[member]
        parent = hole.parent
        filler = None
        if hole.children:
            if parent is None:
                filler = tree.root
            else:
                filler = tree.children(parent)[before[parent].children.index(member)]
            assert before[filler].children == ()
            assert before[filler].depth == max(n.depth for n in before.values())
            kids = tuple(c for c in hole.children if c != filler)
            assert neighbourhood(tree, filler) == Rewire(filler, parent, kids, hole.depth)
        if parent is not None:  # siblings keep their slots
            slots = [filler if c == member else c for c in before[parent].children]
            assert tree.children(parent) == tuple(c for c in slots if c is not None)
        for m in tree:
            assert m == filler or tree.depth(m) == before[m].depth, f"{m} changed depth"

    @rule()
    def join(self) -> None:
        self._join(self.next_id)
        self.next_id += 1

    @rule(count=st.integers(1, 25))
    def join_many(self, count: int) -> None:
        for _ in range(count):
            self.join()

    @precondition(lambda self: self.gone)
    @rule(data=st.data())
    def rejoin(self, data) -> None:
        self._join(data.draw(st.sampled_from(sorted(self.gone)), label="member"))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def leave(self, data) -> None:
        self._remove(data, sorted(self.model))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fail(self, data) -> None:
        self._remove(data, sorted(self.model))

    # Random churn keeps the tree balanced (joins fill the shallowest slot, holes take the
    # deepest leaf); losing leaves above the deepest level is what unbalances it.
    @precondition(lambda self: self.tree is not None and shallow_leaves(self.tree))
    @rule(data=st.data(), count=st.integers(1, 15))
    def prune_shallow_leaves(self, data, count: int) -> None:
        for _ in range(count):
            candidates = shallow_leaves(self.tree)
            if not candidates:
                break
            self._remove(data, candidates)

    @rule()
    def remove_unknown(self) -> None:
        with pytest.raises(KeyError):
            self.tree.remove(-1)

    @rule()
    def rebalance(self) -> None:
        needed = self.tree.needs_rebalance()
        before = shape(self.tree)
        changes = self.tree.rebalance()
        if not needed:
            assert changes == Changes([], root_changed=False)
        assert not changes.root_changed and changes.removed is None
        check_changes(self.tree, before, changes)
        assert not self.tree.needs_rebalance()
        assert self.tree.max_depth <= balance_limit(self.tree)

    # ---- after every step

    @invariant()
    def tree_is_consistent(self) -> None:
        if self.tree is None:
            return
        self.tree.check_invariants()
        assert set(self.tree) == self.model
        assert len(self.tree) == len(self.model)


TreeMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_tree_machine = TreeMachine.TestCase
