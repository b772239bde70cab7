"""A ZeroMQ XSUB/XPUB forwarder: the usual pyzmq "broker" for pub/sub.

Run as a script (the suite starts it as the broker process)::

    python benchmarks/peers/zmq_proxy.py XSUB_ENDPOINT XPUB_ENDPOINT HWM

Publishers connect PUB sockets to the XSUB endpoint, subscribers SUB sockets to
the XPUB endpoint; ``zmq.proxy`` forwards messages one way and subscriptions
the other, in C. Data is queued at most ``HWM`` messages per peer in each
socket (XPUB drops beyond it for a slow subscriber); subscriptions are not
bounded. Stopped with SIGTERM.
"""

from __future__ import annotations

import sys

import zmq


def main(argv: list[str]) -> int:
    frontend, backend, hwm = argv[0], argv[1], int(argv[2])
    ctx = zmq.Context(io_threads=1)
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    # Data flows PUB -> XSUB -> XPUB -> SUB: bounded at hwm messages per peer.
    # Subscriptions flow back (SUB -> XPUB -> XSUB -> PUB) without a bound, or a
    # publisher that connects late would get only the first hwm of them.
    xsub.set(zmq.RCVHWM, hwm)
    xsub.set(zmq.SNDHWM, 0)
    xpub.set(zmq.SNDHWM, hwm)
    xpub.set(zmq.RCVHWM, 0)
    for sock in (xsub, xpub):
        sock.set(zmq.LINGER, 0)
    xsub.bind(frontend)
    xpub.bind(backend)
    print(f"zmq proxy listening on {frontend} -> {backend} (hwm {hwm})", flush=True)
    zmq.proxy(xsub, xpub)  # until SIGTERM ends the process
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
