#!/usr/bin/env python3
"""Time cirrus's text parsers (cirrus/loaders.py): MB/s and rows/s.

A file of about --size bytes is generated once: a base block of synthetic rows (Criteo-like
click data from cirrus.generators, written as LIBSVM or Criteo TSV, or multiclass data as CSV)
is written and then repeated until the file reaches --size (the parser's speed does not depend
on the rows being distinct, and generating 1 GB of distinct text would take longer than parsing
it).  The parser is then run --reps times on the file; the best and median wall times are
reported along with MB/s (10^6 bytes per second) and rows/s, and a check that the row count is
right.  The file lives in a temporary directory removed at the end unless --keep DIR is given
(an existing file there of the right format and size is reused).  --workers N parses byte
ranges in N processes (libsvm, criteo).  The machine's load average is printed: the figures
are only comparable between runs on an otherwise idle machine.

Example:  python bench/load.py --size 1GB --format libsvm
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cirrus import generators, loaders  # noqa: E402

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    for unit in sorted(UNITS, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * UNITS[unit])
    return int(float(t))


def make_file(fmt: str, size: int, path: Path, base_rows: int, seed: int) -> int:
    """Write about ``size`` bytes to ``path``; returns the number of data rows."""
    base = path.with_suffix(".base")
    if fmt == "libsvm":
        data, _ = generators.criteo_like(base_rows, hash_bits=20, seed=seed)
        generators.write_libsvm(data, base)
    elif fmt == "criteo":
        generators.write_criteo_tsv(base_rows, base, seed=seed)
    else:
        data, _, _ = generators.multiclass(base_rows, 28, 2, seed=seed)
        generators.write_csv(data, base, header=False)
    block = base.read_bytes()
    base.unlink()
    reps = max(1, -(-size // len(block)))
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(block)
    return reps * base_rows


def run_parser(fmt: str, path: Path, workers: int):
    if fmt == "libsvm":
        return loaders.parse_libsvm(path, n_features=13 + (1 << 20), workers=workers)
    if fmt == "criteo":
        return loaders.parse_criteo(path, hash_bits=20, workers=workers)
    return loaders.parse_csv(path, header=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog="Prints one line per repetition and a summary; --json writes the summary as JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GB",
                    help="file size to generate: a number with an optional unit B, KB, MB, GB "
                         "(powers of 10) or KiB, MiB, GiB (default: 1GB)")
    ap.add_argument("--format", choices=("libsvm", "criteo", "csv"), default="libsvm",
                    help="text format to generate and parse (default: libsvm)")
    ap.add_argument("--reps", type=int, default=1,
                    help="how many times to parse the file (default: 1)")
    ap.add_argument("--base-rows", type=int, default=50_000,
                    help="distinct synthetic rows in the repeated base block (default: 50000)")
    ap.add_argument("--workers", type=int, default=1,
                    help="parser processes (libsvm and criteo; csv ignores it) (default: 1)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    ap.add_argument("--keep", metavar="DIR", default=None,
                    help="write the file into DIR and keep it (reused by later runs with the "
                         "same format and size); default: a temporary directory, removed")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the summary to PATH")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    if size <= 0 or args.reps < 1 or args.base_rows < 1 or args.workers < 1:
        ap.error("--size, --reps, --base-rows and --workers must be positive")

    tmp = None
    if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="cirrus-load-"))
        tmp = folder
    try:
        path = folder / f"bench-{args.format}-{size}-s{args.seed}-b{args.base_rows}.txt"
        meta = path.with_suffix(".rows")
        if path.exists() and meta.exists():
            rows = int(meta.read_text())
            print(f"reusing {path}")
        else:
            t0 = time.perf_counter()
            rows = make_file(args.format, size, path, args.base_rows, args.seed)
            meta.write_text(str(rows))
            print(f"generated {path} in {time.perf_counter() - t0:.1f} s")
        nbytes = path.stat().st_size
        print(f"{args.format}: {nbytes / 1e6:.1f} MB, {rows} rows, workers={args.workers}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        times = []
        for r in range(args.reps):
            t0 = time.perf_counter()
            out = run_parser(args.format, path, args.workers)
            dt = time.perf_counter() - t0
            if out.n_rows != rows:
                print(f"ERROR: parsed {out.n_rows} rows, expected {rows}", file=sys.stderr)
                return 1
            times.append(dt)
            print(f"rep {r + 1}: {dt:.2f} s  {nbytes / 1e6 / dt:.1f} MB/s  {rows / dt:,.0f} rows/s")
            del out
        best, med = min(times), statistics.median(times)
        summary = {"format": args.format, "bytes": nbytes, "rows": rows, "reps": args.reps,
                   "best_s": best, "median_s": med, "MB_per_s": nbytes / 1e6 / med,
                   "rows_per_s": rows / med, "workers": args.workers,
                   "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
        print(f"summary: median {med:.2f} s (best {best:.2f} s): {summary['MB_per_s']:.1f} MB/s, "
              f"{summary['rows_per_s']:,.0f} rows/s")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
