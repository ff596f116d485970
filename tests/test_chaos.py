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

# Scenarios that currently fail (not flakiness of the harness: faults of zipcomm),
# kept out of the CI matrix and run by bench/chaos.py.
KNOWN_FAILING = {
    "bcast_sysexit": "a member calling sys.exit() spins in Runtime._request_once and never exits",
    "reduce_sysexit": "same as bcast_sysexit",
    "bcast_leave_root": "after the root leaves gracefully mid-stream, delivery stalls for > 8 s",
    "reduce_kill_root": "intermittent: after SIGKILL of the root mid-allreduce the round never completes",
    "reduce_leave": "intermittent: a graceful leave mid-allreduce drops a live child's contribution",
    "controller_restart": "rounds under way across a controller restart drop live contributors, then hang",
    "daemon_kill": "intermittent: after a daemon's SIGKILL its members' broadcast stalls for ~9 s",
    "controller_restart_bcast": "intermittent: after a controller restart the broadcast stalls for ~9.5 s",
}
# Covered by the matrix already (the same death modes and targets) and left out to
# keep the file within its time budget; they run in bench/chaos.py.
BENCH_ONLY: set[str] = set()

CI_SCENARIOS = [name for name in SCENARIOS if name not in KNOWN_FAILING and name not in BENCH_ONLY]
SEEDS = range(5)


def test_matrix_is_large_enough() -> None:
    assert len(CI_SCENARIOS) >= 14
    assert set(KNOWN_FAILING) <= set(SCENARIOS)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scenario", CI_SCENARIOS)
def test_chaos(scenario: str, seed: int) -> None:
    res = run_scenario(scenario, seed)
    assert res.ok, res.report()
    assert res.convergence is not None
