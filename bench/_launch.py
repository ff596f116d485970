"""Starting the ranks of one bench/comm.py cell, two ways (a backend picks one: bench/_backends.py).

* :func:`run_workers`: n separate ``python -m bench._worker`` processes, one config each
  (bench/sort.py runs its ``bench._sort_worker`` processes with it too);
* :func:`run_mpirun`: one ``mpirun -n N python -m bench._worker`` (Open MPI), every rank reading
  its rank from the environment; each rank's stdout/stderr come from ``--output-filename``.

Both return the same thing: ``(returncode, stdout, stderr)`` per rank, the ranks in the order they
failed, and a failure description ("" if all went well), which bench/_report.py's ``summarize``
turns into a cell.  Both kill what they started when one rank fails or the deadline passes;
:func:`kill_live` kills whatever is still running (Ctrl-C), by pid.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench._report import records
from bench._services import ROOT, child_env

WORKER = [sys.executable, "-m", "bench._worker"]
_LIVE_PIDS: set[int] = set()      # worker processes
_LIVE_SESSIONS: set[int] = set()  # mpirun processes, each the leader of its own session


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (mpirun puts each rank in a process group of its
    own, but they stay in mpirun's session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session_members(sid):
        _kill(pid)


def kill_live() -> None:
    """SIGKILL every worker and every mpirun session (its ranks included) still running."""
    for pid in list(_LIVE_PIDS):
        _kill(pid)
    for sid in list(_LIVE_SESSIONS):
        _kill_session(sid)


async def run_workers(cfgs: list[dict], timeout: float, env: dict[str, str] | None = None,
                      worker: list[str] = WORKER) -> tuple[list[tuple], list[int], str]:
    """Run one worker per config (the command ``worker`` + the config as JSON; by default
    ``python -m bench._worker``); kill all as soon as one fails or the deadline passes."""
    loop = asyncio.get_running_loop()
    procs, failed, failure = [], [], ""
    try:
        for cfg in cfgs:
            proc = await asyncio.create_subprocess_exec(
                *worker, json.dumps(cfg), cwd=ROOT, env=child_env(env),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(proc)
            _LIVE_PIDS.add(proc.pid)
        tasks = [asyncio.ensure_future(p.communicate()) for p in procs]
        pending, end = set(tasks), loop.time() + timeout
        while pending and not failure:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, end - loop.time()),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                alive = [i for i, p in enumerate(procs) if p.returncode is None]
                failure = f"timeout: ranks {alive} still running after {timeout:.0f}s, killed"
            for task in done:
                rank = tasks.index(task)
                if procs[rank].returncode != 0:
                    failed.append(rank)
                    failure = failure or f"rank {rank} exited with code {procs[rank].returncode}"
        for proc in procs:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        results = await asyncio.gather(*tasks)
        return [(p.returncode, o, e) for p, (o, e) in zip(procs, results)], failed, failure
    finally:
        for proc in procs:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
                await proc.wait()
            _LIVE_PIDS.discard(proc.pid)


async def run_mpirun(mpirun: list[str], cfg: dict, n: int, timeout: float, outdir: Path,
                     env: dict[str, str] | None = None) -> tuple[list[tuple], list[int], str]:
    """``mpirun ... -n N --output-filename OUTDIR python -m bench._worker CFG``.

    ``mpirun`` is the command and its options (without ``-n``).  ``cfg`` has ``"rank": None`` and
    ``"rank_env"``.  mpirun kills every rank when one exits with an error (the worker calls
    MPI_Abort after reporting it); at the deadline this kills mpirun's whole session."""
    outdir.mkdir(parents=True, exist_ok=True)
    argv = [*mpirun, "-n", str(n), "--output-filename", str(outdir), *WORKER, json.dumps(cfg)]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    _LIVE_SESSIONS.add(proc.pid)
    failure = ""
    try:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            failure = f"timeout: mpirun still running after {timeout:.0f}s, killed"
            proc.terminate()  # mpirun forwards SIGTERM to its ranks and cleans up
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 5)
            except asyncio.TimeoutError:
                _kill_session(proc.pid)
                out, err = await proc.communicate()
    finally:  # also on Ctrl-C / SIGTERM: the parent raises KeyboardInterrupt, tasks are cancelled
        _kill_session(proc.pid)  # mpirun if still running, and ranks that outlived it, if any
        if proc.returncode is None:
            await proc.wait()
        _LIVE_SESSIONS.discard(proc.pid)
    outputs: list[tuple] = []
    failed: list[int] = []
    for rank in range(n):
        # Open MPI 4 writes OUTDIR/<job>/rank.<r>/{stdout,stderr}
        paths = {name: sorted(outdir.glob(f"*/rank.{rank}/{name}")) for name in ("stdout", "stderr")}
        rank_out, rank_err = (b"".join(p.read_bytes() for p in paths[name])
                              for name in ("stdout", "stderr"))
        recs = records(rank_out)
        ok = any(r["type"] == "done" for r in recs) and not failure
        if not ok:
            failed.append(rank)
        if rank == 0 and proc.returncode != 0 and err.strip():  # mpirun's own messages
            rank_err += b"\n[mpirun]\n" + err
        outputs.append((0 if ok else (proc.returncode or 1), rank_out, rank_err))
    # Ranks that reported an error first, then the ones that just did not finish.
    erred = [r for r in failed if any(rec["type"] == "error" for rec in records(outputs[r][1]))]
    failed = erred + [r for r in failed if r not in erred]
    if not failure and proc.returncode != 0:
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        failure = f"mpirun exited with code {proc.returncode}" + (f": {tail}" if tail else "")
    elif not failure and failed:
        failure = f"ranks {failed} did not finish although mpirun exited with code 0"
    return outputs, failed, failure
