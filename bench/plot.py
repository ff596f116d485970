"""Plot a bench/comm.py result: time vs number of processes, one line per backend.

    python bench/plot.py bench/results/comm-....json            # PNGs next to the JSON
    python bench/plot.py RESULT.json --out-dir plots/

One figure per (operation, payload size), in the style of the thesis's figures 4.8-4.13: the x axis
is the number of processes n, the y axis the median time of a round in milliseconds (log scale),
one line per backend, error bars from the fastest to the slowest timed round.  Cells that failed
or were skipped are left out of their line (and listed on the figure).  A summary figure with every
(operation, size) panel is written too.

Needs matplotlib (``pip install matplotlib``); bench/comm.py calls this after a run with ``--plot``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STYLE = {  # backend -> (colour, marker); others get matplotlib's cycle
    "zipcomm": ("tab:blue", "o"), "zipcomm-daemon": ("tab:cyan", "s"), "mpi": ("tab:red", "^"),
    "gloo": ("tab:orange", "v"), "redis": ("tab:green", "D"), "s3": ("tab:purple", "x"),
}


class PlotError(RuntimeError):
    """The result file cannot be plotted (missing, not a bench/comm.py result, no matplotlib)."""


def load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except OSError as exc:
        raise PlotError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PlotError(f"{path} is not JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("cells"), list):
        raise PlotError(f"{path} is not a bench/comm.py result (no 'cells' list)")
    return report


def panels(report: dict) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(op, size) -> backend -> its cells sorted by n."""
    out: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for cell in report["cells"]:
        key = (cell["op"], cell["size"])
        out.setdefault(key, {}).setdefault(cell["backend"], []).append(cell)
    for by_backend in out.values():
        for cells in by_backend.values():
            cells.sort(key=lambda c: c["n"])
    return out


def _draw(ax, op: str, size: str, by_backend: dict[str, list[dict]]) -> None:
    missing = []
    for backend, cells in by_backend.items():
        ok = [c for c in cells if c["status"] == "ok"]
        missing += [f"{backend} n={c['n']}" for c in cells if c["status"] != "ok"]
        if not ok:
            continue
        colour, marker = STYLE.get(backend, (None, "o"))
        ns = [c["n"] for c in ok]
        med = [c["median_ms"] for c in ok]
        lo = [m - c.get("min_ms", m) for m, c in zip(med, ok)]
        hi = [c.get("max_ms", m) - m for m, c in zip(med, ok)]
        ax.errorbar(ns, med, yerr=[lo, hi], label=backend, color=colour, marker=marker,
                    capsize=3, linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("processes (n)")
    ax.set_ylabel("time per round (ms)")
    ax.set_title(f"{op} {size}")
    all_n = sorted({c["n"] for cells in by_backend.values() for c in cells})
    ax.set_xticks(all_n)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if missing:
        ax.text(0.01, 0.01, "no result: " + ", ".join(missing), transform=ax.transAxes,
                fontsize=6, va="bottom")


def plot(report: dict, out_dir: Path, stem: str) -> list[Path]:
    """Write one PNG per (op, size) and a summary PNG; return their paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib: pip install matplotlib") from None
    groups = panels(report)
    if not groups:
        raise PlotError("the result has no cells to plot")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (op, size), by_backend in groups.items():
        fig, ax = plt.subplots(figsize=(5, 3.6))
        _draw(ax, op, size, by_backend)
        fig.tight_layout()
        path = out_dir / f"{stem}-{op}-{size.replace(' ', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, ((op, size), by_backend) in zip(axes.flat, groups.items()):
        _draw(ax, op, size, by_backend)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = out_dir / f"{stem}-all.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/plot.py", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 on success, 2 if the file cannot be plotted.")
    p.add_argument("result", type=Path, help="a JSON file written by bench/comm.py")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the PNGs go (default: the JSON's folder)")
    args = p.parse_args(argv)
    try:
        report = load(args.result)
        paths = plot(report, args.out_dir or args.result.parent, args.result.stem)
    except PlotError as exc:
        print(f"bench/plot.py: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
