"""Thesis figure 4.2 (b): reduce.

    ZIPCOMM_CONTROLLER=127.0.0.1:7000 python examples/reduce.py root
    ZIPCOMM_CONTROLLER=127.0.0.1:7000 python examples/reduce.py worker 5
"""

import sys

from zipcomm import ReduceChannel

ch_name = "figure-4.2b"


def root():
    def receive_result(result, num_lambdas):
        print("reduce result is: ", result, "from", num_lambdas, "lambdas", flush=True)

    rc = ReduceChannel(ch_name, handler=receive_result)
    print("joined", flush=True)
    sys.stdin.readline()  # go: every worker has joined
    rc.reduce()


def worker(data):
    rc = ReduceChannel(ch_name, sum)
    print("joined", flush=True)
    sys.stdin.readline()
    rc.reduce(data)
    rc.close()


if __name__ == "__main__":
    if sys.argv[1] == "root":
        root()
    else:
        worker(int(sys.argv[2]))
