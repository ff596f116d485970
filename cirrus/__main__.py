"""``python -m cirrus``: command-line tools of cirrus's data path."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from .dataset import DEFAULT_PARTITION_BYTES, write_arrays
from .errors import CirrusError
from .ingest import load_libsvm_async
from .loaders import parse_criteo, parse_csv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cirrus",
                                description="cirrus data tools: turn text data into cirrus datasets "
                                            "(versioned, checksummed ~10 MB partitions in a local "
                                            "folder or under s3://bucket/prefix).")
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
    return p


async def _load(args: argparse.Namespace) -> dict:
    if args.format == "libsvm":
        return await load_libsvm_async(args.input, args.dataset, n_features=args.n_features,
                                       zero_based=args.zero_based, partition_bytes=args.partition_bytes)
    if args.format == "criteo":
        data = await asyncio.to_thread(parse_criteo, args.input, hash_bits=args.hash_bits)
        return await write_arrays(args.dataset, data.labels, csr=(data.indptr, data.indices, data.values,
                                                                  data.n_features),
                                  partition_bytes=args.partition_bytes)
    data = await asyncio.to_thread(parse_csv, args.input, label_column=args.label_column)
    return await write_arrays(args.dataset, data.labels, dense=data.X, partition_bytes=args.partition_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    print(f"loading {args.input} ({args.format}) into {args.dataset} ...", file=sys.stderr, flush=True)
    try:
        manifest = asyncio.run(_load(args))
    except (CirrusError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {manifest['n_rows']} rows, {manifest['n_features']} features, "
          f"{len(manifest['partitions'])} partitions in {time.perf_counter() - began:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
