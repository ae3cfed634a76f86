#!/usr/bin/env python3
"""A WAN between network namespaces, in user space (review92: the kernel of our machines has no
sch_netem, no tc classifiers, no iptables). Opens one TUN device per "host" in the router
namespace; scripts/wan/setup.sh moves each into its host's namespace. Every IPv4 packet a host
sends goes out its tun, is read here, delayed / jittered / dropped per the rules in CONFIG (a
JSON file re-read when it changes, scripts/wan/shape.sh), and written to the destination host's
tun. Real packets: TCP sees real loss, retransmits, RTOs. A single-threaded emulator: meant for
the few messages a second of a small model's swarm, not for bandwidth.

CONFIG (all optional):
  {"delay_ms": 50, "jitter_ms": 10, "loss": 0.01,          # one-way, per packet, every pair
   "hosts": {"10.77.0.2": {"delay_ms": .., "jitter_ms": .., "loss": .., "down": true,
                            "spike_every_s": 5, "spike_ms": 1000}},   # extra, on packets to/from it
   "pairs": {"10.77.0.10>10.77.0.2": {...same keys, replace the defaults for that direction}}}
Jitter never reorders packets of one direction (like a FIFO link).
"""
import fcntl
import heapq
import json
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    cfg_path = sys.argv[1]
    hosts = {}  # ip -> (name, fd)
    for spec in sys.argv[2:]:
        name, ip = spec.split("=")
        hosts[ip] = (name, open_tun(name))
    print("ready", flush=True)
    fd_ip = {fd: ip for ip, (_, fd) in hosts.items()}
    cfg, cfg_mtime = {}, None
    heap, seq = [], 0
    last_dep = {}  # (src,dst) -> last departure time (FIFO per direction)
    stats = {"fwd": 0, "drop_loss": 0, "drop_down": 0, "drop_noroute": 0}
    next_cfg_check = 0.0
    next_stats = time.monotonic() + 30
    rng = random.Random(92)
    while True:
        now = time.monotonic()
        if now >= next_cfg_check:
            next_cfg_check = now + 0.1
            try:
                m = os.stat(cfg_path).st_mtime_ns
                if m != cfg_mtime:
                    with open(cfg_path) as f:
                        cfg = json.load(f)
                    cfg_mtime = m
                    print(time.strftime("%H:%M:%S"), "config", json.dumps(cfg), flush=True)
            except (OSError, ValueError) as e:
                print("config error", e, flush=True)
        if now >= next_stats:
            next_stats = now + 30
            print(time.strftime("%H:%M:%S"), "stats", stats, flush=True)
        timeout = 0.1
        if heap:
            timeout = max(0.0, min(timeout, heap[0][0] - now))
        r, _, _ = select.select(list(fd_ip), [], [], timeout)
        now = time.monotonic()
        for fd in r:
            while True:
                try:
                    pkt = os.read(fd, 65535)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    continue
                src = ".".join(map(str, pkt[12:16]))
                dst = ".".join(map(str, pkt[16:20]))
                if dst not in hosts:
                    stats["drop_noroute"] += 1
                    continue
                rule = dict(delay_ms=cfg.get("delay_ms", 0), jitter_ms=cfg.get("jitter_ms", 0), loss=cfg.get("loss", 0))
                rule.update(cfg.get("pairs", {}).get(f"{src}>{dst}", {}))
                extra_delay, extra_jit, loss, down = 0.0, 0.0, rule["loss"], False
                spike_until = 0.0
                for h in (src, dst):
                    hr = cfg.get("hosts", {}).get(h)
                    if not hr:
                        continue
                    extra_delay += hr.get("delay_ms", 0)
                    extra_jit += hr.get("jitter_ms", 0)
                    loss = 1 - (1 - loss) * (1 - hr.get("loss", 0))
                    down = down or hr.get("down", False)
                    if hr.get("spike_every_s"):
                        per = hr["spike_every_s"]
                        phase = now % per
                        dur = hr.get("spike_ms", 1000) / 1000
                        if phase < dur:  # in a spike: held until it ends
                            spike_until = max(spike_until, now - phase + dur)
                if down:
                    stats["drop_down"] += 1
                    continue
                if loss and rng.random() < loss:
                    stats["drop_loss"] += 1
                    continue
                d = (rule["delay_ms"] + extra_delay) / 1000
                j = (rule["jitter_ms"] + extra_jit) / 1000
                if j:
                    d = max(0.0, d + rng.uniform(-j, j))
                dep = max(now + d, spike_until + d if spike_until else 0, last_dep.get((src, dst), 0))
                last_dep[(src, dst)] = dep
                seq += 1
                heapq.heappush(heap, (dep, seq, hosts[dst][1], pkt))
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, fd, pkt = heapq.heappop(heap)
            try:
                os.write(fd, pkt)
                stats["fwd"] += 1
            except OSError:  # the destination tun is down
                stats["drop_down"] += 1


if __name__ == "__main__":
    main()
