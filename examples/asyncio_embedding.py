"""zipcomm inside an asyncio application: a controller and four members in one
event loop, an allreduce of numpy arrays, and a broadcast of a model update.

    python examples/asyncio_embedding.py
"""

import asyncio

import numpy as np

import zipcomm


async def member(address: str, rank: int, ready: asyncio.Barrier) -> float:
    async with zipcomm.connect(address) as rt:
        grads = await rt.reduce_channel("gradients", zipcomm.SUM)
        updates = await rt.broadcast_channel("updates")
        await ready.wait()  # every member has joined both channels
        total = await grads.allreduce(np.full(1000, rank, dtype=np.float64))
        if rank == 0:
            await updates.send({"step": 1, "weights": total / 4})
            model = {"step": 1, "weights": total / 4}
        else:
            model = await updates.receive(timeout=30)
        await ready.wait()  # nobody leaves while others still need the tree
        return float(model["weights"][0])


async def main() -> None:
    async with zipcomm.Controller("127.0.0.1:0") as controller:
        ready = asyncio.Barrier(4)
        results = await asyncio.gather(*(member(controller.address, r, ready) for r in range(4)))
    print("every member holds weight", results[0], "- agreement:", len(set(results)) == 1)
    assert results == [1.5] * 4


if __name__ == "__main__":
    asyncio.run(main())
