"""Benchmarks for zipcomm (run them as scripts, e.g. ``python bench/comm.py --help``)."""
