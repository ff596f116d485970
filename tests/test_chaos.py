"""Chaos matrix: scenarios x seeds, each a fresh real cluster (controller, optional
daemons, member processes) broken mid-workload, with every invariant of
zipcomm.testing.chaos asserted (exact broadcast delivery, exact reduces,
membership convergence within 2 x heartbeat timeout + 1 s, no leaked processes,
segments or fds). A failure prints the scenario, the seed and the command that
replays it (python bench/chaos.py --scenario NAME --seed S).

Scenarios of zipcomm.testing.chaos.SCENARIOS not listed here expose open faults
and run in bench/chaos.py only (see KNOWN_FAILING).
"""

from __future__ import annotations

import pytest

from zipcomm.testing.chaos import SCENARIOS, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

# Scenarios that currently fail (not flakiness of the harness: faults of zipcomm), kept out of the
# CI matrix and run by bench/chaos.py. None at the moment.
KNOWN_FAILING: dict[str, str] = {}
# Covered by the matrix already (the same death modes and targets) and left out to
# keep the file within its time budget; they run in bench/chaos.py.
BENCH_ONLY = {
    "bcast_kill_interior",  # SIGKILL of an interior member: mixed_kill_interior (broadcast + allreduce)
    "reduce_kill_interior",  # the same
    "reduce_kill_leaf",  # SIGKILL of a leaf: bcast_kill_leaf
    "bcast_term_interior",  # SIGTERM ends the process like SIGKILL: the kill scenarios
    "reduce_stop_cont",  # SIGSTOP / SIGCONT: bcast_stop_cont
    "bcast_leave_interior",  # graceful leave of an interior member: reduce_leave
    "controller_restart_bcast",  # controller kill -9 + restart: controller_restart (broadcast + allreduce)
    "shuffle_kill",  # SIGKILL of any member, then shuffles: mixed_kill_interior, and tests/test_cluster.py
}
# Every death mode of the harness is in the matrix.
DEATH_MODES = {"kill", "stop", "sysexit", "leave", "controller", "daemon", "correlated", "join_storm", "flap"}

CI_SCENARIOS = [name for name in SCENARIOS if name not in KNOWN_FAILING and name not in BENCH_ONLY]
SEEDS = range(5)


def test_matrix_is_large_enough() -> None:
    assert len(CI_SCENARIOS) >= 14
    assert set(KNOWN_FAILING) <= set(SCENARIOS) and set(BENCH_ONLY) <= set(SCENARIOS)
    assert {SCENARIOS[name].fault for name in CI_SCENARIOS} >= DEATH_MODES
    leaves = {SCENARIOS[name].target for name in CI_SCENARIOS if SCENARIOS[name].fault in ("leave", "flap")}
    assert leaves >= {"leaf", "interior", "root"}, "graceful leave of a leaf, an interior member and the root"
    kills = {SCENARIOS[name].target for name in CI_SCENARIOS if SCENARIOS[name].fault == "kill"}
    assert kills >= {"leaf", "interior", "root"}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scenario", CI_SCENARIOS)
def test_chaos(scenario: str, seed: int) -> None:
    res = run_scenario(scenario, seed)
    assert res.ok, res.report()
    assert res.convergence is not None
