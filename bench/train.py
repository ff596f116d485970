#!/usr/bin/env python3
"""End-to-end training benchmark of cirrus: updates/s, a PyWren-style baseline, time to a target
held-out loss against scikit-learn, and an ablation — all in one run.

Dataset: a Criteo-like sparse click dataset from ``cirrus.generators.criteo_like`` (default
1,000,000 rows, ``--hash-bits 20``: 13 numeric + 2^20 hashed features, so ``model_size`` =
2^20 + 13 weights plus a bias), written as ~10 MB partitions into a temporary folder (or into
``--keep DIR``, reused there when it matches). The held-out set is the one cirrus uses: the last
``test_fraction`` (10 %) of the partitions; every method below is scored on it with the same log
loss (probabilities clipped to [1e-15, 1 - 1e-15]).

Sections, run in this order (2, 3 and the scikit-learn part of 4 can be skipped):

1. **Updates/s** — ``cirrus.LogisticRegression`` (minibatch ``--batch``, adagrad) with 1, 2, 4
   workers (``--workers``) for ``--seconds`` each: aggregate and per-worker updates/s, both over
   the whole run (worker start-up included) and "steady" (between the first and last held-out
   evaluation). ``--reps`` runs each that many times; medians are printed.
2. **PyWren-style baseline** — synchronous rounds; each round launches ``--baseline-workers``
   map tasks as fresh processes (``ProcessPoolExecutor`` with the spawn start method and
   ``max_tasks_per_child=1``, so every task is a new interpreter, like a cold serverless call). A
   task reads the current model from a store (a local folder through ``cirrus.storage``), reads
   its data partition from the dataset store, computes ``--baseline-steps`` minibatch gradients
   and writes them to the store; the driver reads every gradient, applies one adagrad step with
   their mean, and writes the model back. Updates = minibatch gradients computed (generous to the
   baseline). Prints its updates/s and the ratio cirrus / baseline at the same worker count.
3. **Ablation** — cirrus, 2 workers, ``--seconds`` each: default; ``prefetch=False``;
   ``compress=True`` (float16 pulls/pushes); ``n_ps=2``. cirrus has no dense model, so "dense"
   is emulated with a small loop of this file on the same parameter server (``python -m
   cirrus.ps``, ``cirrus.ps.PSClient``, ``MinibatchIterator``): every step pulls the WHOLE weight
   vector and pushes a gradient for every weight; the same loop pulling/pushing only the rows of
   the minibatch is run as its sparse control ("own loop, sparse"), so dense vs sparse is
   compared like for like. Prints updates/s and the final held-out loss per variant.
4. **Time to target loss** (run last: scikit-learn's LogisticRegression is the slowest part) —
   cirrus with 1 and 2 workers (``--ttt-seconds`` each) against
   scikit-learn ``SGDClassifier(loss="log_loss")`` (best of ``--sgd-grid``; ``partial_fit`` over
   chunks of ``--sgd-chunk`` rows for up to ``--sgd-epochs`` epochs; its clock runs only while it
   trains, the held-out evaluation after each chunk is not timed) and scikit-learn
   ``LogisticRegression`` (lbfgs; the time is its fit time, one point). The target is ``--target``
   or ``--target-factor`` x the lowest held-out loss any of them reached. Cirrus's clock starts
   when its workers are launched (its held-out evaluations run concurrently in the driver, on the
   same cores, and are included). Prints seconds to target and ratios to cirrus (2 workers), and
   for each scikit-learn method the time it took to reach its own best loss against the time
   cirrus (2 workers) took to reach that same loss. scikit-learn gets the features as stored
   (numeric columns are raw counts, not scaled), exactly as cirrus does.

The machine's load average is printed at the start: the figures are only comparable between runs
on an otherwise idle machine (cirrus runs its workers, parameter-server shards and driver as
separate processes on the same cores). Every process and temporary folder this starts is stopped
or removed before it exits.

Quick check:  python bench/train.py --rows 20000 --hash-bits 10 --seconds 3 --workers 1 --skip-ablation
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import io
import json
import shutil
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cirrus  # noqa: E402
from cirrus.dataset import open_dataset, write_arrays_sync  # noqa: E402
from cirrus.generators import criteo_like  # noqa: E402
from cirrus.iterator import MinibatchIterator  # noqa: E402
from cirrus.modelmath import lr_loss_grad  # noqa: E402
from cirrus.models import SparseLogisticRegression  # noqa: E402
from cirrus.ps.client import PSClient  # noqa: E402
from cirrus.ps.process import PSProcess  # noqa: E402
from cirrus.storage import open_store  # noqa: E402
from cirrus.training import LogisticRegression  # noqa: E402

TEST_FRACTION = 0.1  # cirrus's default held-out share of partitions
EPS = 1e-15


def log(msg: str = "") -> None:
    print(msg, flush=True)


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


# ------------------------------------------------------------------------------------------- data

def partition_bytes(args: argparse.Namespace) -> int:
    """--partition-bytes, or ~10 MB capped so that a small dataset still has ~10 partitions
    (a Criteo-like row takes about 290 bytes encoded)."""
    if args.partition_bytes:
        return args.partition_bytes
    return int(min(10_000_000, max(50_000, args.rows * 290 // 10)))


def prepare_dataset(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Write (or reuse) the dataset in ``root``; returns its description."""
    n_features = 13 + (1 << args.hash_bits)
    manifest = Path(root) / "manifest.json"
    reused = False
    if manifest.exists():
        async def probe() -> tuple[int, int]:
            async with await open_dataset(root) as ds:
                return ds.n_rows, ds.n_features
        try:
            rows, nf = asyncio.run(probe())
            reused = rows == args.rows and nf == n_features
        except Exception:  # noqa: BLE001 - a broken folder is rewritten
            reused = False
        if not reused:
            raise SystemExit(f"error: {root} holds a different dataset ({manifest}); use another --keep DIR")
    began = time.perf_counter()
    if not reused:
        data, _ = criteo_like(args.rows, hash_bits=args.hash_bits, seed=args.seed)
        raw = root.rstrip("/") + ".raw" if args.normalize else root
        write_arrays_sync(raw, data.labels, csr=(data.indptr, data.indices, data.values, data.n_features),
                          partition_bytes=partition_bytes(args))
        del data
        if args.normalize:  # the thesis's workflow: load, then min-max scale every column (map-reduce)
            t0 = time.perf_counter()
            cirrus.normalize(raw, root, cirrus.MIN_MAX_SCALING)
            log(f"normalized (min-max, map-reduce over worker processes) in {time.perf_counter() - t0:.1f} s")
            shutil.rmtree(raw, ignore_errors=True)

    async def describe() -> dict[str, Any]:
        async with await open_dataset(root) as ds:
            n = ds.n_partitions
            n_test = min(n - 1, max(1, round(n * TEST_FRACTION)))
            return {"uri": root, "rows": ds.n_rows, "n_features": ds.n_features, "partitions": n,
                    "train_partitions": list(range(n - n_test)), "test_partitions": list(range(n - n_test, n)),
                    "train_rows": sum(ds.partition_rows(i) for i in range(n - n_test)),
                    "test_rows": sum(ds.partition_rows(i) for i in range(n - n_test, n)),
                    "bytes": sum(ds.partition_nbytes(i) for i in range(n))}
    info = asyncio.run(describe())
    info["reused"] = reused
    info["prepare_seconds"] = time.perf_counter() - began
    return info


def read_split(uri: str, train_parts: list[int], test_parts: list[int]):
    """(X_train, y_train, X_test, y_test, test partitions) as scipy CSR / 0-1 labels."""
    import scipy.sparse as sp

    async def read(parts: list[int]) -> list:
        async with await open_dataset(uri) as ds:
            return [await ds.read_partition(i) for i in parts]

    def stack(parts: list) -> tuple[Any, np.ndarray]:
        ptrs, idx, vals, ys, off = [np.zeros(1, np.int64)], [], [], [], 0
        nf = parts[0].n_features
        for p in parts:
            lo, hi = int(p.indptr[0]), int(p.indptr[-1])
            ptrs.append(np.asarray(p.indptr[1:], np.int64) - lo + off)
            off += hi - lo
            idx.append(np.asarray(p.indices[lo:hi], np.int32))
            vals.append(np.asarray(p.values[lo:hi], np.float64))
            ys.append((np.asarray(p.labels) > 0).astype(np.float64))
        X = sp.csr_matrix((np.concatenate(vals), np.concatenate(idx), np.concatenate(ptrs)),
                          shape=(sum(p.n_rows for p in parts), nf))
        return X, np.concatenate(ys)

    train, test = asyncio.run(read(train_parts)), asyncio.run(read(test_parts))
    Xtr, ytr = stack(train)
    Xte, yte = stack(test)
    del train
    return Xtr, ytr, Xte, yte, test


def held_out_loss(prob: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(prob, EPS, 1 - EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# ------------------------------------------------------------------------------------------ cirrus

def run_cirrus(args: argparse.Namespace, info: dict, n_workers: int, seconds: float, *,
               eval_interval: float, **extra: Any) -> dict[str, Any]:
    params = {"dataset": info["uri"], "n_workers": n_workers, "model_size": info["n_features"],
              "minibatch_size": args.batch, "learning_rate": args.lr, "opt_method": "adagrad",
              "timeout": seconds, "eval_interval": eval_interval, "epsilon": 0.0,
              "test_fraction": TEST_FRACTION, "seed": args.seed}
    params.update(extra)
    task = LogisticRegression(params)
    r = task.run()
    m = task.metrics
    steady = float("nan")
    if len(m) >= 2 and m[-1]["time"] > m[0]["time"]:
        steady = (m[-1]["updates"] - m[0]["updates"]) / (m[-1]["time"] - m[0]["time"])
    return {"workers": n_workers, "updates": r["updates"], "seconds": r["seconds"],
            "updates_per_second": r["updates_per_second"], "steady_updates_per_second": steady,
            "final_loss": r["final"].get("log_loss"), "time_loss": r["time_loss"],
            "stop_reason": r["stop_reason"], "worker_deaths": r["worker_deaths"], "ps": r["ps"],
            "params": {k: v for k, v in params.items() if k != "dataset"}}


def section_updates(args: argparse.Namespace, info: dict) -> dict[str, Any]:
    log(f"\n== 1. cirrus updates/s (minibatch {args.batch}, model_size {info['n_features']}, "
        f"{args.seconds:g} s per run, median of {args.reps}) ==")
    log(f"{'workers':>7s} {'updates':>9s} {'agg upd/s':>10s} {'per worker':>11s} {'steady agg':>11s} "
        f"{'steady/wkr':>11s} {'held-out loss':>14s}")
    out = []
    for n in args.workers:
        runs = [run_cirrus(args, info, n, args.seconds, eval_interval=max(0.5, args.seconds / 3))
                for _ in range(args.reps)]
        row = {"workers": n, "runs": runs,
               "updates": med([r["updates"] for r in runs]),
               "updates_per_second": med([r["updates_per_second"] for r in runs]),
               "steady_updates_per_second": med([r["steady_updates_per_second"] for r in runs]),
               "final_loss": med([r["final_loss"] for r in runs])}
        row["per_worker"] = row["updates_per_second"] / n
        row["steady_per_worker"] = row["steady_updates_per_second"] / n
        out.append(row)
        log(f"{n:7d} {row['updates']:9.0f} {row['updates_per_second']:10.0f} {row['per_worker']:11.0f} "
            f"{fmt(row['steady_updates_per_second'], '.0f'):>11s} {fmt(row['steady_per_worker'], '.0f'):>11s} "
            f"{fmt(row['final_loss'], '.4f'):>14s}")
    if len(out) > 1:
        base = out[0]
        log("scaling (aggregate upd/s vs the first row): " + ", ".join(
            f"{r['workers']} workers {r['updates_per_second'] / base['updates_per_second']:.2f}x" for r in out[1:]))
    return {"rows": out}


# ----------------------------------------------------------------------------- PyWren-style baseline

def _save(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


async def _baseline_task_async(dataset_uri: str, state_uri: str, rnd: int, task: int, partition: int,
                               batch: int, steps: int, seed: int) -> dict[str, float]:
    t0 = time.perf_counter()
    async with open_store(state_uri) as store:
        w = np.frombuffer(await store.get(f"model-{rnd}"), dtype=np.float32)
        t1 = time.perf_counter()
        async with await open_dataset(dataset_uri, check=False) as ds:
            part = await ds.read_partition(partition)
        t2 = time.perf_counter()
        rng = np.random.default_rng([seed, rnd, task])
        rows_l, grads_l, losses = [], [], []
        for _ in range(steps):
            start = int(rng.integers(0, max(1, part.n_rows - batch + 1)))
            mb = part.rows(start, start + batch)
            lo, hi = int(mb.indptr[0]), int(mb.indptr[-1])
            uniq, inv = np.unique(mb.indices[lo:hi], return_inverse=True)
            loss, g, gb = lr_loss_grad(mb.indptr - lo, mb.indices[lo:hi], mb.values[lo:hi], mb.labels,
                                       w[uniq], inv, float(w[-1]))
            rows_l.append(np.append(uniq.astype(np.int64), w.size - 1))
            grads_l.append(np.append(g, gb).astype(np.float32))
            losses.append(loss)
        t3 = time.perf_counter()
        await store.put(f"grad-{rnd}-{task}", _save(rows=np.concatenate(rows_l), grads=np.concatenate(grads_l)))
    t4 = time.perf_counter()
    return {"read_model": t1 - t0, "read_data": t2 - t1, "compute": t3 - t2, "write": t4 - t3,
            "task": t4 - t0, "loss": float(np.mean(losses))}


def baseline_task(*a: Any) -> dict[str, float]:
    """One map task of the baseline (runs in a fresh process)."""
    return asyncio.run(_baseline_task_async(*a))


async def _run_baseline(args: argparse.Namespace, info: dict, n_workers: int, test: list) -> dict[str, Any]:
    size = info["n_features"] + 1
    w = np.zeros(size, np.float32)
    accum = np.zeros(size, np.float64)
    train = info["train_partitions"]
    loop = asyncio.get_running_loop()
    timings: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-pywren-") as state, \
            concurrent.futures.ProcessPoolExecutor(max_workers=n_workers, max_tasks_per_child=1,
                                                   mp_context=multiprocessing.get_context("spawn")) as pool:
        async with open_store(state) as store:
            await store.put("model-0", w.tobytes())
            began = time.perf_counter()
            rnd, updates = 0, 0
            while True:
                futs = [loop.run_in_executor(pool, baseline_task, info["uri"], state, rnd, i,
                                             train[(rnd * n_workers + i) % len(train)], args.batch,
                                             args.baseline_steps, args.seed) for i in range(n_workers)]
                timings += await asyncio.gather(*futs)
                g = np.zeros(size, np.float64)
                for i in range(n_workers):
                    z = _load(await store.get(f"grad-{rnd}-{i}"))
                    np.add.at(g, z["rows"], z["grads"])
                    await store.delete(f"grad-{rnd}-{i}")
                g /= n_workers * args.baseline_steps
                accum += g * g
                w -= (args.lr * g / (np.sqrt(accum) + 1e-8)).astype(np.float32)
                await store.put(f"model-{rnd + 1}", w.tobytes())
                await store.delete(f"model-{rnd}")
                rnd += 1
                updates += n_workers * args.baseline_steps
                if time.perf_counter() - began >= args.seconds:
                    break
            secs = time.perf_counter() - began
    loss = SparseLogisticRegression(info["n_features"]).evaluate({"w": w.reshape(-1, 1)}, test)["log_loss"]
    mean_t = {k: statistics.mean(t[k] for t in timings) for k in ("task", "read_model", "read_data", "compute", "write")}
    return {"workers": n_workers, "rounds": rnd, "updates": updates, "seconds": secs,
            "updates_per_second": updates / secs, "round_seconds": secs / rnd,
            "mean_task_seconds": mean_t, "final_loss": loss}


def section_baseline(args: argparse.Namespace, info: dict, test: list, cirrus_rows: list[dict]) -> dict[str, Any]:
    n = args.baseline_workers
    log(f"\n== 2. PyWren-style baseline ({n} fresh-process map tasks per synchronous round, "
        f"{args.baseline_steps} minibatch gradient(s) per task, model + gradients through a folder store; "
        f"median of {args.reps}) ==")
    runs = [asyncio.run(_run_baseline(args, info, n, test)) for _ in range(args.reps)]
    b = runs[len(runs) // 2] if len(runs) == 1 else min(runs, key=lambda r: abs(
        r["updates_per_second"] - med([x["updates_per_second"] for x in runs])))
    ups = med([r["updates_per_second"] for r in runs])
    t = b["mean_task_seconds"]
    log(f"rounds {b['rounds']}, {b['round_seconds']:.2f} s per round; mean task {t['task']:.3f} s "
        f"(read model {t['read_model']:.3f}, read partition {t['read_data']:.3f}, gradient {t['compute']:.4f}, "
        f"write {t['write']:.4f}) + process start-up")
    log(f"baseline updates/s: {ups:.2f}   held-out loss after {b['rounds']} rounds: {b['final_loss']:.4f}")
    same = [r for r in cirrus_rows if r["workers"] == n]
    ratio = None
    if same:
        c = same[0]
        ratio = c["updates_per_second"] / ups
        steady = c["steady_updates_per_second"] / ups
        log(f"cirrus ({n} worker{'s' if n > 1 else ''}) / baseline: {ratio:.0f}x (whole run), {fmt(steady, '.0f')}x (steady)")
    elif cirrus_rows:
        c = max(cirrus_rows, key=lambda r: r["updates_per_second"])
        ratio = c["updates_per_second"] / ups
        log(f"cirrus ({c['workers']} workers; no cirrus run with {n}) / baseline: {ratio:.0f}x")
    return {"runs": runs, "updates_per_second": ups, "cirrus_over_baseline": ratio}


# ----------------------------------------------------------------------------------- time to target

def sgd_curves(args: argparse.Namespace, Xtr, ytr, Xte, yte) -> list[dict]:
    from sklearn.linear_model import SGDClassifier

    out = []
    chunk = max(1, args.sgd_chunk)
    starts = list(range(0, Xtr.shape[0], chunk))
    for entry in args.sgd_grid:
        kw = {"learning_rate": "optimal"} if entry == "optimal" else {"learning_rate": "constant", "eta0": float(entry)}
        clf = SGDClassifier(loss="log_loss", alpha=args.sgd_alpha, random_state=args.seed, **kw)
        rng = np.random.default_rng(args.seed)
        clock, curve, best = 0.0, [], float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.sgd_epochs):
                for s in rng.permutation(starts):
                    t0 = time.perf_counter()
                    clf.partial_fit(Xtr[s:s + chunk], ytr[s:s + chunk], classes=np.array([0.0, 1.0]))
                    clock += time.perf_counter() - t0
                    loss = held_out_loss(clf.predict_proba(Xte)[:, 1], yte)
                    if not math.isfinite(loss):
                        loss = float("inf")
                    curve.append((clock, loss))
                    best = min(best, loss)
                    if clock >= args.ttt_seconds:
                        break
                if clock >= args.ttt_seconds:
                    break
        out.append({"setting": entry, "curve": curve, "best_loss": best, "train_seconds": clock})
    return out


def sklearn_lr(args: argparse.Namespace, Xtr, ytr, Xte, yte) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression as SkLR

    clf = SkLR(max_iter=args.lr_max_iter)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(Xtr, ytr)
    secs = time.perf_counter() - t0
    loss = held_out_loss(clf.predict_proba(Xte)[:, 1], yte)
    return {"fit_seconds": secs, "loss": loss, "n_iter": int(np.max(clf.n_iter_)),
            "converged": not any("converge" in str(w.message).lower() for w in caught),
            "solver": "lbfgs", "C": 1.0, "max_iter": args.lr_max_iter}


def first_below(curve: list, target: float) -> float | None:
    for t, loss in curve:
        if loss <= target:
            return float(t)
    return None


def section_ttt(args: argparse.Namespace, info: dict) -> dict[str, Any]:
    log(f"\n== 4. time to target held-out loss (cirrus {args.ttt_seconds:g} s per run; held-out = last "
        f"{len(info['test_partitions'])} of {info['partitions']} partitions, {info['test_rows']} rows) ==")
    methods: list[dict] = []
    for n in args.ttt_workers:
        r = run_cirrus(args, info, n, args.ttt_seconds, eval_interval=args.eval_interval,
                       **({"target_loss": args.target} if args.target is not None else {}))
        methods.append({"name": f"cirrus {n} worker{'s' if n > 1 else ''}", "curve": r["time_loss"],
                        "best_loss": min((l for _, l in r["time_loss"]), default=float("nan")),
                        "updates": r["updates"], "workers": n})
        log(f"  {methods[-1]['name']}: {r['updates']} updates, best held-out loss {methods[-1]['best_loss']:.4f}")
    sk: dict[str, Any] = {}
    if not args.skip_sklearn:
        t0 = time.perf_counter()
        Xtr, ytr, Xte, yte, _ = read_split(info["uri"], info["train_partitions"], info["test_partitions"])
        log(f"  (scikit-learn data: {Xtr.shape[0]} x {Xtr.shape[1]} train, {Xte.shape[0]} held-out; "
            f"read in {time.perf_counter() - t0:.1f} s, not timed)")
        grid = sgd_curves(args, Xtr, ytr, Xte, yte)
        for g in grid:
            log(f"  SGDClassifier {g['setting']:>9s}: best held-out loss {fmt(g['best_loss'], '.4f')} "
                f"after {g['train_seconds']:.2f} s of training")
        best = min(grid, key=lambda g: g["best_loss"])
        methods.append({"name": f"sklearn SGD ({best['setting']})", "curve": best["curve"],
                        "best_loss": best["best_loss"]})
        lr = sklearn_lr(args, Xtr, ytr, Xte, yte)
        log(f"  LogisticRegression(lbfgs): fit {lr['fit_seconds']:.1f} s, {lr['n_iter']} iterations"
            f"{'' if lr['converged'] else ' (not converged)'}, held-out loss {lr['loss']:.4f}")
        methods.append({"name": "sklearn LogisticRegression", "curve": [(lr["fit_seconds"], lr["loss"])],
                        "best_loss": lr["loss"]})
        sk = {"sgd_grid": grid, "logistic_regression": lr}
        del Xtr, Xte
    best_all = min(m["best_loss"] for m in methods if math.isfinite(m["best_loss"]))
    target = args.target if args.target is not None else args.target_factor * best_all
    how = "given" if args.target is not None else f"{args.target_factor:g} x best {best_all:.4f}"
    for m in methods:
        m["seconds_to_target"] = first_below(m["curve"], target)
    ref = next((m for m in methods if m.get("workers") == 2), methods[0])
    log(f"target held-out log loss {target:.4f} ({how})")
    log(f"{'method':34s} {'best loss':>10s} {'s to target':>12s} {'vs ' + ref['name']:>22s}")
    for m in methods:
        s = m["seconds_to_target"]
        ratio = (s / ref["seconds_to_target"]) if (s is not None and ref["seconds_to_target"]) else None
        log(f"{m['name']:34s} {fmt(m['best_loss'], '.4f'):>10s} "
            f"{(fmt(s, '.1f') if s is not None else 'not reached'):>12s} "
            f"{(fmt(ratio, '.2f') + 'x') if ratio is not None else '-':>22s}")
    log("  (ratio = that method's seconds / the reference's: > 1 means slower than the reference)")
    # each baseline's own best loss as the target: how long it took to get there, and cirrus
    own_best = []
    others = [m for m in methods if "workers" not in m and math.isfinite(m["best_loss"])]
    if others:
        log(f"each scikit-learn method's own best loss as the target ({ref['name']} vs that method):")
        log(f"{'method':34s} {'its best':>9s} {'its s':>7s} {ref['name'] + ' s':>20s} {'speed-up':>9s}")
        for m in others:
            s_m = first_below(m["curve"], m["best_loss"])
            s_c = first_below(ref["curve"], m["best_loss"])
            up = (s_m / s_c) if (s_m is not None and s_c) else None
            own_best.append({"method": m["name"], "loss": m["best_loss"], "seconds": s_m,
                             "reference_seconds": s_c, "speedup": up})
            log(f"{m['name']:34s} {m['best_loss']:9.4f} {fmt(s_m, '.2f'):>7s} "
                f"{(fmt(s_c, '.1f') if s_c is not None else 'not reached'):>20s} "
                f"{(fmt(up, '.2f') + 'x') if up is not None else '-':>9s}")
        log(f"  (speed-up = its seconds / {ref['name']}'s seconds: > 1 means cirrus got there sooner)")
    return {"target": target, "target_rule": how, "methods": methods, "sklearn": sk, "reference": ref["name"],
            "own_best_targets": own_best}


# -------------------------------------------------------------------------------------------- ablation

async def _own_worker_async(addrs: list[str], uri: str, parts: list[int], model_size: int, batch: int,
                            dense: bool, seed: int, worker: int, deadline: float) -> dict[str, float]:
    updates, first = 0, None
    all_rows = np.arange(model_size + 1, dtype=np.int64)
    async with await open_dataset(uri, check=False) as ds, \
            PSClient(addrs, worker=str(worker), inc=1) as ps, \
            MinibatchIterator(ds, batch, order="random", seed=seed * 1_000_003 + worker, epochs=None,
                              prefetch_bytes=32 << 20, max_concurrency=4, partitions=parts) as it:
        async for mb in it:
            now = time.time()
            if now >= deadline:
                break
            if first is None:
                first = now
            lo, hi = int(mb.indptr[0]), int(mb.indptr[-1])
            idx = np.asarray(mb.indices[lo:hi], np.int64)
            if dense:  # the whole vector both ways
                w = await ps.pull("w", all_rows)
                _, g, gb = lr_loss_grad(mb.indptr - lo, idx, mb.values[lo:hi], mb.labels, w[:-1, 0], idx,
                                        float(w[-1, 0]))
                await ps.push("w", all_rows, np.append(g, gb))
            else:  # only the rows the minibatch touches (what cirrus's model does)
                uniq, inv = np.unique(idx, return_inverse=True)
                rows = np.append(uniq, model_size)
                w = await ps.pull("w", rows)
                _, g, gb = lr_loss_grad(mb.indptr - lo, idx, mb.values[lo:hi], mb.labels, w[:-1, 0], inv,
                                        float(w[-1, 0]))
                await ps.push("w", rows, np.append(g, gb))
            updates += 1
    secs = (time.time() - first) if first is not None else 0.0
    return {"updates": updates, "seconds": secs}


def own_worker(*a: Any) -> dict[str, float]:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return asyncio.run(_own_worker_async(*a))


async def _own_loop(args: argparse.Namespace, info: dict, test: list, dense: bool, n_workers: int) -> dict[str, Any]:
    model_size = info["n_features"]
    spec = {"optimizer": "adagrad", "hyper": {"lr": args.lr, "l2": 0.0, "grad_threshold": 0.0}}
    async with PSProcess(1) as server:
        await server.start([("w", model_size + 1, 1, spec)])
        ps, addrs = server.client, server.addresses
        loop = asyncio.get_running_loop()
        began = time.time()
        deadline = began + args.seconds
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            res = await asyncio.gather(*(loop.run_in_executor(
                pool, own_worker, addrs, info["uri"], info["train_partitions"], model_size, args.batch,
                dense, args.seed, i, deadline) for i in range(n_workers)))
        wall = time.time() - began
        w = await ps.pull_all("w", model_size + 1)
    loss = await asyncio.to_thread(SparseLogisticRegression(model_size).evaluate, {"w": w}, test)
    updates = sum(r["updates"] for r in res)
    return {"updates": updates, "updates_per_second": updates / wall,
            "steady_updates_per_second": sum(r["updates"] / r["seconds"] for r in res if r["seconds"] > 0),
            "final_loss": loss["log_loss"], "seconds": wall}


def section_ablation(args: argparse.Namespace, info: dict, test: list) -> dict[str, Any]:
    n = 2
    log(f"\n== 3. ablation (cirrus, {n} workers, {args.seconds:g} s each, median of {args.reps}) ==")
    variants: list[tuple[str, Any]] = [
        ("cirrus default (sparse, prefetch, 1 PS)", {}),
        ("prefetch off", {"prefetch": False}),
        ("compression on (float16)", {"compress": True}),
        ("2 PS shards", {"n_ps": 2}),
        ("own loop, sparse (control)", "sparse"),
        ("own loop, DENSE (emulated)", "dense"),
    ]
    log(f"{'variant':42s} {'agg upd/s':>10s} {'steady':>8s} {'vs default':>11s} {'held-out loss':>14s}")
    out = []
    for name, spec in variants:
        runs = []
        for _ in range(args.reps):
            if isinstance(spec, dict):
                runs.append(run_cirrus(args, info, n, args.seconds, eval_interval=max(0.5, args.seconds / 3), **spec))
            else:
                runs.append(asyncio.run(_own_loop(args, info, test, spec == "dense", n)))
        row = {"variant": name, "runs": runs, "updates_per_second": med([r["updates_per_second"] for r in runs]),
               "steady_updates_per_second": med([r["steady_updates_per_second"] for r in runs]),
               "final_loss": med([r["final_loss"] for r in runs])}
        out.append(row)
        ratio = row["updates_per_second"] / out[0]["updates_per_second"]
        log(f"{name:42s} {row['updates_per_second']:10.0f} {fmt(row['steady_updates_per_second'], '.0f'):>8s} "
            f"{ratio:10.2f}x {fmt(row['final_loss'], '.4f'):>14s}")
    own = {r["variant"]: r for r in out}
    s, d = own["own loop, sparse (control)"], own["own loop, DENSE (emulated)"]
    log(f"sparse / dense (same own loop): {s['updates_per_second'] / max(d['updates_per_second'], 1e-9):.1f}x updates/s")
    log("  (own loop = this file's worker on cirrus's PS shard, PSClient and iterator, without cirrus's driver;"
        " its 'steady' = sum of per-worker rates after each worker's first minibatch; cirrus's 'steady' = "
        "between its first and last held-out evaluation)")
    return {"workers": n, "variants": out}


# ------------------------------------------------------------------------------------------------ main

def main(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    la = os.getloadavg()
    log(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} ({os.cpu_count()} CPUs)")
    report: dict[str, Any] = {"args": vars(args).copy(), "loadavg_start": la, "cpus": os.cpu_count()}
    with contextlib.ExitStack() as stack:
        # child processes (cirrus's parameter-server launcher, workers, map tasks) make their
        # temporary folders in here, so whatever a killed child leaves behind is removed at the end
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="cirrus-bench-tmp-"))
        old_tmpdir = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = scratch
        stack.callback(lambda: os.environ.pop("TMPDIR", None) if old_tmpdir is None
                       else os.environ.__setitem__("TMPDIR", old_tmpdir))
        if args.keep:
            root = os.path.abspath(args.keep)
            os.makedirs(root, exist_ok=True)
        else:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="cirrus-bench-train-"))
        info = prepare_dataset(args, root)
        log(f"dataset: {info['rows']} rows Criteo-like, hash_bits {args.hash_bits} -> n_features = "
            f"2^{args.hash_bits} + 13 = {info['n_features']} = model_size (+1 bias row); "
            f"{info['partitions']} partitions of ~{info['bytes'] / info['partitions'] / 1e6:.1f} MB "
            f"({info['train_rows']} train rows, {info['test_rows']} held-out rows in the last "
            f"{len(info['test_partitions'])}); {'reused' if info['reused'] else 'written'} in "
            f"{info['prepare_seconds']:.1f} s")
        if info["partitions"] < 2:
            raise SystemExit("error: the dataset needs >= 2 partitions (train + held-out): lower --partition-bytes")
        report["dataset"] = {k: v for k, v in info.items() if k not in ("train_partitions", "test_partitions")}

        async def read_test() -> list:
            async with await open_dataset(root) as ds:
                return [await ds.read_partition(i) for i in info["test_partitions"]]
        test = asyncio.run(read_test())

        def save() -> None:  # after every section, so an interrupted run keeps what it measured
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

        # the slowest part (scikit-learn's LogisticRegression) runs last
        upd = section_updates(args, info)
        report["updates"] = upd
        save()
        if not args.skip_baseline:
            report["baseline"] = section_baseline(args, info, test, upd["rows"])
            save()
        if not args.skip_ablation:
            report["ablation"] = section_ablation(args, info, test)
            save()
        report["time_to_target"] = section_ttt(args, info)
    report["seconds"] = time.perf_counter() - began
    report["loadavg_end"] = os.getloadavg()
    log(f"\ntotal {report['seconds']:.0f} s; load average at end: "
        + " ".join(f"{x:.2f}" for x in report["loadavg_end"]))
    save()
    if args.json:
        log(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def int_list(text: str) -> list[int]:
        vals = [int(x) for x in text.split(",") if x.strip()]
        if not vals or min(vals) < 1:
            raise argparse.ArgumentTypeError("a comma-separated list of integers >= 1")
        return vals

    g = p.add_argument_group("dataset")
    g.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated dataset (default %(default)s)")
    g.add_argument("--hash-bits", type=int, default=20,
                   help="hashed features 2^B (+13 numeric); model_size = 2^B + 13 (default %(default)s)")
    g.add_argument("--partition-bytes", type=int, default=None,
                   help="partition size in bytes (default 10 MB, smaller for small --rows so that there are "
                        "about 10 partitions: the held-out set is the last 10 %% of them)")
    g.add_argument("--keep", metavar="DIR", help="write the dataset into DIR and keep it; reuse it if it is "
                   "already there with the same --rows and --hash-bits (default: a temporary folder)")
    g.add_argument("--seed", type=int, default=0, help="dataset and training seed (default %(default)s)")
    g.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="train on the raw features (default: min-max scale them first with cirrus.normalize, "
                        "as the thesis's workflow does; every method then sees the same scaled data)")
    g = p.add_argument_group("training")
    g.add_argument("--batch", type=int, default=20, help="minibatch size (default %(default)s)")
    g.add_argument("--lr", type=float, default=0.1, help="adagrad learning rate of cirrus, the baseline and "
                   "the own loop (default %(default)s)")
    g.add_argument("--seconds", type=float, default=15.0,
                   help="seconds of each updates/s, baseline and ablation run (default %(default)s)")
    g.add_argument("--workers", type=int_list, default=[1, 2, 4],
                   help="cirrus worker counts for updates/s, comma-separated (default 1,2,4)")
    g.add_argument("--reps", type=int, default=1,
                   help="runs of each updates/s measurement (sections 1, 2, 3); medians are reported (default 1)")
    g = p.add_argument_group("baseline")
    g.add_argument("--baseline-workers", type=int, default=2, help="map tasks per round (default %(default)s)")
    g.add_argument("--baseline-steps", type=int, default=1,
                   help="minibatch gradients per map task (default %(default)s)")
    g = p.add_argument_group("time to target")
    g.add_argument("--ttt-seconds", type=float, default=None,
                   help="training budget of each cirrus run and of each SGDClassifier setting "
                        "(default 4 x --seconds)")
    g.add_argument("--ttt-workers", type=int_list, default=[1, 2], help="cirrus worker counts (default 1,2)")
    g.add_argument("--eval-interval", type=float, default=1.0,
                   help="seconds between cirrus's held-out evaluations in these runs (default %(default)s)")
    g.add_argument("--target", type=float, default=None, help="target held-out log loss (default: "
                   "--target-factor x the lowest loss any method reached)")
    g.add_argument("--target-factor", type=float, default=1.02,
                   help="target = this x the lowest held-out loss reached, when --target is not given "
                        "(default %(default)s)")
    g.add_argument("--sgd-grid", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=["0.00003", "0.0001", "0.0003", "0.001", "optimal"],
                   help="SGDClassifier settings: numbers = constant eta0, 'optimal' = sklearn's default "
                        "schedule (default 0.00003,0.0001,0.0003,0.001,optimal)")
    g.add_argument("--sgd-alpha", type=float, default=1e-6, help="SGDClassifier alpha (default %(default)s)")
    g.add_argument("--sgd-epochs", type=int, default=3, help="max epochs per SGD setting (default %(default)s)")
    g.add_argument("--sgd-chunk", type=int, default=50_000,
                   help="rows per partial_fit call (held-out loss measured after each) (default %(default)s)")
    g.add_argument("--lr-max-iter", type=int, default=100,
                   help="max_iter of sklearn LogisticRegression (lbfgs) (default %(default)s)")
    g = p.add_argument_group("sections and output")
    g.add_argument("--skip-baseline", action="store_true", help="skip the PyWren-style baseline")
    g.add_argument("--skip-sklearn", action="store_true", help="time to target: cirrus only")
    g.add_argument("--skip-ablation", action="store_true", help="skip the ablation")
    g.add_argument("--json", metavar="PATH", help="also write every figure (and loss curves) as JSON to PATH")
    return p


if __name__ == "__main__":
    a = build_parser().parse_args()
    if a.ttt_seconds is None:
        a.ttt_seconds = 4 * a.seconds
    sys.exit(main(a))
