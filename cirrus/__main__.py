"""``python -m cirrus``: command-line tools of cirrus's data path."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from ._progress import ProgressBar
from .dataset import DEFAULT_PARTITION_BYTES, write_arrays
from .errors import CirrusError
from .ingest import load_libsvm_async
from .loaders import parse_criteo, parse_csv
from .preprocess import MIN_MAX_SCALING, STANDARDIZATION, feature_hashing_async, normalize_async

_METHODS = {"min-max": MIN_MAX_SCALING, "standardization": STANDARDIZATION}
_URI_HELP = "a folder, or s3://bucket/prefix (endpoint and credentials from the standard AWS settings)"


def _columns(text: str) -> list[int]:
    """``"1,3-5,9"`` -> [1, 3, 4, 5, 9]."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, dash, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a column list like 1,3-5,9: {text!r}") from None
    return out


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN_URI", help="the dataset to read: " + _URI_HELP)
    p.add_argument("output", metavar="OUT_URI", help="where to write the result (not IN_URI); an existing "
                   "dataset there is replaced, and a failed run leaves none that looks complete")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the map-reduce job (default: one per partition, at most "
                        "2 x CPUs and 32)")
    p.add_argument("--controller", metavar="HOST:PORT", default=None,
                   help="zipcomm controller the workers meet through (default: $ZIPCOMM_CONTROLLER, "
                        "else one started on 127.0.0.1 for the job)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="give up (and stop every worker) after this long (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cirrus",
                                description="cirrus data tools: turn text data into cirrus datasets "
                                            "(versioned, checksummed ~10 MB partitions in a local "
                                            "folder or under s3://bucket/prefix) and preprocess them. "
                                            "Progress goes to stderr, the summary to stdout; exit code "
                                            "1 on any error.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    load = sub.add_parser("load", help="convert a LIBSVM, Criteo TSV or CSV file into a dataset",
                          description="Convert a text file into a dataset at DATASET_URI (a folder, "
                                      "or s3://bucket/prefix with the standard AWS settings). Labels "
                                      "are kept. An existing dataset there is replaced; a failed run "
                                      "leaves no dataset that looks complete.")
    load.add_argument("input", metavar="INPUT", help="the text file")
    load.add_argument("dataset", metavar="DATASET_URI", help="where to write the dataset")
    load.add_argument("--format", choices=("libsvm", "criteo", "csv"), default="libsvm",
                      help="input format (default: %(default)s)")
    load.add_argument("--partition-bytes", type=int, default=DEFAULT_PARTITION_BYTES,
                      help="target partition size in bytes (default: %(default)s)")
    load.add_argument("--n-features", type=int, help="libsvm: number of features; with "
                      "--zero-based/--one-based the file is streamed instead of read whole")
    base = load.add_mutually_exclusive_group()
    base.add_argument("--zero-based", dest="zero_based", action="store_const", const=True, default="auto",
                      help="libsvm: indices start at 0 (default: decided from the file)")
    base.add_argument("--one-based", dest="zero_based", action="store_const", const=False,
                      help="libsvm: indices start at 1")
    load.add_argument("--hash-bits", type=int, default=20,
                      help="criteo: categorical columns hashed to 2^BITS buckets (default: %(default)s)")
    load.add_argument("--label-column", type=int, default=0,
                      help="csv: index of the label column (default: %(default)s)")

    norm = sub.add_parser("normalize", help="normalize every column (min-max scaling or standardization)",
                          description="Normalize every column of IN_URI into OUT_URI as a map-reduce job "
                                      "over worker processes: per-partition column statistics, combined "
                                      "through a zipcomm reduce tree, then each partition transformed. "
                                      "min-max maps a column to --range (a constant column to its low "
                                      "end); standardization to zero mean and unit (population) standard "
                                      "deviation (a constant column to 0). Sparse data stays sparse: "
                                      "statistics count the implicit zeros, which stay zero; "
                                      "standardization scales without centering; min-max needs a range "
                                      "starting at 0. The statistics are saved as OUT_URI/stats.npy.")
    _job_options(norm)
    norm.add_argument("--method", choices=tuple(_METHODS), default="min-max",
                      help="normalization (default: %(default)s)")
    norm.add_argument("--range", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                      help="min-max: the output range (default: 0 1)")

    hsh = sub.add_parser("hash", help="feature hashing into 2^BITS features",
                         description="Hash every row of IN_URI into 2^BITS features at OUT_URI (sparse), "
                                     "as a map-reduce job over worker processes (the reduce counts entries "
                                     "per bucket and reports how full the buckets are). A categorical "
                                     "column (--columns) turns each of its values into its own feature "
                                     "with value 1; any other column adds its value to the bucket of its "
                                     "index. Entries of a row in the same bucket are summed.")
    sub.add_parser("dashboard", add_help=False, help="the live grid-search dashboard (python -m cirrus "
                   "dashboard --demo; --help lists its options)")
    _job_options(hsh)
    hsh.add_argument("--bits", type=int, default=20, help="2^BITS output features (default: %(default)s)")
    hsh.add_argument("--columns", type=_columns, default=[], metavar="LIST",
                     help="categorical columns, e.g. 13-38 or 1,3,5 (default: none)")
    return p


async def _load(args: argparse.Namespace, bar: ProgressBar) -> dict:
    if args.format == "libsvm":
        return await load_libsvm_async(args.input, args.dataset, n_features=args.n_features,
                                       zero_based=args.zero_based, partition_bytes=args.partition_bytes,
                                       progress=bar)
    if args.format == "criteo":
        data = await asyncio.to_thread(parse_criteo, args.input, hash_bits=args.hash_bits)
        return await write_arrays(args.dataset, data.labels, csr=(data.indptr, data.indices, data.values,
                                                                  data.n_features),
                                  partition_bytes=args.partition_bytes, progress=bar)
    data = await asyncio.to_thread(parse_csv, args.input, label_column=args.label_column)
    return await write_arrays(args.dataset, data.labels, dense=data.X, partition_bytes=args.partition_bytes,
                              progress=bar)


def _run(args: argparse.Namespace, bar: ProgressBar) -> dict:
    if args.cmd == "load":
        return asyncio.run(_load(args, bar))
    common = dict(n_workers=args.workers, controller=args.controller, timeout=args.timeout, progress=bar)
    if args.cmd == "normalize":
        return asyncio.run(normalize_async(args.input, args.output, _METHODS[args.method],
                                           feature_range=tuple(args.range), **common))
    return asyncio.run(feature_hashing_async(args.input, args.output, hash_bits=args.bits,
                                             columns=args.columns, **common))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dashboard"]:  # its own options: python -m cirrus dashboard --help
        from .dashboard import main as dashboard_main

        return dashboard_main(argv[1:])
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    if args.cmd == "load":
        print(f"loading {args.input} ({args.format}) into {args.dataset} ...", file=sys.stderr, flush=True)
        bar = ProgressBar("writing", "partitions")
    else:
        print(f"{args.cmd} {args.input} -> {args.output} ...", file=sys.stderr, flush=True)
        bar = ProgressBar(args.cmd, "partition steps")
    try:
        manifest = _run(args, bar)
    except (CirrusError, OSError, ValueError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: no output dataset was committed", file=sys.stderr)
        return 130
    bar.close()
    print(f"wrote {manifest['n_rows']} rows, {manifest['n_features']} features, "
          f"{len(manifest['partitions'])} partitions in {time.perf_counter() - began:.1f} s", flush=True)
    neg = manifest.get("derived", {}).get("columns_with_negative_minimum")
    if neg:
        print(f"note: {neg} sparse column(s) have a negative minimum: their implicit zeros stay 0 rather "
              "than moving with the scaling", flush=True)
    if args.cmd == "hash":
        b = manifest["derived"]["buckets"]
        print(f"{b['used']} of {b['n_buckets']} buckets used; fullest bucket holds {b['max_load']} of "
              f"{b['stored_entries']} entries", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
