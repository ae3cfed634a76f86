"""What an application gets from one SwarmModel with several prompts: one after another, from
several threads at once (their steps take turns on the model's sockets), `generate_batch` (in
step, the nodes batching the prompts' steps), and threads each asking one `batcher` (in step
too, as requests come). A local swarm of `--stages` layer stages.

With `--max-sessions N` the nodes hold at most N sessions each, fewer than the prompts: the
batcher's and generate_batch's generations past them wait for a place, and each way's refused
opens (generations given back) and peer-table reads are counted.

    .venv/bin/python scripts/bench_batch.py --work-dir /tmp/nsbench        # GPT-2-small shape
    .venv/bin/python scripts/bench_batch.py --shape tiny --prompts 4 --tokens 8 --json
    .venv/bin/python scripts/bench_batch.py --shape tiny --prompts 48 --tokens 16 --max-sessions 2
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import torch

from nanoswarm.bench.models import SHAPES, make_random_model_dir
from nanoswarm.client.api import SwarmModel
from nanoswarm.client.batcher import Batcher
from nanoswarm.client.generate import SamplingParams
from nanoswarm.node.cluster import LocalCluster, NodeSpec
from nanoswarm.shards.manifest import read_manifest

GREEDY = SamplingParams(temperature=0)


def spans(n_layer: int, stages: int) -> list[NodeSpec]:
    cuts = [round(n_layer * k / stages) for k in range(stages + 1)]
    return [NodeSpec((a, b)) for a, b in zip(cuts, cuts[1:])]


class Refusals(logging.Handler):
    """Counts the client's log lines of generations given back for want of a place, and of
    peer-table reads."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.given_back = self.table_reads = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.given_back += "no route for one more generation" in message
        self.table_reads += message.startswith("refreshed the peer table")


def in_threads(model: SwarmModel | Batcher, prompts: list[str], tokens: int) -> list:
    """Each prompt's `generate` from a thread of its own, all started at once; its result, or its
    error (threads on one model open every session at once: past the nodes' `--max-sessions`
    they find no route)."""
    results: list = [None] * len(prompts)

    def run(k: int) -> None:
        try:
            results[k] = model.generate(prompts[k], tokens, GREEDY)
        except Exception as e:  # noqa: BLE001 - counted and shown
            results[k] = e
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    parser.add_argument("--model", type=Path, help="a model dir instead of random weights of --shape")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/nanoswarm-bench-batch"))
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each process")
    parser.add_argument("--max-sessions", type=int, help="each node's session limit (default: the node's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or make_random_model_dir(args.work_dir / args.shape, SHAPES[args.shape])
    n_layer = read_manifest(model_dir).config.n_layer
    prompts = [f"ROMEO {k}: what light through yonder window" for k in range(args.prompts)]
    figures: dict[str, float] = {}
    refusals: dict[str, tuple[int, int]] = {}
    failed: dict[str, list[str]] = {}
    limit = ["--max-sessions", str(args.max_sessions)] if args.max_sessions else []
    nodes = [NodeSpec(spec.layers, args=limit) for spec in spans(n_layer, args.stages)]
    counter = Refusals()
    client_log = logging.getLogger("nanoswarm.client")
    client_log.addHandler(counter)
    client_log.setLevel(logging.INFO)  # (no handler prints it: the root has none)
    with LocalCluster(model_dir, nodes, threads=args.threads) as cluster, \
            SwarmModel.connect(model_dir, peers=cluster.addresses) as model:
        model.generate("Warm up", 4, GREEDY)
        runs = {"one after another": lambda: [model.generate(p, args.tokens, GREEDY) for p in prompts],
                "threads, one model": lambda: in_threads(model, prompts, args.tokens),
                "generate_batch": lambda: model.generate_batch(prompts, args.tokens, GREEDY),
                "threads, one batcher": lambda: in_threads(batcher, prompts, args.tokens)}
        batcher = model.batcher(at_once=max(16, args.prompts))
        ids = {}
        for name, run in runs.items():
            counter.given_back = counter.table_reads = 0
            t0 = time.perf_counter()
            results = run()
            seconds = time.perf_counter() - t0
            done = [r for r in results if not isinstance(r, Exception)]
            figures[name] = sum(len(r.ids) for r in done) / seconds
            ids[name] = [getattr(r, "ids", None) for r in results]
            failed[name] = [str(r) for r in results if isinstance(r, Exception)]
            refusals[name] = (counter.given_back, counter.table_reads)
        batcher.close()
    same = ids["generate_batch"] == ids["threads, one batcher"] == ids["one after another"]
    if args.json:
        print(json.dumps({"tokens_per_second": figures, "batch_ids_as_alone": same, "prompts": args.prompts,
                          "tokens": args.tokens, "stages": args.stages, "max_sessions": args.max_sessions,
                          "given_back_and_table_reads": refusals, "failed": failed}))
    else:
        print(f"{args.prompts} prompts x {args.tokens} greedy tokens, {args.stages} stages "
              "(session opens and prompts included)")
        if args.max_sessions:
            print(f"nodes of at most {args.max_sessions} sessions: generations given back for want of a place, "
                  "and peer-table reads, in brackets")
        for name, tps in figures.items():
            counts = f"  ({refusals[name][0]} given back, {refusals[name][1]} table reads)" if args.max_sessions else ""
            if failed[name]:
                counts += f"  [{len(failed[name])} failed: {failed[name][0][:60]}]"
            print(f"  {name:<21} {tps:7.1f} tokens/s in all{counts}")
        print(f"  generate_batch's and the batcher's tokens as one after another's: {same}")


if __name__ == "__main__":
    main()
