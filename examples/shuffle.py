"""Thesis figure 4.2 (c): shuffle.

    ZIPCOMM_CONTROLLER=127.0.0.1:7000 python examples/shuffle.py receiver
    ZIPCOMM_CONTROLLER=127.0.0.1:7000 python examples/shuffle.py sender 0
"""

import sys

import zipcomm
from zipcomm import RECEIVER, SENDER

ch_name = "figure-4.2c"


def hash_ints(data, num_lambdas):
    return data % num_lambdas


def sender(data):
    sc = zipcomm.ShuffleChannel(ch_name, role=SENDER)
    print("joined", flush=True)
    sys.stdin.readline()  # go: every member has joined
    list_ints = list(range(data * 100, data * 100 + 100))
    sc.shuffle_send(list_ints, hash_function=hash_ints)


def receiver():
    sc = zipcomm.ShuffleChannel(ch_name, role=RECEIVER)
    print("joined", flush=True)
    sys.stdin.readline()
    result = sc.shuffle_receive(timeout=60)
    print("received", len(result), "items, residues", sorted({x % 4 for x in result}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "sender":
        sender(int(sys.argv[2]))
    else:
        receiver()
