"""What a client's request costs before it leaves: `PeerConnection.send` of an `info` request to a
ROUTER on loopback, on a plain link and on a swarm's link (`forgive_idle_drops`: it reads its
socket monitor first, client/link_drops.py), and `drain_events` alone.

    .venv/bin/python scripts/bench_send.py [--sends 2000] [--runs 5]

Prints microseconds a send, the best of the runs (docs/performance.md, twenty-seventh session).
"""

from __future__ import annotations

import argparse
import time

import zmq

import nanoswarm  # noqa: F401  (its thread settings, as every entry point)
from nanoswarm.client.transport import PeerConnection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    for forgive in (False, True):
        conn = PeerConnection(f"tcp://127.0.0.1:{port}", 5.0, forgive_idle_drops=forgive)
        conn.send("info")
        router.recv_multipart()  # connected
        runs = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            for _ in range(args.sends):
                conn.send("info")
            runs.append((time.perf_counter() - t0) / args.sends * 1e6)
            for _ in range(args.sends):
                router.recv_multipart()
        t0 = time.perf_counter()
        for _ in range(args.sends * 10):
            conn.drain_events()
        drain = (time.perf_counter() - t0) / (args.sends * 10) * 1e6
        print(f"{'swarm link' if forgive else 'plain link'}: send {min(runs):.1f} us, drain_events {drain:.1f} us")
        conn.close()
    router.close()


if __name__ == "__main__":
    main()
