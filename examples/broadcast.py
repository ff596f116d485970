"""Thesis figure 4.2 (a): broadcast.

    ZIPCOMM_CONTROLLER=127.0.0.1:7000 python examples/broadcast.py receiver
    ZIPCOMM_CONTROLLER=127.0.0.1:7000 python examples/broadcast.py sender
"""

import sys

import numpy as np

from zipcomm import BroadcastChannel

ch_name = "figure-4.2a"
bc = BroadcastChannel(ch_name)
print("joined", flush=True)


def sender():
    my_data = np.arange(1_000_000, dtype=np.float64)
    bc.send(data=my_data)


def receiver():
    data = bc.receive(timeout=60)
    print("received", data.shape, data.dtype, "sum", float(data.sum()), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "sender":
        sys.stdin.readline()  # the launcher says go once every receiver has joined
        sender()
    else:
        receiver()
