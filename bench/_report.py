"""Turning worker output into cells, the printed table, and the machine info (bench/comm.py)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

BASELINE = "zipcomm"  # the ratios are BASELINE's median over each peer's
BASELINES = (BASELINE, "zipcomm-daemon")  # this project's backends: each gets its ratios
UNAVAILABLE = "backend unavailable"


def records(stdout: bytes) -> list[dict]:
    out = []
    for line in stdout.decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "type" in rec:
            out.append(rec)
    return out


def summarize(cell: dict, outputs: list[tuple], failed: list[int], failure: str) -> None:
    """Fill the cell's rounds, durations and median, or its error."""
    recs = [records(out) for _rc, out, _err in outputs]
    by_text: dict[str, list[int]] = {}
    for rec in (r for rs in recs for r in rs if r["type"] == "warning"):
        by_text.setdefault(rec["error"], []).append(rec["rank"])
    warnings = [f"{text} (ranks {sorted(ranks)})" for text, ranks in by_text.items()]
    if warnings:
        cell["warnings"] = warnings
    bad = {rank: err.decode(errors="replace").strip().splitlines()[-20:]
           for rank, (rc, _out, err) in enumerate(outputs) if rc != 0 or warnings}
    if bad:
        cell["stderr_tails"] = bad  # for the post-mortem, in the JSON only
    unavailable = [r for rs in recs for r in rs if r["type"] == "unavailable"]
    errors = {r["rank"]: r for rs in recs for r in rs if r["type"] == "error"}
    if unavailable:
        cell["error"] = f"backend unavailable: {unavailable[0]['error']}"
        return
    if errors:
        rank = next((r for r in failed if r in errors), min(errors))
        cell["error"] = f"rank {rank} in {errors[rank]['phase']}: {errors[rank]['error']}"
        return
    if failure:
        rank = failed[0] if failed else 0
        tail = " | ".join(outputs[rank][2].decode(errors="replace").strip().splitlines()[-3:])
        cell["error"] = failure + (f": {tail}" if tail else "")
        return
    n, op, rounds = cell["n"], cell["op"], []
    for k in range(cell["reps"]):
        by_rank = {r["rank"]: r for rs in recs for r in rs
                   if r["type"] == "round" and r["round"] == k}
        if sorted(by_rank) != list(range(n)):
            missing = sorted(set(range(n)) - set(by_rank))
            cell["error"] = f"round {k}: no timing from ranks {missing}"
            return
        starts = [by_rank[r]["start"] for r in range(n)]
        ends = [by_rank[r]["end"] for r in range(n)]
        start = starts[0] if op == "broadcast" else min(starts)
        rnd = {"round": k, "start": starts, "end": ends, "duration_ms": (max(ends) - start) * 1e3}
        if op == "shuffle":
            rnd["classes"] = [by_rank[r]["cls"] for r in range(n)]
            if sorted(rnd["classes"]) != list(range(n)):
                cell["error"] = f"round {k}: wrong result: ranks received hash classes " \
                                f"{rnd['classes']}, expected each of 0..{n - 1} once"
                return
        rounds.append(rnd)
    durations = [r["duration_ms"] for r in rounds]
    cell.update(status="ok", error=None, rounds=rounds, durations_ms=durations,
                median_ms=statistics.median(durations), min_ms=min(durations),
                max_ms=max(durations))


def fmt_ms(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell["status"] == "ok":
        return f"{cell['median_ms']:.3f}"
    return "n/a" if (cell["error"] or "").startswith(UNAVAILABLE) else "FAIL"


def bases(backends: list[str]) -> list[str]:
    """The selected backends that are this project (the ratios' numerators)."""
    return [b for b in backends if b in BASELINES]


def peers(backends: list[str]) -> list[str]:
    """The backends this project is compared with (none if no BASELINES backend is selected)."""
    return [b for b in backends if b not in BASELINES] if bases(backends) else []


def comparisons(backends: list[str]) -> list[tuple[str, str]]:
    """(base, peer) for every ratio column: each of this project's backends over each peer."""
    return [(base, peer) for base in bases(backends) for peer in peers(backends)]


def ratio(cells: dict, key: tuple, peer: str, base: str = BASELINE) -> float | None:
    """``base``'s median / ``peer``'s median for the cell ``key`` = (op, size, n)."""
    zc, other = cells.get(key + (base,)), cells.get(key + (peer,))
    if zc and other and zc["status"] == other["status"] == "ok" and other["median_ms"] > 0:
        return zc["median_ms"] / other["median_ms"]
    return None


def table(cells: list[dict], backends: list[str]) -> str:
    """Median ms of every backend per (op, size, n), then BASELINE/peer for every peer."""
    index = {(c["op"], c["size"], c["n"], c["backend"]): c for c in cells}
    keys = list(dict.fromkeys((c["op"], c["size"], c["n"]) for c in cells))
    head = (["op", "size", "n"] + [f"{b} ms" for b in backends]
            + [f"{base}/{p}" for base, p in comparisons(backends)])
    rows = [head]
    for key in keys:
        ratios = [ratio(index, key, p, base) for base, p in comparisons(backends)]
        rows.append([key[0], key[1], str(key[2])]
                    + [fmt_ms(index.get(key + (b,))) for b in backends]
                    + ["n/a" if r is None else f"{r:.3f}" for r in ratios])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    failures: dict[tuple, list[dict]] = {}
    for c in cells:
        if c["status"] != "ok":
            failures.setdefault((c["backend"], c["error"]), []).append(c)
    for c in cells:
        for warning in c.get("warnings", [])[:1]:
            text = "WARNING " + warning.rsplit(" (ranks", 1)[0]
            failures.setdefault((c["backend"], text), []).append(c)
    for (backend, error), group in failures.items():
        where = ", ".join(f"{c['op']} {c['size']} n={c['n']}" for c in group[:4])
        more = f" (+{len(group) - 4} more)" if len(group) > 4 else ""
        kind = ("" if error.startswith("WARNING") else
                "SKIPPED " if error.startswith(UNAVAILABLE) else "FAILED ")
        lines.append(f"{kind}{backend} [{where}{more}]: {error}")
    return "\n".join(lines)


def machine_info(loop: str) -> dict:
    """The host and the common packages (bench/comm.py adds each backend's ``info()``)."""
    import msgpack
    import numpy
    info = {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "python": sys.version, "implementation": platform.python_implementation(),
            "platform": platform.platform(), "machine": platform.machine(), "loop": loop,
            "numpy": numpy.__version__, "msgpack": ".".join(map(str, msgpack.version))}
    for path, field, key in (("/proc/cpuinfo", "model name", "cpu_model"),
                             ("/proc/meminfo", "MemTotal", "mem_total")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(field):
                    info[key] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info
