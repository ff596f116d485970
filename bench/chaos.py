"""Long chaos run: every scenario of zipcomm.testing.chaos under many seeds.

    python bench/chaos.py --seeds 20                 # all scenarios x seeds 0..19
    python bench/chaos.py --scenario bcast_kill_root --seed 7   # replay one run
    python bench/chaos.py --list                     # the scenarios and what they do

Each run starts a fresh cluster (controller with heartbeat 0.2 s / timeout 1 s,
fan-out 2, optional host daemons, a few member processes), applies the
scenario's fault during its workload and checks the invariants (exact broadcast
delivery, exact reduces, membership convergence within 2 x heartbeat timeout +
1 s, no leaked processes / segments / fds). The table lists per run: pass/fail,
the convergence time after the last fault and the operations completed.
Exit status: 0 if every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zipcomm.testing.chaos import CONVERGENCE_BOUND, SCENARIOS, run_scenario  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python bench/chaos.py",
        description=__doc__.split("\n\n")[0] + " Prints a table scenarios x seeds x result.",
        epilog="Scenarios: " + ", ".join(SCENARIOS) + f". Convergence bound: {CONVERGENCE_BOUND:.1f} s.",
    )
    ap.add_argument("--seeds", type=int, default=20, help="run seeds 0..SEEDS-1 (default 20)")
    ap.add_argument("--first-seed", type=int, default=0, help="first seed of the range (default 0)")
    ap.add_argument("--seed", type=int, action="append",
                    help="run only this seed (repeatable); overrides --seeds")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                    help="run only this scenario (repeatable; default: all)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run's report as it finishes")
    args = ap.parse_args(argv)
    if args.list:
        for sc in SCENARIOS.values():
            extra = f" (daemons={sc.daemons})" if sc.daemons else ""
            print(f"{sc.name:22s} n={sc.n}{extra} workload={'+'.join(sc.workload)}: {sc.doc}")
        return 0
    names = args.scenario or list(SCENARIOS)
    seeds = args.seed if args.seed is not None else list(range(args.first_seed, args.first_seed + args.seeds))
    failed = []
    print(f"{'scenario':24s} {'seed':>4s} {'result':6s} {'conv[s]':>8s} {'ops':>5s} {'time[s]':>7s}")
    for name in names:
        for seed in seeds:
            res = run_scenario(name, seed)
            conv = f"{res.convergence:.2f}" if res.convergence is not None else "-"
            print(f"{name:24s} {seed:4d} {'pass' if res.ok else 'FAIL':6s} {conv:>8s} {res.ops:5d} "
                  f"{res.duration:7.1f}", flush=True)
            if args.verbose or not res.ok:
                if not res.ok:
                    failed.append(res)
                if args.verbose:
                    print(res.report(), flush=True)
    total = len(names) * len(seeds)
    print(f"\n{total - len(failed)}/{total} runs passed")
    for res in failed:
        print(res.report())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
