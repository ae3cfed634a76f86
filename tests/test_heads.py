"""Head shards: one block split across peers by attention heads, summed by the client."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

import pytest
import torch
from test_swarm import DECODE_STEPS, PROMPT_LEN, random_ids, reference_logits, swarm_logits

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.head_group import HeadGroupStage
from nanoswarm.client.peer_errors import PeerError
from nanoswarm.client.route import PeerInfo, RouteError, build_route
from nanoswarm.client.transport import PeerConnection
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.node.handler import RequestHandler
from nanoswarm.node.server import NodeServer
from nanoswarm.node.sessions import NodeLimits
from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import decode, encode
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.model import KVCache
from nanoswarm.shards.weights import load_blocks

SPLITS = {
    "2 groups 6+6": [(0, 6), (6, 12)],
    "3 groups 5+4+3": [(0, 5), (5, 9), (9, 12)],
    "12 groups of one head": [(h, h + 1) for h in range(12)],
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("12") else n
                                  for n in SPLITS])
def test_head_group_logits_match(small12_model_dir, cluster_factory, name):
    swarm = cluster_factory(small12_model_dir, [NodeSpec((0, 12), h) for h in SPLITS[name]])
    model = SwarmModel.connect(small12_model_dir, peers=swarm.addresses)
    try:
        plan = model.swarm.plan()
        assert len(plan) == 1 and plan[0].heads == SPLITS[name]
        ids = random_ids(PROMPT_LEN + DECODE_STEPS, seed=4)
        got = swarm_logits(model, ids)
        want = reference_logits(small12_model_dir, ids)[PROMPT_LEN - 1:]
        assert (got - want).abs().max().item() <= 1e-5
    finally:
        model.close()


def test_mixed_route_of_layer_stages_and_a_head_group(small12_model_dir, cluster_factory):
    specs = [NodeSpec((0, 4)), NodeSpec((4, 8), (0, 6)), NodeSpec((4, 8), (6, 12)), NodeSpec((8, 12))]
    swarm = cluster_factory(small12_model_dir, specs)
    model = SwarmModel.connect(small12_model_dir, peers=swarm.addresses)
    local = SwarmModel.local(small12_model_dir)
    try:
        route = [(p.start, p.stop, p.is_head_group) for p in model.swarm.plan()]
        assert route == [(0, 4, False), (4, 8, True), (8, 12, False)]
        ids = random_ids(PROMPT_LEN + DECODE_STEPS, seed=5)
        got = swarm_logits(model, ids)
        assert (got - reference_logits(small12_model_dir, ids)[PROMPT_LEN - 1:]).abs().max().item() <= 1e-5
        greedy = SamplingParams(temperature=0)
        assert model.generate("Split heads", 20, greedy).ids == local.generate("Split heads", 20, greedy).ids
    finally:
        model.close()


def test_kv_cache_holds_only_the_nodes_heads(small12_model_dir, cluster_factory):
    swarm = cluster_factory(small12_model_dir, [NodeSpec((0, 12), (0, 5)), NodeSpec((0, 12), (5, 12))])
    config = SwarmModel.local(small12_model_dir).config
    for address, (a, b) in zip(swarm.addresses, [(0, 5), (5, 12)]):
        conn = PeerConnection(address, timeout=10)
        try:
            opened = conn.request("open", {"max_length": 64})
            want = KVCache.bytes_for(12, b - a, config.head_dim, 64)
            assert opened.fields["kv_bytes"] == want
            assert opened.fields["idle_timeout"] == 300.0  # the default; clients hold reclaims to it
            info = conn.request("info").fields
            assert info["heads"] == [a, b] and info["kv_bytes"] == want
            assert want < KVCache.bytes_for(12, config.n_head, config.head_dim, 64)
        finally:
            conn.close()


def test_route_prefers_fewer_round_trips():
    def peer(addr, layers, heads=None, rtt=0.001):
        return PeerInfo(addr, addr, "m", layers, heads, rtt=rtt)

    peers = [peer("a", (0, 4)), peer("b", (4, 8), rtt=0.01), peer("h1", (4, 8), (0, 6)),
             peer("h2", (4, 8), (6, 12)), peer("c", (8, 12))]
    route = build_route(peers, 12, 12)
    assert [p.peers[0].address for p in route] == ["a", "b", "c"]  # slower, but 1 round trip
    route = build_route([p for p in peers if p.address != "b"], 12, 12)
    assert route[1].heads == [(0, 6), (6, 12)]


def test_route_cost_after_round_trips_is_time_then_load_and_a_group_takes_the_fewest_members():
    """client/route.py: among routes of as many round trips, the lowest expected time (round trips
    plus compute from the peers' throughput; those within TIME_STEP of the fastest tie), then the lowest load; a head
    group is the fewest members that tile the heads, the fastest such."""
    def first(peers, n_layer=12):
        return [q.address for q in build_route(peers, n_layer, 12)[0].peers]

    assert first([PeerInfo("slow", "slow", "m", (0, 12), rtt=0.002),
                  PeerInfo("fast", "fast", "m", (0, 12), rtt=0.001)]) == ["fast"]
    assert first([PeerInfo("busy", "busy", "m", (0, 12), rtt=0.001, load=0.9),
                  PeerInfo("idle", "idle", "m", (0, 12), rtt=0.001, load=0.1)]) == ["idle"]
    # Compute counts as a round trip does: a peer that measured 30x the tokens/s wins, either way
    # round; peers that measured about the same tie, and the lower load decides.
    cpu, gpu = (PeerInfo(a, a, "m", (0, 12), rtt=0.001, throughput=t) for a, t in (("cpu", 3.0), ("gpu", 90.0)))
    assert first([cpu, gpu]) == first([gpu, cpu]) == ["gpu"]
    # (review97: steps counted from zero put 93.46 and 92.59 tok/s, or a 1.000 and a 1.010 ms round
    # trip, on either side of an edge: they are counted from the fastest route now)
    for (busy_tps, busy_rtt), (idle_tps, idle_rtt) in itertools.permutations(
            [(100.0, 0.001), (104.0, 0.001), (93.46, 0.001), (92.59, 0.001), (100.0, 0.00101)], 2):
        assert first([PeerInfo("busy", "busy", "m", (0, 12), rtt=busy_rtt, load=0.9, throughput=busy_tps),
                      PeerInfo("idle", "idle", "m", (0, 12), rtt=idle_rtt, load=0.1, throughput=idle_tps)]) == ["idle"]
    # A millisecond of round trip more also ties (TIE_SLACK_US: timing noise on a busy machine,
    # which parted like peers of a fast route, review103); a few milliseconds more does not.
    for idle_rtt, chosen in ((0.0013, "idle"), (0.004, "busy")):
        assert first([PeerInfo("busy", "busy", "m", (0, 12), rtt=0.0004, load=0.9, throughput=500.0),
                      PeerInfo("idle", "idle", "m", (0, 12), rtt=idle_rtt, load=0.1, throughput=500.0)]) == [chosen]
    # ... but at most the fastest's own time (review104: a CPU peer 3-10x slower than a GPU peer of
    # a small model tied with it, and took its sessions for a lower load)
    for rtt, gpu_tps in ((0.0002, 5000.0), (0.00005, 20000.0)):
        assert first([PeerInfo("gpu", "gpu", "m", (0, 4), rtt=rtt, load=0.1, throughput=gpu_tps),
                      PeerInfo("cpu", "cpu", "m", (0, 4), rtt=rtt, throughput=1000.0)], 4) == ["gpu"]
    # ... and a head group's is over all its blocks, not each (review104: members 4.2x slower over
    # 12 blocks tied, for a lower load)
    members = [PeerInfo(a, a, "m", (0, 12), heads, rtt=rtt, load=load, throughput=1e6 / (12 * 50))
               for a, heads, rtt, load in (("A", (0, 6), 0.0001, 0.5), ("B", (6, 12), 0.0001, 0.5),
                                           ("C", (0, 6), 0.0005, 0.0), ("D", (6, 12), 0.0005, 0.0))]
    assert first(members) == ["A", "B"]
    # The window is measured from the fastest route of all at every boundary: kept for its load at
    # block 1 (124 against 100 ms), a prefix must not make the next block's window 1.25 x 124 ms
    # (review98: 154 ms chosen against 101 ms).
    blockwise = [PeerInfo(a, a, "m", (b, b + 1), rtt=0.0, load=load, throughput=1e3 / ms)
                 for a, b, load, ms in (("busy0", 0, 0.9, 100), ("idle0", 0, 0.1, 124),
                                        ("busy1", 1, 0.9, 1), ("idle1", 1, 0.1, 30))]
    route = build_route(blockwise, 2, 12)
    assert sum(1e3 / p.throughput for plan in route for p in plan.peers) <= 1.25 * 101
    # A throughput that states nothing counts as the slowest stated; one near 0 is not infinite.
    assert first([PeerInfo("unknown", "unknown", "m", (0, 12), rtt=0.001), gpu, cpu]) == ["gpu"]
    assert first([PeerInfo("tiny", "tiny", "m", (0, 12), rtt=0.001, throughput=1e-320), cpu]) == ["cpu"]
    # Round trips still come first: one slow stage against two fast ones.
    assert first([PeerInfo("a", "a", "m", (0, 6), rtt=0.001, throughput=1000.0),
                  PeerInfo("b", "b", "m", (6, 12), rtt=0.001, throughput=1000.0), cpu]) == ["cpu"]
    # A stage over part of a peer's blocks takes that share of its time: a peer serving 0:12 at
    # 10 tok/s takes 50 ms for 0:6, against 30 ms for a peer serving 0:6 at 33 tok/s.
    halves = [PeerInfo("whole", "whole", "m", (0, 12), rtt=0.001, throughput=10.0),
              PeerInfo("half", "half", "m", (0, 6), rtt=0.001, throughput=33.0)]
    assert [(p.start, p.stop, [q.address for q in p.peers]) for p in build_route(halves, 6, 12)] == [
        (0, 6, ["half"])]
    # A head group waits for its slowest member.
    group = [PeerInfo(a, a, "m", (0, 12), h, rtt=0.001, throughput=t)
             for a, h, t in (("h1", (0, 6), 50.0), ("h2", (6, 12), 2.0), ("h3", (6, 12), 40.0))]
    assert first(group) == ["h1", "h3"]
    # ... a member's round trip counts twice a block (attention and MLP): 2 x 1 ms against
    # 2 x 0.5 ms + 0.6 ms of compute (review97)
    group = [PeerInfo("h1", "h1", "m", (0, 1), (0, 6), rtt=0.0005, throughput=10**6),
             PeerInfo("far", "far", "m", (0, 1), (6, 12), rtt=0.001, throughput=10**6),
             PeerInfo("near", "near", "m", (0, 1), (6, 12), rtt=0.0005, throughput=1e6 / 600)]
    assert first(group, n_layer=1) == ["h1", "near"]
    # Like members tie within TIME_STEP, and the less loaded ones make the group; a member that is
    # less loaded but much slower still loses.
    like = [PeerInfo(a, a, "m", (0, 12), h, rtt=rtt, load=load, throughput=100.0)
            for a, h, rtt, load in (("a-busy", (0, 6), 0.0010, 0.3), ("a-idle", (0, 6), 0.0011, 0.0),
                                    ("b-idle", (6, 12), 0.0011, 0.0), ("b-busy", (6, 12), 0.0010, 0.2))]
    assert first(like) == first(like[::-1]) == ["a-idle", "b-idle"]
    like[1].throughput = 10.0  # 10.5 against 2.8 ms a block
    assert first(like) == first(like[::-1]) == ["a-busy", "b-idle"]
    assert first([PeerInfo("h1", "h1", "m", (0, 12), (0, 6), rtt=0.001),
                  PeerInfo("all", "all", "m", (0, 12), (0, 12), rtt=0.002),
                  PeerInfo("h2", "h2", "m", (0, 12), (6, 12), rtt=0.001)]) == ["all"]


def test_route_groups_members_that_serve_different_blocks():
    """A node opens a session on any part of its blocks, so members need only share the group's."""
    def peer(addr, layers, heads=None):
        return PeerInfo(addr, addr, "m", layers, heads)

    def plan(peers):
        return [(p.start, p.stop, [q.address for q in p.peers]) for p in build_route(peers, 6, 12)]

    assert plan([peer("A", (0, 6), (0, 6)), peer("B", (0, 3), (6, 12)), peer("C", (3, 6), (6, 12))]) == \
        [(0, 3, ["A", "B"]), (3, 6, ["A", "C"])]
    assert plan([peer("A", (0, 3), (0, 6)), peer("D", (0, 6), (6, 12)), peer("L", (3, 6))]) == \
        [(0, 3, ["A", "D"]), (3, 6, ["L"])]
    # a group costs two round trips a block: hand over to a layer stage as soon as one serves
    assert plan([peer("G1", (0, 6), (0, 6)), peer("G2", (0, 6), (6, 12)), peer("L", (3, 6))]) == \
        [(0, 3, ["G1", "G2"]), (3, 6, ["L"])]
    # a tie in round trips and time keeps one stage: each stage holds a session on every member
    for rtt in (0.008988, 0.00684, 0.0013, 0.0029):
        same = [PeerInfo("A", "A", "m", (0, 48), (0, 6), rtt=rtt),
                PeerInfo("B", "B", "m", (0, 48), (6, 12), rtt=0.00684)]
        assert [(p.start, p.stop) for p in build_route(same, 48, 12)] == [(0, 48)]
    with pytest.raises(RouteError, match=r"layers 0:6 \(head shards of layers 0:6 do not cover every head: "
                                         r"heads 6:7 of layer 0 served by no one\)"):
        build_route([peer("A", (0, 6), (0, 6)), peer("B", (0, 6), (7, 12))], 6, 12)
    with pytest.raises(RouteError, match=r"layers 3:6 \(head shards of layers 3:6 do not cover every head: "
                                         r"heads 0:6 of layer 3 served by no one\)"):
        build_route([peer("A", (0, 3)), peer("B", (3, 6), (6, 12))], 6, 12)
    with pytest.raises(RouteError, match=r"their head ranges overlap without partitioning them\)"):
        build_route([peer("A", (0, 6), (0, 7)), peer("B", (0, 6), (6, 12))], 6, 12)


def test_route_costs_count_a_groups_round_trips_its_slowest_member_and_the_asked_blocks_only():
    """Mutation review210: a head group is two round trips a block, its time its slowest member's
    (round trip and compute), its members' tie window the stage's, and no stage passes `stop`."""
    def peer(addr, layers, heads=None, rtt=0.001, load=0.0, throughput=0.0):
        return PeerInfo(addr, addr, "m", layers, heads, rtt=rtt, load=load, throughput=throughput)

    def plan(peers, n_layer, start=0, stop=None):
        return [(p.start, p.stop, [q.address for q in p.peers])
                for p in build_route(peers, n_layer, 12, start, stop)]

    # Two layer stages (2 round trips) beat a faster group over the same 2 blocks (4).
    assert plan([peer("a", (0, 1)), peer("b", (1, 2)), peer("g1", (0, 2), (0, 6), rtt=0.0005),
                 peer("g2", (0, 2), (6, 12), rtt=0.0005)], 2) == [(0, 1, ["a"]), (1, 2, ["b"])]
    # As many round trips either way: one group over 0:2 with a slow member (its round trip, or its
    # compute) loses to two groups of fast members, though it is fewer stages.
    fast = 1e9
    for slow in (dict(rtt=0.01, throughput=fast), dict(rtt=0.001, throughput=10.0)):
        peers = [peer("A", (0, 2), (0, 6), **slow), peer("B", (0, 2), (6, 12), throughput=fast),
                 peer("C", (0, 1), (0, 6), throughput=fast), peer("D", (1, 2), (0, 6), throughput=fast)]
        assert plan(peers, 2) == [(0, 1, ["C", "B"]), (1, 2, ["D", "B"])], slow
    # Members 1.7x slower a block do not tie over 12 blocks for their lower load: the slack is the
    # stage's (TIE_SLACK_US over 12 blocks), not a block's, and at most the fastest's own time.
    members = [peer(a, (0, 12), h, rtt=rtt, load=load, throughput=fast)
               for a, h, rtt, load in (("A", (0, 6), 0.001, 0.5), ("B", (6, 12), 0.001, 0.5),
                                       ("C", (0, 6), 0.0017, 0.0), ("D", (6, 12), 0.0017, 0.0))]
    assert plan(members, 12) == [(0, 12, ["A", "B"])]
    # A route over part of the blocks ends at `stop`, whatever its peers serve past it.
    assert plan([peer("L", (0, 12))], 12, 0, 6) == [(0, 6, ["L"])]
    assert plan([peer("G1", (0, 12), (0, 6)), peer("G2", (0, 12), (6, 12))], 12, 0, 6) == [(0, 6, ["G1", "G2"])]


def test_route_ties_take_the_fewest_stages_then_the_lowest_load_then_the_order_given():
    """Mutation review210: of routes of as many round trips and like time, the fewest stages win
    before the lowest load; among like members the first given; TIME_STEP and TIE_SLACK_US are
    the window, not more."""
    def peer(addr, layers, heads=None, rtt=0.001, load=0.0, throughput=0.0):
        return PeerInfo(addr, addr, "m", layers, heads, rtt=rtt, load=load, throughput=throughput)

    def plan(peers, n_layer=12):
        return [(p.start, p.stop, [q.address for q in p.peers]) for p in build_route(peers, n_layer, 12)]

    # One group over 0:12 (24 round trips, load 0.5) against two idle ones over 0:6 and 6:12 (24)
    peers = [peer("A", (0, 12), (0, 6), load=0.5), peer("B", (0, 12), (6, 12), load=0.5),
             peer("C", (0, 6), (0, 6)), peer("E", (0, 6), (6, 12)),
             peer("D", (6, 12), (0, 6)), peer("F", (6, 12), (6, 12))]
    assert plan(peers) == [(0, 12, ["A", "B"])]
    # Like members: the first given
    twins = [peer("a1", (0, 12), (0, 6)), peer("a2", (0, 12), (0, 6)), peer("b", (0, 12), (6, 12))]
    assert plan(twins) == [(0, 12, ["a1", "b"])]
    assert plan([twins[1], twins[0], twins[2]]) == [(0, 12, ["a2", "b"])]
    # 1.4x slower is past TIME_STEP: the idle peer does not tie with the busy one
    assert plan([peer("busy", (0, 12), rtt=0.0, load=0.9, throughput=100.0),
                 peer("idle", (0, 12), rtt=0.0, load=0.1, throughput=100.0 / 1.4)]) == [(0, 12, ["busy"])]
    # 2.1 ms of round trip more, over a 2.4 ms route, is past TIE_SLACK_US
    assert plan([peer("busy", (0, 12), rtt=0.0004, load=0.9, throughput=500.0),
                 peer("idle", (0, 12), rtt=0.0025, load=0.1, throughput=500.0)]) == [(0, 12, ["busy"])]


def test_route_error_names_the_heads_no_one_serves_at_the_first_partial_block():
    """Mutation review210: a head peer whose blocks end at the uncovered block does not serve it."""
    def peer(addr, layers, heads=None):
        return PeerInfo(addr, addr, "m", layers, heads)

    with pytest.raises(RouteError, match=r"layers 3:6 \(head shards of layers 3:6 do not cover every head: "
                                         r"heads 3:6 of layer 3 served by no one\)"):
        build_route([peer("A", (0, 3), (0, 6)), peer("B", (0, 6), (6, 12)), peer("C", (3, 6), (0, 3))], 6, 12)


def test_members_that_take_few_positions_a_step_get_them_in_pieces(tiny_model_dir, cluster_factory):
    """Every member states its limit when the session opens; the group sends what all take
    (a refusal cannot be halved: the members that took a block have stored it)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), (0, 1)), NodeSpec((0, 4), (1, 4))],
                            args=["--max-tokens-per-step", "5"])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        ids = random_ids(PROMPT_LEN + DECODE_STEPS, seed=6)  # the prompt is longer than 5
        got = swarm_logits(model, ids)
        assert (got - reference_logits(tiny_model_dir, ids)[PROMPT_LEN - 1:]).abs().max().item() <= 1e-5
        assert not model.swarm.bans
    finally:
        model.close()


def test_head_shards_announce_their_heads_in_records(tiny_model_dir, cluster_factory):
    """A client that knows only a bootstrap builds the head group from the signed records."""
    import time

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), (0, 2)), NodeSpec((0, 4), (2, 4))])
    deadline = time.monotonic() + 15
    while True:
        model = SwarmModel.connect(tiny_model_dir, bootstrap=[swarm.addresses[0]])
        if len(model.swarm.peers) == 2 or time.monotonic() > deadline:
            break
        model.close()
        time.sleep(0.3)
    try:
        assert sorted(p.heads for p in model.swarm.peers.values()) == [(0, 2), (2, 4)]
        plan = model.swarm.plan()
        assert len(plan) == 1 and plan[0].heads == [(0, 2), (2, 4)]
        greedy = SamplingParams(temperature=0)
        local = SwarmModel.local(tiny_model_dir)
        assert model.generate("Heads", 12, greedy).ids == local.generate("Heads", 12, greedy).ids
    finally:
        model.close()


class _BusyOnce(RequestHandler):
    """A member that refuses its first attention step of `block` as overloaded (`busy`), the way
    a node does: before touching the session."""

    def __init__(self, *args, block: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.block, self.refused = block, 0
        validate = self.steps.checks.validate

        def validate_or_refuse(reply_to, msg, **kwargs):
            if msg.get("phase") == "attn" and msg.get("block") == self.block and not self.refused:
                self.refused += 1
                raise ProtocolError(ErrorCode.BUSY, "node overloaded (test)")
            return validate(reply_to, msg, **kwargs)

        self.steps.checks.validate = validate_or_refuse


@contextlib.contextmanager
def in_process_nodes(handlers: list[RequestHandler]):
    """Each handler served on a real socket by a NodeServer in a thread of this process; yields a
    connection to each."""
    servers = [NodeServer(h, "tcp://127.0.0.1:*") for h in handlers]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    conns = [PeerConnection(s.address, 10.0) for s in servers]
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()
        for s in servers:
            s.stop()
        for t in threads:
            t.join(5)


def test_a_busy_head_group_member_is_asked_again_alone(tiny_model_dir):
    """The other member has stored the block's attention by then: asking the whole group for the
    step again would be refused (`bad_position`) and end in a failover of an honest member."""
    model_id = read_manifest(tiny_model_dir).model_id
    handlers = [RequestHandler(load_blocks(tiny_model_dir, 0, 4, heads=(0, 2)), model_id, "a", NodeLimits()),
                _BusyOnce(load_blocks(tiny_model_dir, 0, 4, heads=(2, 4)), model_id, "b", NodeLimits(), block=2)]
    with in_process_nodes(handlers) as conns:
        stage = HeadGroupStage([(conns[0], (0, 2)), (conns[1], (2, 4))], 0, 4, model_id)
        stage.open(8)
        blocks = load_blocks(tiny_model_dir, 0, 4)
        cache = blocks.new_cache(8)
        x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(3))
        for a, b in ((0, 5), (5, 6), (6, 7)):  # a prefill (refused once at block 2), then decode
            got = stage.step(x[:, a:b], a)
            with torch.inference_mode():
                want = blocks(x[:, a:b], [cache])
            assert (got - want).abs().max().item() <= 1e-5
        assert handlers[1].refused == 1


def generate_around_a_restart(model_dir, nodes, model: SwarmModel, spare: str, heads: tuple[int, int]):
    """Generate on the first node (the spare timed slow, so routes take it while they can),
    restart that node at its address and key serving blocks 0:4 `heads`, and generate again:
    both exactly as one process. Returns the second generation."""
    from nanoswarm.keys.contact import split_contact

    greedy = SamplingParams(temperature=0)
    want = SwarmModel.local(model_dir).generate("Split heads", 6, greedy).ids
    model.swarm.timed[spare] = model.swarm.peers[spare].rtt = 1.0
    assert model.generate("Split heads", 6, greedy).ids == want
    first = nodes.nodes[0]
    nodes.kill(0)
    first.proc.wait(10)
    nodes.start_node(NodeSpec((0, 4), heads, args=["--listen", split_contact(first.address)[0],
                                                   "--key-file", str(first.key_file)]))
    result = model.generate("Split heads", 6, greedy)
    assert result.ids == want
    return result


def test_a_member_restarted_with_other_heads_is_not_summed_for_its_old_ones(tiny_model_dir, cluster_factory):
    """A head group's member opens for the heads the client sums it for, and a node serving
    others refuses (`not_served`). Review118: a member restarted at the same address and key
    with `--heads 2:4` instead of 0:2 was still summed as 0:2 by a client whose table predated it
    (heads 2:4 twice, 0:2 never): every output wrong, no failover, for ~55 s. Now the route goes
    through the spare that serves 0:2, exact; and a whole-block node refuses a member's open."""
    from nanoswarm.keys.contact import split_contact

    nodes = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), (0, 2)), NodeSpec((0, 4), (2, 4)),
                                             NodeSpec((0, 4), (0, 2)), NodeSpec((0, 4))], bootstrap=False)
    a, b, spare, whole = nodes.addresses
    model = SwarmModel.connect(tiny_model_dir, peers=[a, b, spare])
    try:
        result = generate_around_a_restart(tiny_model_dir, nodes, model, spare, (2, 4))
        assert [s["peers"] for s in result.route] == [[spare, b]] and result.failovers == 0
        # No fault of its own (review120: struck, it stayed banned while it served 0:2 again):
        # what it serves now was read at the refusal.
        assert a not in model.swarm.bans and model.swarm.peers[a].heads == (2, 4)
        # A peer that refuses an open `not_served` while its `info` claims the same span is
        # struck (review121: never struck, it cost every session a round trip and a wait).
        session = model.session(8)
        try:
            session._refused_or_strike(PeerError(b, "not_served", "heads 2:4 are not the served 2:4"), {})
            assert b in model.swarm.bans and session.failovers == 1
        finally:
            session.close()
        conn = PeerConnection(whole, 10.0, server_key=split_contact(whole)[1])
        try:
            with pytest.raises(PeerError) as e:
                conn.request("open", {"max_length": 8, "layers": [0, 4], "heads": [0, 2]})
            assert e.value.code == "not_served" and "heads 0:2 are not the served 0:4" in e.value.message
            assert conn.request("open", {"max_length": 8, "layers": [0, 4], "heads": [0, 4]}).type == "opened"
        finally:
            conn.close()
    finally:
        model.close()


def test_a_whole_block_node_restarted_as_a_head_shard_refuses_a_layer_stages_open(tiny_model_dir, cluster_factory):
    """A layer stage's `open` names all heads: a node restarted at that address and key as a
    head shard refuses it (`not_served`), and the client plans without it and reads what it serves
    now, with no strike. Review120: opened without heads, it took the session, refused its first
    step `malformed`, and was banned for it."""
    nodes = cluster_factory(tiny_model_dir, [NodeSpec((0, 4)), NodeSpec((0, 4))], bootstrap=False)
    a, spare = nodes.addresses
    model = SwarmModel.connect(tiny_model_dir, peers=[a, spare])
    try:
        result = generate_around_a_restart(tiny_model_dir, nodes, model, spare, (0, 2))
        assert [s["peers"] for s in result.route] == [[spare]] and result.failovers == 0
        assert a not in model.swarm.bans and model.swarm.peers[a].heads == (0, 2)
    finally:
        model.close()


class _EarlierVersion(RequestHandler):
    """A node of an earlier version: it neither checks the heads an `open` names nor says its
    own in `opened`."""

    def _check_heads(self, msg) -> None:
        pass

    def _open(self, peer, msg):
        opened = decode(super()._open(peer, msg))
        fields = {k: v for k, v in opened.fields.items() if k != "heads"}
        return encode("opened", opened.id, fields)


def test_a_member_of_an_earlier_version_is_asked_its_heads_at_open(tiny_model_dir):
    """A member of an earlier version does not check `open`'s heads: its `info` is asked at each
    open, and one that serves other heads (restarted with them) is refused `not_served` with its
    session closed. Review122: one such was summed for its old heads for ~53 s, every output
    wrong. A member that serves the named heads opens as before."""
    model_id = read_manifest(tiny_model_dir).model_id
    handlers = [RequestHandler(load_blocks(tiny_model_dir, 0, 4, heads=(0, 2)), model_id, "a", NodeLimits()),
                _EarlierVersion(load_blocks(tiny_model_dir, 0, 4, heads=(2, 4)), model_id, "b", NodeLimits()),
                RequestHandler(load_blocks(tiny_model_dir, 0, 4, heads=(2, 4)), model_id, "c", NodeLimits())]
    with in_process_nodes(handlers) as conns:
        stage = HeadGroupStage([(conns[0], (0, 2)), (conns[1], (2, 4))], 0, 4, model_id)
        stage.open(8)  # the old member serves 2:4, as named
        assert "heads" not in stage.limits[1] and [len(h.sessions.sessions) for h in handlers] == [1, 1, 0]
        stage.close()
        wrong = HeadGroupStage([(conns[1], (0, 2)), (conns[2], (2, 4))], 0, 4, model_id)  # as if B had restarted
        with pytest.raises(PeerError) as e:
            wrong.open(8)
        assert e.value.code == "not_served" and e.value.address == conns[1].address
        assert "its info names heads [2, 4], not 0:2" in e.value.message
        wrong.close()  # as the session's open does on an error: the old member's session is closed
        time.sleep(0.2)
        assert [len(h.sessions.sessions) for h in handlers] == [0, 0, 0]


# Review173 (sixty-second session): a mutation of the code that no test caught before.
def test_closing_a_head_group_closes_each_members_own_session(tiny_model_dir):
    """Each member's session is closed on that member's connection: a close sent elsewhere
    leaves the member's KV cache held till its idle timeout (other clients are refused busy)."""
    import time

    from nanoswarm.client.head_group import HeadGroupStage

    handlers, model_id = _members(tiny_model_dir)
    with in_process_nodes(handlers) as conns:
        stage = HeadGroupStage([(conns[0], (0, 2)), (conns[1], (2, 4))], 0, 4, model_id)
        stage.open(8)
        assert all(len(h.sessions.sessions) == 1 for h in handlers)
        stage.close()
        deadline = time.monotonic() + 5
        while any(h.sessions.sessions for h in handlers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(h.sessions.sessions for h in handlers)


# Review173 (sixty-second session): a mutation of the code that no test caught before.
def test_a_member_busy_through_every_retry_fails_the_step_busy(tiny_model_dir):
    """A fan-out member still busy after BUSY_RETRIES retries raises its PeerError (the
    session fails it over), not a TypeError from summing a partial that never came."""

    from nanoswarm.client.head_group import HeadGroupStage
    from nanoswarm.client.peer_errors import PeerError
    from nanoswarm.node.sessions import NodeLimits

    model_id = read_manifest(tiny_model_dir).model_id
    busy = _BusyOnce(load_blocks(tiny_model_dir, 0, 4, heads=(2, 4)), model_id, "b", NodeLimits(), block=2)
    from nanoswarm.protocol.errors import ErrorCode, ProtocolError
    handlers = [_members(tiny_model_dir)[0][0], busy]

    def always_busy(reply_to, msg, **kwargs):
        if msg.get("phase") == "attn" and msg.get("block") == 2:
            raise ProtocolError(ErrorCode.BUSY, "node overloaded (test)")
        return plain(reply_to, msg, **kwargs)

    plain = type(busy.steps.checks).validate.__get__(busy.steps.checks)
    busy.steps.checks.validate = always_busy
    with in_process_nodes(handlers) as conns:
        stage = HeadGroupStage([(conns[0], (0, 2)), (conns[1], (2, 4))], 0, 4, model_id)
        stage.open(8)
        with pytest.raises(PeerError) as e:
            stage.step(torch.randn(1, 1, 64), 0)
        assert e.value.code == "busy"


def _members(model_dir) -> tuple[list[RequestHandler], str]:
    """Two head-shard handlers of the tiny model, heads 0:2 and 2:4 of every block."""
    model_id = read_manifest(model_dir).model_id
    return [RequestHandler(load_blocks(model_dir, 0, 4, heads=h), model_id, f"m{k}", NodeLimits())
            for k, h in enumerate([(0, 2), (2, 4)])], model_id


def test_a_member_busy_for_every_retry_but_the_last_is_still_served(tiny_model_dir):
    """A fan-out member busy BUSY_RETRIES times in a row, then free: the last retry serves it and
    the step's output is exact. One retry fewer (review214's mutation) failed such a member over
    while the test above, always busy, passed."""
    from nanoswarm.client.stages import BUSY_RETRIES

    (first, second), model_id = _members(tiny_model_dir)
    refused: list[int] = []
    plain = second.steps.checks.validate

    def busy_for_every_retry_but_the_last(reply_to, msg, **kwargs):
        if msg.get("phase") == "attn" and msg.get("block") == 2 and len(refused) < BUSY_RETRIES:
            refused.append(msg.get("pos"))
            raise ProtocolError(ErrorCode.BUSY, "node overloaded (test)")
        return plain(reply_to, msg, **kwargs)

    second.steps.checks.validate = busy_for_every_retry_but_the_last
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(5))
    blocks = load_blocks(tiny_model_dir, 0, 4)
    with torch.inference_mode():
        want = blocks(x, [blocks.new_cache(8)])
    with in_process_nodes([first, second]) as conns:
        stage = HeadGroupStage([(conns[0], (0, 2)), (conns[1], (2, 4))], 0, 4, model_id)
        stage.open(8)
        got = stage.step(x, 0)
        stage.close()
    assert (got - want).abs().max().item() <= 1e-5
    assert refused == [0] * BUSY_RETRIES
