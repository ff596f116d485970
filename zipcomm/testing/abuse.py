"""A hostile client for tests and benchmarks: ``python -m zipcomm.testing.abuse HOST PORT N_SILENT N_DRIP``
opens N_SILENT sockets that send nothing and N_DRIP that send a real client hello one byte every
0.2 s (never completing it), prints ``ready`` once all are connected, then one JSON line when the
server has closed every one: ``{"first": s, "last": s, "n": count}``, the shortest and the longest
lifetime of a socket (seconds from its own connection to its close)."""

import asyncio
import json
import sys
import time

from zipcomm.protocol.handshake import Handshake


async def main(host: str, port: int, n_silent: int, n_drip: int) -> None:
    hello = Handshake(True, None).initial_bytes()
    async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
        # each socket's own clock: opening 1,100 of them one by one takes seconds under load
        r, w = await asyncio.open_connection(host, port)
        return r, w, time.monotonic()

    silent = [await opened() for _ in range(n_silent)]
    drips = [await opened() for _ in range(n_drip)]
    print("ready", flush=True)

    async def drip(w: asyncio.StreamWriter) -> None:
        try:
            for b in hello * 100:  # never completes: one byte every 0.2 s
                w.write(bytes([b]))
                await w.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass

    async def eof(r: asyncio.StreamReader, since: float) -> float:
        try:
            while await r.read(4096):
                pass
        except ConnectionError:
            pass
        return time.monotonic() - since

    tasks = [asyncio.create_task(drip(w)) for _, w, _ in drips]
    closed = await asyncio.wait_for(asyncio.gather(*(eof(r, since) for r, _, since in silent + drips)), 60)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _, w, _ in silent + drips:
        w.close()
    print(json.dumps({"first": min(closed), "last": max(closed), "n": len(closed)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
