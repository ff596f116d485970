"""cirrus.GridSearch: a grid over a worker budget, automatic stopping, kill, costs, the table."""

from __future__ import annotations

import asyncio

import pytest

from cirrus import GridSearch, LogisticRegression
from cirrus.dataset import write_arrays_sync
from cirrus.generators import criteo_like
from zipcomm.testing.wait import process_gone as _dead, until as _until

MODEL = 2 ** 11


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    data, _ = criteo_like(20_000, hash_bits=10, seed=5)
    u = str(tmp_path_factory.mktemp("tune") / "ds")
    write_arrays_sync(u, data.labels, csr=(data.indptr, data.indices, data.values, data.n_features),
                      partition_bytes=100_000)
    return u


def test_grid_of_8_within_a_budget_and_top_n(uri) -> None:
    base = {"dataset": uri, "n_workers": 1, "model_size": MODEL, "timeout": 3, "eval_interval": 0.5,
            "epsilon": 0.0}
    gs = GridSearch(task=LogisticRegression, param_base=base, hyper_vars=["learning_rate", "opt_method"],
                    hyper_params=[[0.01, 0.05, 0.2, 0.5], ["adagrad", "sgd"]], num_jobs=2, worker_budget=2,
                    stop_rules=False)
    assert len(gs.experiments) == 8
    rows = gs.run()
    assert gs.max_running == 2 and gs.max_workers <= 2   # the budget held, and was used
    assert all(r["state"] == "done" for r in rows)
    finals = sorted(e.final_loss for e in gs.experiments)
    assert [e.final_loss for e in gs.get_top(3)] == finals[:3]
    table = gs.table()
    assert "learning_rate" in table and "opt_method" in table and table.count("\n") == 9
    assert gs.get_cost() > 0


def test_diverging_experiment_is_stopped_by_rule_and_kill_stops_workers_at_once(uri) -> None:
    base = {"dataset": uri, "n_workers": 1, "model_size": MODEL, "timeout": 30, "eval_interval": 0.5,
            "epsilon": 0.0, "opt_method": "sgd"}

    async def go():
        gs = GridSearch(task=LogisticRegression, param_base=base, hyper_vars=["learning_rate"],
                        hyper_params=[[0.005, 5000.0, 0.01]], num_jobs=3,
                        stop_rules={"grace": 2.0, "margin": 2.0, "rising": 0})  # loss > 3x the best
        run = asyncio.create_task(gs.run_async())
        huge = gs.experiments[1]
        await _until(lambda: huge.state not in ("queued", "running") or run.done(), "the rule to stop the diverging run")
        assert huge.state == "stopped" and huge.reason.startswith("stopped by rule"), (huge.state, huge.reason)
        victim = gs.experiments[2]
        await _until(lambda: victim.state != "running" or (victim.task._launcher is not None
                                                            and victim.task._launcher.pids()), "workers")
        assert victim.state == "running", (victim.state, victim.reason)
        pids = victim.task._launcher.pids()
        gs.kill(2)
        await _until(lambda: all(_dead(p) for p in pids), "the killed experiment's workers to die", limit=1.0)
        gs.kill(0)
        await asyncio.wait_for(run, 60)
        return gs

    gs = asyncio.run(go())
    states = [e.state for e in gs.experiments]
    assert states == ["killed", "stopped", "killed"]
    assert gs.experiments[1].saved > 0 and gs.get_savings() >= gs.experiments[1].saved
    assert "stopped by rule" in gs.table()


def test_bad_grids_are_refused_before_anything_runs(uri) -> None:
    base = {"dataset": uri, "n_workers": 2}
    with pytest.raises(ValueError, match="did you mean 'minibatch_size'"):
        GridSearch(task=LogisticRegression, param_base=base, hyper_vars=["minibach_size"], hyper_params=[[20]])
    with pytest.raises(ValueError, match="learning_rate"):
        GridSearch(task=LogisticRegression, param_base=base, hyper_vars=["learning_rate"], hyper_params=[[-1]])
    with pytest.raises(ValueError, match="budget"):
        GridSearch(task=LogisticRegression, param_base=base, hyper_vars=["learning_rate"], hyper_params=[[1]],
                   worker_budget=1)
    with pytest.raises(TypeError):
        GridSearch(task=dict, param_base=base, hyper_vars=["learning_rate"], hyper_params=[[1]])
