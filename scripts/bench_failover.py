"""How long a failover adds to one decode step, at several positions.

    .venv/bin/python scripts/bench_failover.py [--shape gpt2-small|tiny] [--positions 20,200,800]
        [--kill first,last]

Swarm: two nodes serve blocks 0:n/2 and two serve n/2:n. A session prefills to each position
and decodes 5 tokens, then the route's first (or last) peer is SIGKILLed; the next step detects
the drop (TCP close), plans a replacement, replays the history into it and finishes. A prefill of
more than 32 positions is relayed without bringing the last stage's input back, so replacing the
last stage first recomputes it on the first (client/history.py). Prints the failing step's time,
a normal step's time, and the difference: the time the failover adds.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nanoswarm  # noqa: F401  (first: its OpenMP defaults must precede torch's import)

# isort: split
import torch

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.swarm import SwarmOptions
from nanoswarm.node.cluster import LocalCluster, NodeSpec
from nanoswarm.shards.cut import write_model_dir
from nanoswarm.shards.model import GPT, ModelConfig

SHAPES = {
    "gpt2-small": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=1024),
}


def measure(model_dir: Path, n_layer: int, position: int, kill: str) -> tuple[float, float]:
    half = n_layer // 2
    specs = [NodeSpec((0, half)), NodeSpec((0, half)), NodeSpec((half, n_layer)), NodeSpec((half, n_layer))]
    with LocalCluster(model_dir, specs, threads=1) as swarm:
        model = SwarmModel.connect(model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=30))
        session = model.session(position + 8)
        embed = model.client.embed
        session.step(embed([1] * position, 0))
        normal = []
        for _ in range(5):
            t0 = time.perf_counter()
            session.step(embed([2], session.pos))
            normal.append(time.perf_counter() - t0)
        victim = swarm.addresses.index(session.stages[0 if kill == "first" else -1].peers[0])
        swarm.kill(victim, signal.SIGKILL)
        t0 = time.perf_counter()
        session.step(embed([3], session.pos))
        failing = time.perf_counter() - t0
        if session.failovers != 1:  # (not an assert: python -O would drop it and report a wrong figure)
            raise SystemExit(f"expected the kill to cost one failover, got {session.failovers}")
        session.close()
        model.close()
    return failing, statistics.median(normal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    ap.add_argument("--positions", default="20,200,800")
    ap.add_argument("--kill", default="first,last", help="whose peer dies: the first stage's, the last's")
    args = ap.parse_args()
    if not set(args.kill.split(",")) <= {"first", "last"}:
        ap.error("--kill takes first, last or both")
    config = SHAPES[args.shape]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_model_dir(config, GPT(config).flat_state_dict(), tmp, 3, progress=False)
        half = config.n_layer // 2
        print(f"shape {args.shape}: failover by SIGKILL of a stage's peer (first: blocks 0:{half}, last: "
              f"{half}:{config.n_layer}), torch {torch.__version__}, 1 thread per node")
        print(f"{'stage':>6} {'position':>9} {'failing step ms':>16} {'normal step ms':>15} {'added ms':>9}")
        for kill in args.kill.split(","):
            for pos in (int(p) for p in args.positions.split(",")):
                failing, normal = measure(Path(tmp), config.n_layer, pos, kill)
                print(f"{kill:>6} {pos:>9} {failing * 1000:>16.1f} {normal * 1000:>15.1f} "
                      f"{(failing - normal) * 1000:>9.1f}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
