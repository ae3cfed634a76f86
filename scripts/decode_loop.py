"""Decode steps (or prompts) in a loop through a local swarm, for a profiler to watch: the
client and every node process are named by pid on stderr before the loop starts.

    .venv/bin/python scripts/decode_loop.py [--shape tiny|gpt2-small | --model DIR] [--stages 4]
        [--head-groups 2] [--links relay|star] [--seconds 20] [--threads 2] [--insecure]
        [--prefill 128] [--json]
    py-spy record -p PID -r 1000 -d 12 --nonblocking -f raw -o node.txt   # while it runs

A route of `--stages` layer stages, or (with `--head-groups N`) one stage of N head-shard members
of one torch thread each, all-reducing with `--links relay` and met by the client with `star`.
Sessions of 512 positions, a 16-token prompt, then one-token steps fed fixed ids, the client's
head and argmax as `generate` runs them; a fresh session when one is full. The tiny shape's
blocks keep the caches warm, so what a token costs beyond its compute shows at its plainest
(docs/performance.md, fifty-fourth session: py-spy is not a dependency; `pip install py-spy`
into the venv). Prints the tokens stepped and the median ms a token. With `--prefill N`, prompts
of N positions instead, each in a fresh session (its last row asked for, as `generate` asks), a
50 ms pause between them (a prompt comes after the user's pause): the prompts and the median ms
of one, embedding to the first token's argmax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nanoswarm  # noqa: F401  (first: its OpenMP defaults must precede torch's import)

# isort: split
import torch

from nanoswarm.bench.models import SHAPES, make_random_model_dir
from nanoswarm.client.session import InferenceSession
from nanoswarm.client.swarm import Swarm, SwarmOptions
from nanoswarm.node.cluster import LocalCluster, swarm_specs
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_embeddings, load_head

SESSION = 512
PROMPT = 16
PAUSE = 0.05  # between two prompts of --prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--model", type=Path, help="a model dir instead of random weights of --shape")
    ap.add_argument("--work-dir", type=Path, help="where the random-weight model dir is kept")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--head-groups", type=int, default=1,
                    help="members of one head group (as the bench: 2 or more) instead of layer stages")
    ap.add_argument("--links", default="relay", choices=("relay", "star"))
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--insecure", action="store_true", help="no CURVE (its share of the cost)")
    ap.add_argument("--prefill", type=int, metavar="N", help="prompts of N positions in a loop, not decode steps")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanoswarm-loop-") as tmp:
        model_dir = args.model or make_random_model_dir((args.work_dir or Path(tmp)) / args.shape, SHAPES[args.shape])
        run(args, ap, model_dir)


def run(args: argparse.Namespace, ap: argparse.ArgumentParser, model_dir: Path) -> None:
    manifest = read_manifest(model_dir)
    config = manifest.config
    members = args.head_groups
    try:  # (the harness's own layout: a head group is one span of `members` head shards)
        nodes = swarm_specs(config.n_layer, config.n_head, 1 if members > 1 else args.stages, members)
    except ValueError as e:
        ap.error(str(e))
    if args.prefill is not None and not 1 <= args.prefill <= SESSION:
        ap.error(f"--prefill takes 1 to {SESSION} positions")
    torch.set_num_threads(args.threads)
    embed, head = load_embeddings(model_dir, manifest), load_head(model_dir, manifest)
    ids = torch.randint(0, config.vocab_size, (SESSION,), generator=torch.Generator().manual_seed(0))
    # A head group's members one torch thread each, as the bench's (they compute at once).
    cluster = LocalCluster(model_dir, nodes, threads=1 if members > 1 else args.threads,
                           args=["--insecure"] if args.insecure else []).start()
    times: list[float] = []
    try:
        swarm = Swarm(manifest.model_id, config.n_layer, config.n_head,
                      SwarmOptions(timeout=60.0, relay=args.links == "relay", all_reduce=args.links == "relay",
                                   insecure=args.insecure))
        try:
            swarm.add_addresses(cluster.addresses, timeout=30.0)
            print(f"pids: client {os.getpid()} nodes {' '.join(str(n.pid) for n in cluster.nodes)}",
                  file=sys.stderr, flush=True)
            end = time.monotonic() + args.seconds
            while args.prefill is not None and time.monotonic() < end:
                session = InferenceSession.open(swarm, SESSION)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    hidden = session.step(embed(ids[None, :args.prefill], 0), last=1)
                    int(head(hidden[:, -1:]).argmax())
                times.append(time.perf_counter() - t0)
                session.close()
                time.sleep(PAUSE)
            while args.prefill is None and time.monotonic() < end:
                session = InferenceSession.open(swarm, SESSION)
                with torch.inference_mode():
                    session.step(embed(ids[None, :PROMPT], 0), last=1)
                    for pos in range(PROMPT, SESSION):
                        t0 = time.perf_counter()
                        hidden = session.step(embed(ids[None, pos:pos + 1], pos))
                        int(head(hidden[:, -1:]).argmax())
                        times.append(time.perf_counter() - t0)
                        if time.monotonic() >= end:
                            break
                session.close()
        finally:
            swarm.close()
    finally:
        cluster.stop()
    median_ms = statistics.median(times) * 1e3 if times else None
    what = "tokens" if args.prefill is None else "prompts"
    if args.json:
        print(json.dumps({what: len(times), "median_ms": median_ms}))
    else:
        print(f"{len(times)} {what}, median {median_ms:.3f} ms a {what[:-1]}" if times else f"no {what}")


if __name__ == "__main__":
    main()
