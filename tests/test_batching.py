"""Decode steps of different sessions that reach a node together run as one forward pass, and
every session gets the logits it would get alone."""

from __future__ import annotations

import contextlib
import signal
import time

import torch

from nanoswarm.client.generate import ClientModel
from nanoswarm.client.head_group import HeadGroupStage
from nanoswarm.client.stages import RemoteLayerStage
from nanoswarm.client.transport import PeerConnection
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.node.handler import RequestHandler
from nanoswarm.node.steps import inference
from nanoswarm.protocol.messages import decode, encode
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks, load_embeddings, load_head, load_model

PROMPTS = [5, 9, 2, 13]  # prompt lengths: the sessions' caches hold different numbers of positions
DECODE_STEPS = 6


def token_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(model_dir, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return load_model(model_dir)(torch.tensor([ids]))[0]


def test_handler_batches_decode_steps_exactly(tiny_model_dir):
    """In process: one handle_batch call with a step of every session, against solo runs."""
    manifest = read_manifest(tiny_model_dir)
    blocks = load_blocks(tiny_model_dir, 0, 4, manifest=manifest)
    handler = RequestHandler(blocks, manifest.model_id, "test")
    solo = load_blocks(tiny_model_dir, 0, 4, manifest=manifest)
    ids = iter(range(1, 10**6))
    sessions, solo_caches, inputs = [], [], []
    for i, n in enumerate(PROMPTS):  # a client each: only a session's owner steps it
        client = f"client{i}".encode()
        reply = decode(handler.handle(client, encode("open", next(ids), {"max_length": 32})))
        sessions.append(reply.fields["session"])
        x = torch.randn(1, n, manifest.config.n_embd)
        out = decode(handler.handle(client, encode("step", next(ids), {"session": sessions[-1], "pos": 0}, [x])))
        solo_caches.append(solo.new_cache(32))
        with torch.inference_mode():
            assert torch.equal(out.tensors[0], solo(x, [solo_caches[-1]]))
        inputs.append(torch.randn(1, 1, manifest.config.n_embd))
    batch = [(f"client{i}".encode(), encode("step", next(ids), {"session": s, "pos": n}, [x]))
             for i, (s, n, x) in enumerate(zip(sessions, PROMPTS, inputs))]
    replies = handler.handle_batch(batch)
    assert handler.stats.max_batch == len(PROMPTS) and handler.stats.batched_steps == 1
    assert [peer for peer, _ in replies] == [peer for peer, _ in batch]
    for (_, frames), x, cache in zip(replies, inputs, solo_caches):
        with torch.inference_mode():
            want = solo(x, [cache])
        assert (decode(frames).tensors[0] - want).abs().max().item() <= 1e-5
    assert handler.info()["stats"]["max_batch"] == len(PROMPTS)


def test_a_handler_in_one_inference_mode_steps_as_one_outside_it(tiny_model_dir):
    """A node's loop runs in one inference mode (node/daemon.py) and its steps then enter none of
    their own (node/steps.py `inference`); unit tests drive the handler outside it. Both step a
    session alike: a prompt, then decode steps on the cache the first made (an inference tensor
    in the loop), whole and two sessions batched."""
    manifest = read_manifest(tiny_model_dir)
    width = manifest.config.n_embd
    torch.manual_seed(0)
    prompts = [torch.randn(1, n, width) for n in (5, 3)]
    steps = [[torch.randn(1, 1, width) for _ in prompts] for _ in range(3)]
    assert isinstance(inference(), torch.inference_mode)
    outputs = []
    for in_loop in (False, True):
        handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4, manifest=manifest), manifest.model_id, "t")
        ids = iter(range(1, 100))
        clients = [f"client{i}".encode() for i in range(len(prompts))]
        with torch.inference_mode() if in_loop else contextlib.nullcontext():
            assert isinstance(inference(), torch.inference_mode) is not in_loop
            sessions = [decode(handler.handle(c, encode("open", next(ids), {"max_length": 16}))).fields["session"]
                        for c in clients]
            outs = [decode(handler.handle(c, encode("step", next(ids), {"session": s, "pos": 0}, [x]))).tensors[0]
                    for c, s, x in zip(clients, sessions, prompts)]
            for k, xs in enumerate(steps):
                batch = [(c, encode("step", next(ids), {"session": s, "pos": x.shape[1] + k}, [h]))
                         for c, s, x, h in zip(clients, sessions, prompts, xs)]
                outs += [decode(frames).tensors[0] for _, frames in handler.handle_batch(batch)]
            assert handler.stats.batched_steps == len(steps)
        outputs.append([t.clone() for t in outs])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_head_shard_batches_each_phase_of_a_block_exactly(tiny_model_dir):
    """A head shard's attention (and MLP) steps of one block from different sessions share a
    forward pass, and each session gets what it gets stepped alone. One session covers blocks 1:3
    of the shard's 0:4, so its cache rows of a block sit at another offset: it must not join the
    others' attention of that block."""
    manifest = read_manifest(tiny_model_dir)
    width, heads = manifest.config.n_embd, (0, 2)
    batched = RequestHandler(load_blocks(tiny_model_dir, 0, 4, heads=heads, manifest=manifest), manifest.model_id, "b")
    alone = RequestHandler(load_blocks(tiny_model_dir, 0, 4, heads=heads, manifest=manifest), manifest.model_id, "a")
    spans = [(0, 4), (0, 4), (1, 3), (0, 4)]
    ids = iter(range(1, 10**6))
    clients = [f"client{i}".encode() for i in range(len(spans))]

    def request(handler, client, kind, fields, tensors=()):
        return decode(handler.handle(client, encode(kind, next(ids), fields, list(tensors))))

    sessions = {}  # (handler, client) -> session id
    for h in (batched, alone):
        for client, (a, b) in zip(clients, spans):
            sessions[h, client] = request(h, client, "open", {"max_length": 32, "layers": [a, b]}).fields["session"]
    torch.manual_seed(0)
    positions = PROMPTS[:]
    for step in range(3):  # a prefill of each prompt alone, then two decode steps in batches
        for block in range(4):
            for phase in ("attn", "mlp"):
                inside = [i for i, (a, b) in enumerate(spans) if a <= block < b]
                xs = {i: torch.randn(1, positions[i] if step == 0 else 1, width) for i in inside}
                fields = {(h, i): {"session": sessions[h, clients[i]], "pos": 0 if step == 0 else positions[i],
                                   "phase": phase, "block": block} for h in (batched, alone) for i in inside}
                want = {i: request(alone, clients[i], "step", fields[alone, i], [xs[i]]).tensors[0] for i in inside}
                if step == 0:
                    got = {i: request(batched, clients[i], "step", fields[batched, i], [xs[i]]).tensors[0]
                           for i in inside}
                else:
                    replies = batched.handle_batch([(clients[i], encode("step", next(ids), fields[batched, i],
                                                                        [xs[i]])) for i in inside])
                    got = {clients.index(peer): decode(frames).tensors[0] for peer, frames in replies}
                for i in inside:
                    assert (got[i] - want[i]).abs().max().item() <= 1e-5, (step, block, phase, i)
        if step:
            positions = [n + 1 for n in positions]
    # three of the four sessions in every decode pass of a block: 2 decode steps x 4 blocks x 2 phases
    assert batched.stats.max_batch == len(spans) and batched.stats.batched_steps == 16
    assert alone.stats.batched_steps == 0


def test_concurrent_sessions_through_real_nodes(tiny_model_dir, cluster_factory):
    """Several clients (a socket each) send their decode steps at the same moment to two real
    node processes; the nodes batch them, and each client's logits match a solo run."""
    cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    manifest = read_manifest(tiny_model_dir)
    client = ClientModel(load_embeddings(tiny_model_dir, manifest), load_head(tiny_model_dir, manifest))
    seqs = [token_ids(n + DECODE_STEPS, seed) for seed, n in enumerate(PROMPTS)]
    routes = [[RemoteLayerStage(PeerConnection(a, timeout=30), *layers, manifest.model_id)
               for a, layers in zip(cluster.addresses, [(0, 2), (2, 4)])] for _ in PROMPTS]
    try:
        got: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
        for i, (route, seq, n) in enumerate(zip(routes, seqs, PROMPTS)):  # prefills one by one
            hidden = client.embed(seq[:n], 0)
            for stage in route:
                stage.open(len(seq))
                hidden = stage.step(hidden, 0)
            got[i].append(client.logits(hidden))
        for t in range(DECODE_STEPS):
            hidden = [client.embed([seq[n + t]], n + t) for seq, n in zip(seqs, PROMPTS)]
            for j in range(len(cluster.addresses)):
                if t == 0:  # a paused node finds every step queued when it wakes: a sure batch
                    cluster.kill(j, signal.SIGSTOP)
                sent = [(route[j], route[j].conn.send("step", {"session": route[j].session, "pos": n + t},
                                                      [h])) for route, h, n in zip(routes, hidden, PROMPTS)]
                if t == 0:  # (once the client's I/O thread has written them all: review167)
                    time.sleep(0.2)
                    cluster.kill(j, signal.SIGCONT)
                hidden = [stage.conn.recv(req_id, "result").tensors[0] for stage, req_id in sent]
            for i, h in enumerate(hidden):
                got[i].append(client.logits(h))
        for i, (seq, n) in enumerate(zip(seqs, PROMPTS)):
            want = reference_logits(tiny_model_dir, seq)[n - 1:n + DECODE_STEPS]
            assert (torch.stack(got[i]) - want).abs().max().item() <= 1e-5
        for route in routes[:1]:
            for stage in route:
                stats = stage.conn.request("info").fields["stats"]
                assert stats["max_batch"] >= 2 and stats["batched_steps"] >= 1
    finally:
        for route in routes:
            for stage in route:
                stage.close()
                stage.conn.close()


def test_concurrent_sessions_through_a_real_head_group(tiny_model_dir, cluster_factory):
    """Clients (a socket each) fan out their decode steps to a head group of two real nodes at
    the same moment, each block's attention and then its MLP; both members batch them, and each
    client's logits match a solo run."""
    heads = [(0, 2), (2, 4)]
    cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), h) for h in heads])
    manifest = read_manifest(tiny_model_dir)
    client = ClientModel(load_embeddings(tiny_model_dir, manifest), load_head(tiny_model_dir, manifest))
    seqs = [token_ids(n + DECODE_STEPS, seed) for seed, n in enumerate(PROMPTS)]
    groups = [HeadGroupStage([(PeerConnection(a, timeout=30), h) for a, h in zip(cluster.addresses, heads)],
                             0, 4, manifest.model_id) for _ in PROMPTS]
    try:
        got: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
        for i, (group, seq, n) in enumerate(zip(groups, seqs, PROMPTS)):  # prefills one by one
            group.open(len(seq))
            got[i].append(client.logits(group.step(client.embed(seq[:n], 0), 0)))
        for t in range(DECODE_STEPS):
            hidden = [client.embed([seq[n + t]], n + t) for seq, n in zip(seqs, PROMPTS)]
            for block in range(4):
                for phase in ("attn", "mlp"):
                    paused = t == 0 and block == 0  # the members find every fan-out queued: a sure batch
                    for j in range(len(heads)):
                        if paused:
                            cluster.kill(j, signal.SIGSTOP)
                    sent = [[conn.send("step", {"session": g.sessions[k], "pos": n + t, "phase": phase, "block": block},
                                       [h]) for k, (conn, _) in enumerate(g.members)]
                            for g, h, n in zip(groups, hidden, PROMPTS)]
                    if paused:  # (once the client's I/O thread has written them all: review167)
                        time.sleep(0.2)
                    for j in range(len(heads)):
                        if paused:
                            cluster.kill(j, signal.SIGCONT)
                    hidden = [h + sum(conn.recv(req_id, "result").tensors[0]
                                      for (conn, _), req_id in zip(g.members, ids))
                              for g, ids, h in zip(groups, sent, hidden)]
            for i, h in enumerate(hidden):
                got[i].append(client.logits(h))
        for i, (seq, n) in enumerate(zip(seqs, PROMPTS)):
            want = reference_logits(tiny_model_dir, seq)[n - 1:n + DECODE_STEPS]
            assert (torch.stack(got[i]) - want).abs().max().item() <= 1e-5
        for conn, _ in groups[0].members:
            stats = conn.request("info").fields["stats"]
            # (the members wake to a queue their I/O thread may still be filling: not all four for sure)
            assert stats["max_batch"] >= 2 and stats["batched_steps"] >= 1
    finally:
        for group in groups:
            group.close()
            for conn, _ in group.members:
                conn.close()


# Review209: mutations of node/steps.py (_batch_key) that no test caught before.
def _twins(tiny_model_dir, heads=None):
    """Two handlers of the same blocks: one stepped in batches, one a request at a time."""
    manifest = read_manifest(tiny_model_dir)
    return [RequestHandler(load_blocks(tiny_model_dir, 0, 4, heads=heads, manifest=manifest), manifest.model_id, n)
            for n in ("batched", "alone")], manifest.config.n_embd


def test_only_steps_over_the_same_blocks_share_a_forward_pass(tiny_model_dir):
    """Decode steps share a forward pass only over the same blocks: a session on blocks 0:2 is not
    run through 0:4 with the sessions beside it that start at the same block. Steps of more
    than one position (here two sessions' at different lengths) each run alone. Every result is
    what the session gets stepped alone."""
    (batched, alone), width = _twins(tiny_model_dir)
    ids = iter(range(1, 10**6))
    spans, prompts = [(0, 4), (0, 2), (0, 4)], [3, 5, 4]
    clients = [f"client{i}".encode() for i in range(len(spans))]
    torch.manual_seed(0)
    sessions = {}
    for h in (batched, alone):
        for c, (a, b) in zip(clients, spans):
            sid = decode(h.handle(c, encode("open", next(ids), {"max_length": 16, "layers": [a, b]}))).fields["session"]
            sessions[h, c] = sid
    xs = [torch.randn(1, n, width) for n in prompts]
    rounds = [list(zip(clients, [0] * 3, xs)),  # prompts, alone
              [(c, n, torch.randn(1, 1, width)) for c, n in zip(clients, prompts)],  # one batch of decode steps
              [(c, n + 1, torch.randn(1, 2, width)) for c, n in zip(clients, prompts)][::2]]  # two positions each
    for k, steps in enumerate(rounds):
        frames = {h: [(c, encode("step", next(ids), {"session": sessions[h, c], "pos": pos}, [x]))
                      for c, pos, x in steps] for h in (batched, alone)}
        want = {c: decode(alone.handle(c, f)).tensors[0] for c, f in frames[alone]}
        got = {c: decode(f).tensors[0] for c, f in batched.handle_batch(frames[batched])}  # (in groups' order)
        assert got.keys() == want.keys()
        for c in want:
            assert (got[c] - want[c]).abs().max().item() <= 1e-5, (k, c)
    assert (batched.stats.max_batch, batched.stats.batched_steps) == (2, 1)  # sessions 0 and 2's decode steps


def test_a_head_shards_mlp_steps_of_different_blocks_run_apart(tiny_model_dir):
    """MLP partials share a forward pass only of the same block: one session's MLP of block 0 and
    another's of block 1, in one batch, each get their own block's."""
    (batched, alone), width = _twins(tiny_model_dir, heads=(0, 2))
    ids = iter(range(1, 10**6))
    clients = [b"client0", b"client1"]
    torch.manual_seed(0)
    sessions = {(h, c): decode(h.handle(c, encode("open", next(ids), {"max_length": 8}))).fields["session"]
                for h in (batched, alone) for c in clients}
    phases = {b"client0": [("attn", 0)], b"client1": [("attn", 0), ("mlp", 0), ("attn", 1)]}
    for c, steps in phases.items():
        for phase, block in steps:
            x = torch.randn(1, 1, width)
            for h in (batched, alone):
                fields = {"session": sessions[h, c], "pos": 0, "phase": phase, "block": block}
                assert decode(h.handle(c, encode("step", next(ids), fields, [x]))).type == "result"
    xs = [torch.randn(1, 1, width) for _ in clients]
    frames = {h: [(c, encode("step", next(ids), {"session": sessions[h, c], "pos": 0, "phase": "mlp",
                                                 "block": block}, [x]))
                  for c, block, x in zip(clients, (0, 1), xs)] for h in (batched, alone)}
    want = {c: decode(alone.handle(c, f)).tensors[0] for c, f in frames[alone]}
    got = {c: decode(f).tensors[0] for c, f in batched.handle_batch(frames[batched])}
    assert got.keys() == want.keys() and all((got[c] - want[c]).abs().max().item() <= 1e-5 for c in want)
    assert batched.stats.batched_steps == 0


# Review226: a mutation of node/steps.py that no test caught before.
def test_decode_steps_of_sessions_that_end_at_the_same_block_but_start_apart_run_apart(tiny_model_dir):
    """Sessions on blocks 0:4 and 2:4 end at the same block: their decode steps in one batch still
    run apart, each through its own blocks, as when stepped alone. (The test above has sessions
    that start at the same block only.) Kills: _batch_key keyed on the session's stop alone."""
    (batched, alone), width = _twins(tiny_model_dir)
    ids = iter(range(1, 10**6))
    clients, spans = [b"client0", b"client1"], [(0, 4), (2, 4)]
    sessions = {(h, c): decode(h.handle(c, encode("open", next(ids), {"max_length": 8, "layers": [a, b]})))
                .fields["session"] for h in (batched, alone) for c, (a, b) in zip(clients, spans)}
    xs = [torch.randn(1, 1, width, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    frames = {h: [(c, encode("step", next(ids), {"session": sessions[h, c], "pos": 0}, [x]))
                  for c, x in zip(clients, xs)] for h in (batched, alone)}
    want = {c: decode(alone.handle(c, f)).tensors[0] for c, f in frames[alone]}
    got = {c: decode(f) for c, f in batched.handle_batch(frames[batched])}
    assert [m.type for m in got.values()] == ["result", "result"], [m.fields for m in got.values()]
    assert all((got[c].tensors[0] - want[c]).abs().max().item() <= 1e-5 for c in want)
    assert batched.stats.batched_steps == 0
