#!/usr/bin/env python3
"""Controller join latency while hostile sockets hang on it.

A controller and one member run here; another process (``zipcomm.testing.abuse``) opens
``--silent`` sockets that send nothing and ``--drip`` sockets that send a real client hello one byte
every 0.2 s. The member joins (and leaves) ``--joins`` channels before the abuse (quiet), while all
abusive sockets are held (loaded), and after the controller closed them (quiet again). Prints the
join p50/p99 of each phase, the loaded/quiet p99 ratio (goal ≤ 2), and when the abusive sockets were
closed (the handshake deadline is 5 s). ``--reps`` repeats the whole thing; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zipcomm  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


async def once(args: argparse.Namespace) -> dict:
    async with zipcomm.Controller("127.0.0.1:0") as ctl:
        host, port = ctl.address.rsplit(":", 1)
        async with await zipcomm.connect(ctl.address, daemon="") as rt:
            async def joins(tag: str) -> list[float]:
                lat = []
                for i in range(args.joins):
                    began = time.perf_counter()
                    ch = await rt.broadcast_channel(f"{tag}-{i}")
                    lat.append(time.perf_counter() - began)
                    await ch.aclose()
                return lat

            quiet = await joins("quiet")
            abuser = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "zipcomm.testing.abuse", host, port, str(args.silent), str(args.drip),
                stdout=asyncio.subprocess.PIPE)
            try:
                assert (await asyncio.wait_for(abuser.stdout.readline(), 60)).strip() == b"ready"
                loop = asyncio.get_running_loop()
                give_up = loop.time() + 10
                while ctl._server.connections < args.silent + args.drip:  # all held by the controller
                    if loop.time() > give_up:
                        raise RuntimeError("the controller did not accept every abusive socket")
                    await asyncio.sleep(0.01)
                loaded = await joins("loaded")
                closed = json.loads(await asyncio.wait_for(abuser.stdout.readline(), 60))
                await abuser.wait()
            finally:
                if abuser.returncode is None:
                    abuser.kill()
                    await abuser.wait()
            after = await joins("after")
    return {"quiet_p50": pct(quiet, 0.5), "quiet_p99": pct(quiet, 0.99), "loaded_p50": pct(loaded, 0.5),
            "loaded_p99": pct(loaded, 0.99), "after_p99": pct(after, 0.99),
            "ratio": pct(loaded, 0.99) / pct(quiet, 0.99), "closed_first": closed["first"],
            "closed_last": closed["last"], "closed": closed["n"]}


async def main(args: argparse.Namespace) -> int:
    runs = []
    for r in range(args.reps):
        res = await once(args)
        runs.append(res)
        print(f"run {r + 1}: join p99 quiet {res['quiet_p99'] * 1e3:.2f} ms, loaded {res['loaded_p99'] * 1e3:.2f} ms "
              f"(ratio {res['ratio']:.2f}), after {res['after_p99'] * 1e3:.2f} ms; {res['closed']} abusive sockets "
              f"closed {res['closed_first']:.2f}..{res['closed_last']:.2f} s after each connection", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median of {len(runs)}: quiet p50/p99 {med['quiet_p50'] * 1e3:.2f}/{med['quiet_p99'] * 1e3:.2f} ms, "
          f"loaded p50/p99 {med['loaded_p50'] * 1e3:.2f}/{med['loaded_p99'] * 1e3:.2f} ms, "
          f"loaded/quiet p99 {med['ratio']:.2f} (goal <= 2); last socket closed at {med['closed_last']:.2f} s")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python bench/hostile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--silent", type=int, default=1000, help="sockets that send nothing (default %(default)s)")
    p.add_argument("--drip", type=int, default=100, help="slow-drip sockets (default %(default)s)")
    p.add_argument("--joins", type=int, default=1000, help="joins per phase (default %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="repetitions; medians are printed (default %(default)s)")
    sys.exit(asyncio.run(main(p.parse_args())))
