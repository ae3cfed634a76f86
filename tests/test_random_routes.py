"""Exactness over drawn shapes, routes and options: a seeded draw of a small model, of node
processes over it (layer spans, head groups of uneven heads, nodes that take few positions a
step) and of the client's options, and a session fed in pieces; every position's logits must be
the single-process model's. Review170 ran 2,879 such cases (docs/reliability.md, sixty-first
session); these few keep the combinations in the suite."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_model_dir
from test_swarm import reference_logits

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.options import SwarmOptions
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.shards.model import ModelConfig


def _cuts(rng: random.Random, n: int, k: int) -> list[tuple[int, int]]:
    """0..n in k contiguous, non-empty, uneven ranges."""
    edges = [0, *sorted(rng.sample(range(1, n), k - 1)), n]
    return list(zip(edges, edges[1:]))


def _draw_model(rng: random.Random) -> tuple[ModelConfig, int, list | None]:
    n_head = rng.randint(1, 4)
    config = ModelConfig(n_layer=rng.randint(1, 5), n_head=n_head, n_embd=n_head * rng.choice([4, 8]),
                         block_size=rng.randint(24, 48), bias=rng.random() < 0.6, gelu=rng.choice(["tanh", "exact"]))
    splits = _cuts(rng, n_head, 2) if n_head >= 2 and rng.random() < 0.5 else None
    return config, rng.randint(1, 2), splits


def _draw_nodes(rng: random.Random, config: ModelConfig) -> list[NodeSpec]:
    """Nodes covering every block, at most four: each span one node, or a head group of two."""
    spans = _cuts(rng, config.n_layer, rng.randint(1, min(3, config.n_layer)))
    specs: list[NodeSpec] = []
    for span in spans:
        if config.n_head >= 2 and len(specs) + len(spans) < 4 and rng.random() < 0.5:
            specs += [NodeSpec(span, heads) for heads in _cuts(rng, config.n_head, 2)]
        else:
            specs.append(NodeSpec(span))
    for spec in specs:  # a node that takes a long step in pieces
        if rng.random() < 0.3:
            spec.args = ["--max-tokens-per-step", str(rng.randint(2, 8))]
    return specs


@pytest.mark.parametrize("seed", range(8))
def test_drawn_shapes_routes_and_options_give_the_single_process_logits(seed, tmp_path, cluster_factory):
    rng = random.Random(seed)
    config, layers_per_file, splits = _draw_model(rng)
    model_dir = make_model_dir(tmp_path / "model", config, seed=seed, layers_per_shard=layers_per_file,
                               head_splits=splits)
    specs = _draw_nodes(rng, config)
    options = SwarmOptions(relay=rng.random() < 0.7, all_reduce=rng.random() < 0.6,
                           verify=rng.choice([0.0, 0.0, 0.5]))
    case = f"seed {seed}: {config}, nodes {[(s.layers, s.heads, s.args) for s in specs]}, {options}"
    swarm = cluster_factory(model_dir, specs)
    model = SwarmModel.connect(model_dir, peers=swarm.addresses, options=options)
    try:
        length = config.block_size - rng.randint(1, 8)
        ids = torch.randint(0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
        want = reference_logits(model_dir, ids)
        session = model.session(length)
        pos, worst = 0, 0.0
        try:
            prompt = rng.randint(1, length // 2)
            while pos < length:  # the prompt in pieces, then one position a step
                n = min(rng.randint(1, prompt - pos), length - pos) if pos < prompt else 1
                hidden = session.step(model.client.embed(ids[pos:pos + n].tolist(), pos))
                with torch.inference_mode():
                    got = model.client.head(hidden)[0]
                worst = max(worst, (got - want[pos:pos + n]).abs().max().item())
                pos += n
        finally:
            session.close()
        assert worst <= 1e-5, case
        assert session.failovers == 0, case
    finally:
        model.close()
