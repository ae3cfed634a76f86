"""What an application gets from one SwarmModel with several prompts: one after another, from
several threads at once (their steps take turns on the model's sockets), `generate_batch` (in
step, the nodes batching the prompts' steps), and threads each asking one `batcher` (in step
too, as requests come). A local swarm of `--stages` layer stages.

    .venv/bin/python scripts/bench_batch.py --work-dir /tmp/nsbench        # GPT-2-small shape
    .venv/bin/python scripts/bench_batch.py --shape tiny --prompts 4 --tokens 8 --json
"""

from __future__ import annotations

import argparse
import json
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


def in_threads(model: SwarmModel | Batcher, prompts: list[str], tokens: int) -> list:
    """Each prompt's `generate` from a thread of its own, all started at once."""
    results: list = [None] * len(prompts)

    def run(k: int) -> None:
        results[k] = model.generate(prompts[k], tokens, GREEDY)
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or make_random_model_dir(args.work_dir / args.shape, SHAPES[args.shape])
    n_layer = read_manifest(model_dir).config.n_layer
    prompts = [f"ROMEO {k}: what light through yonder window" for k in range(args.prompts)]
    figures: dict[str, float] = {}
    with LocalCluster(model_dir, spans(n_layer, args.stages), threads=args.threads) as cluster, \
            SwarmModel.connect(model_dir, peers=cluster.addresses) as model:
        model.generate("Warm up", 4, GREEDY)
        runs = {"one after another": lambda: [model.generate(p, args.tokens, GREEDY) for p in prompts],
                "threads, one model": lambda: in_threads(model, prompts, args.tokens),
                "generate_batch": lambda: model.generate_batch(prompts, args.tokens, GREEDY),
                "threads, one batcher": lambda: in_threads(batcher, prompts, args.tokens)}
        batcher = model.batcher()
        ids = {}
        for name, run in runs.items():
            t0 = time.perf_counter()
            results = run()
            seconds = time.perf_counter() - t0
            figures[name] = sum(len(r.ids) for r in results) / seconds
            ids[name] = [r.ids for r in results]
        batcher.close()
    same = ids["generate_batch"] == ids["threads, one batcher"] == ids["one after another"]
    if args.json:
        print(json.dumps({"tokens_per_second": figures, "batch_ids_as_alone": same, "prompts": args.prompts,
                          "tokens": args.tokens, "stages": args.stages}))
    else:
        print(f"{args.prompts} prompts x {args.tokens} greedy tokens, {args.stages} stages "
              "(session opens and prompts included)")
        for name, tps in figures.items():
            print(f"  {name:<21} {tps:7.1f} tokens/s in all")
        print(f"  generate_batch's and the batcher's tokens as one after another's: {same}")


if __name__ == "__main__":
    main()
