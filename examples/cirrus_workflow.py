"""Thesis figure 3.5 as one script: (a) pre-process, (b) train, (c) tune.

Runs on the embedded defaults: a generated Criteo-like LIBSVM file stands in for "local_criteo",
the datasets live in a local folder (an ``s3://bucket/prefix`` URI works the same way), and the
parameter server and workers are local processes. The figure's code is kept as written; the only
changes are marked: the figure's ``"minibach_size"`` is a typo that cirrus refuses with
"did you mean 'minibatch_size'?", and the run's length is scaled to the machine with
``--train-seconds`` / ``--tune-seconds`` (the figure's 20-minute timeout and its 198-experiment
grid would run for hours on a laptop).

    python examples/cirrus_workflow.py [--rows 200000] [--train-seconds 30] [--tune-seconds 60]
"""

import argparse
import os
import sys
import tempfile

import numpy as np

import cirrus
from cirrus import MIN_MAX_SCALING
from cirrus.generators import criteo_like, write_libsvm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the generated click data (default %(default)s)")
    ap.add_argument("--workdir", help="where the datasets go (default: a temporary folder)")
    ap.add_argument("--train-seconds", type=float, default=30.0, help="train step timeout (figure: 20 * 60)")
    ap.add_argument("--tune-seconds", type=float, default=60.0, help="the whole grid search's time budget")
    ap.add_argument("--experiment-seconds", type=float, default=4.0, help="each tuning experiment's timeout")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="cirrus-workflow-")

    local_path = os.path.join(work, "local_criteo")
    data, _ = criteo_like(args.rows, hash_bits=18, seed=0)
    write_libsvm(data, local_path)
    s3_input = os.path.join(work, "criteo_dataset")
    s3_output = os.path.join(work, "criteo_norm")

    # (a) Pre-process
    cirrus.load_libsvm(local_path, s3_input)
    cirrus.normalize(s3_input, s3_output, MIN_MAX_SCALING)
    print(f"(a) loaded {args.rows} rows into {s3_input} and min-max scaled them into {s3_output}", flush=True)

    # (b) Train
    params = {
        'n_workers': 5,
        'n_ps': 1,
        'worker_size': 1024,
        'dataset': s3_output,
        'epsilon': 0.0001,
        'timeout': 20 * 60,
        'model_size': 2**19,
    }
    params['timeout'] = args.train_seconds                      # scaled to this machine
    lr_task = cirrus.LogisticRegression(params)
    result = lr_task.run()
    print(f"(b) trained: held-out log loss {result['final']['log_loss']:.4f}, accuracy "
          f"{result['final']['accuracy']:.3f}, {result['updates_per_second']:.0f} updates/s, "
          f"cost ${result['cost']:.6f}, stopped: {result['stop_reason']}", flush=True)

    # (c) Tune
    # learning rates
    lrates = np.arange(0.1, 10, 0.1)
    minibatch_size = [100, 1000]
    params['timeout'] = args.experiment_seconds                 # scaled to this machine
    gs = cirrus.GridSearch(
        task=cirrus.LRegression,
        param_base=params,
        hyper_vars=["learning_rate", "minibatch_size"],           # the figure: "minibach_size"
        hyper_params=[lrates, minibatch_size],
        timeout=args.tune_seconds)                                # scaled to this machine
    results = gs.run()
    print("(c) grid search:")
    print(gs.table())
    ran = [r for r in results if r["state"] in ("done", "stopped")]
    best = gs.get_top(1)[0]
    print(f"{len(ran)} of {len(results)} experiments ran in the time budget; best: {best.hyper} "
          f"(held-out log loss {best.final_loss:.4f})", flush=True)
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
