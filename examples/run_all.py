"""Run every example on the embedded defaults: a local controller and 8 local
worker processes per figure 4.2 program, checking each answer; then cirrus's
end-to-end workflow (thesis figure 3.5: load, normalize, train, tune) on generated
click data with local workers and a local parameter server.

    python examples/run_all.py [--workers 8] [--cirrus-rows 50000]
"""

import argparse
import asyncio
import os
import sys
import tempfile

from zipcomm.testing.cluster import ControllerProcess, DaemonProcess

HERE = os.path.dirname(os.path.abspath(__file__))
DEADLINE = 60


async def spawn(env: dict, script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(HERE, script), *args, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )


async def run_group(env: dict, procs_args: list[tuple[str, ...]], script: str) -> list[str]:
    """Start the processes, wait until each has joined, say go, collect their output."""
    procs = [await spawn(env, script, *a) for a in procs_args]
    try:
        for p in procs:
            line = await asyncio.wait_for(p.stdout.readline(), DEADLINE)
            if line.strip() != b"joined":
                raise RuntimeError(f"{script}: expected 'joined', got {line!r}")
        for p in procs:
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), DEADLINE)
        for p, a in zip(procs, procs_args):
            if p.returncode != 0:
                raise RuntimeError(f"{script} {' '.join(a)} exited with {p.returncode}")
        return [o[0].decode() for o in outs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


async def main(workers: int, cirrus_rows: int) -> int:
    controller = ControllerProcess()
    address = await controller.start()
    env = dict(os.environ, ZIPCOMM_CONTROLLER=address)
    print(f"controller at {address}; {workers} worker processes per example")
    try:
        await figure_4_2(env, workers)
        # The same programs through a host daemon (shared memory, one tree member per host):
        # nothing in them changes but the environment.
        with tempfile.TemporaryDirectory(prefix="zipcomm-example-") as tmp:
            daemon = DaemonProcess(0, tmp)
            await daemon.start(address)
            try:
                print(f"again through a host daemon (ZIPCOMM_DAEMON={daemon.socket}):")
                await figure_4_2(dict(env, **daemon.env()), workers)
            finally:
                await daemon.stop()
    finally:
        await controller.stop()

    proc = await asyncio.create_subprocess_exec(sys.executable, os.path.join(HERE, "asyncio_embedding.py"))
    if await proc.wait() != 0:
        return 1
    print(f"cirrus workflow (thesis figure 3.5) on {cirrus_rows} generated rows:", flush=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(HERE, "cirrus_workflow.py"), "--rows", str(cirrus_rows),
        "--train-seconds", "10", "--tune-seconds", "20", "--experiment-seconds", "3")
    if await proc.wait() != 0:
        print("cirrus workflow failed", file=sys.stderr)
        return 1
    print("all examples OK")
    return 0


async def figure_4_2(env: dict, workers: int) -> None:
    """Thesis figure 4.2's three programs, each with ``workers`` processes, answers checked."""
    # (a) broadcast: one sender, workers-1 receivers
    outs = await run_group(env, [("receiver",)] * (workers - 1) + [("sender",)], "broadcast.py")
    expected = float(sum(range(1_000_000)))
    got = [o for o in outs if o.startswith("received")]
    assert len(got) == workers - 1 and all(f"sum {expected}" in o for o in got), outs
    print(f"broadcast: {len(got)} receivers got the 1M-element array (sum {expected:.0f})")

    # (b) reduce: a root with a handler, workers-1 workers contributing 1..workers-1
    outs = await run_group(env, [("root",)] + [("worker", str(i)) for i in range(1, workers)], "reduce.py")
    want = sum(range(1, workers))
    assert f"reduce result is:  {want} from {workers - 1} lambdas" in outs[0], outs[0]
    print(f"reduce:    {outs[0].strip()}")

    # (c) shuffle: 4 receivers, workers-4 senders of 100 ints each
    senders = workers - 4
    outs = await run_group(env, [("receiver",)] * 4 + [("sender", str(i)) for i in range(senders)],
                           "shuffle.py")
    counts = [int(o.split()[1]) for o in outs[:4]]
    assert sum(counts) == 100 * senders and all(len(o.split("residues")[1].split(",")) == 1 for o in outs[:4]), outs
    print(f"shuffle:   4 receivers got {counts} items ({100 * senders} sent), one residue each")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8, help="worker processes per example (>= 5, default 8)")
    parser.add_argument("--cirrus-rows", type=int, default=50_000,
                        help="rows of generated click data for the cirrus workflow (default 50000)")
    args = parser.parse_args()
    if args.workers < 5:
        parser.error("--workers must be at least 5")
    sys.exit(asyncio.run(main(args.workers, args.cirrus_rows)))
