"""What encryption costs a link here: a ZeroMQ request/reply on loopback with and without CURVE,
and what an AEAD from `cryptography` (OpenSSL) takes for the same bytes.

    .venv/bin/python scripts/bench_curve.py [--sizes 3072,393216] [--repeats 200]

3 KB is a GPT-2-small decode step's activations, 384 KB a 128-token prefill's. The round trip
carries the message both ways, so CURVE's share of it is two encryptions and two decryptions
(docs/performance.md, "The floor on this machine").
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import zmq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305


def round_trip_ms(size: int, repeats: int, curve: bool) -> float:
    """Median ms of one DEALER -> ROUTER -> DEALER round trip of `size` bytes on 127.0.0.1."""
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (server, client):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)  # a broken link fails the run instead of hanging it
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        server.curve_secretkey, server.curve_publickey, server.curve_server = server_secret, server_public, True
        client.curve_secretkey, client.curve_publickey = client_secret, client_public
        client.curve_serverkey = server_public
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    warm_up = 5

    def echo() -> None:  # the server socket is used by this thread only
        for _ in range(warm_up + repeats):
            server.send_multipart(server.recv_multipart(copy=False), copy=False)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    data, times = os.urandom(size), []
    try:
        for _ in range(warm_up + repeats):
            t0 = time.perf_counter()
            client.send(data, copy=False)
            client.recv(copy=False)
            times.append(time.perf_counter() - t0)
        thread.join(10)
    finally:
        ctx.destroy(linger=0)
    return statistics.median(times[warm_up:]) * 1e3


def aead_ms(cipher, size: int, repeats: int) -> tuple[float, float]:
    """Median ms to encrypt and to decrypt `size` bytes with a fresh 256-bit key."""
    aead, nonce, data = cipher(os.urandom(32)), os.urandom(12), os.urandom(size)
    sealed = aead.encrypt(nonce, data, None)
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        aead.encrypt(nonce, data, None)  # one key and nonce for timing only: never reuse them for real
        t1 = time.perf_counter()
        aead.decrypt(nonce, sealed, None)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    return statistics.median(enc) * 1e3, statistics.median(dec) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    ap.add_argument("--sizes", default="3072,393216", help="message sizes in bytes, comma-separated")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        plain, curve = round_trip_ms(size, args.repeats, False), round_trip_ms(size, args.repeats, True)
        print(f"{size:8d} B  round trip: plain {plain:.3f} ms, CURVE {curve:.3f} ms "
              f"(CURVE's share per message {(curve - plain) / 2:.3f} ms)")
        for cipher in (AESGCM, ChaCha20Poly1305):
            enc, dec = aead_ms(cipher, size, args.repeats)
            print(f"{size:8d} B  {cipher.__name__:16s} encrypt {enc:.3f} ms, decrypt {dec:.3f} ms")


if __name__ == "__main__":
    main()
