"""Relayed steps (client/relay.py, node/relay.py): nodes pass a step on to the next stage and the
last one answers the client. Real node processes; results exact; failover still works when a hop
in the middle or at the end of the chain dies or freezes; nodes relay only to peers they know."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from test_failover import N_TOKENS, PROMPT, SEEDED, TIMEOUT, generate_with_fault  # the same fault harness

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.swarm import SwarmOptions
from nanoswarm.client.transport import PeerConnection, PeerError
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.node.handler import RequestHandler
from nanoswarm.node.relay import Relay
from nanoswarm.protocol.messages import decode, encode
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks, load_model

GREEDY = SamplingParams(temperature=0)


def stats(model: SwarmModel, address: str) -> dict:
    return model.swarm.connection(address).request("info").fields["stats"]


def test_relayed_steps_are_exact_and_relayed(tiny_model_dir, cluster_factory):
    """Logits through a relayed 3-stage chain equal the single-process model's, and the nodes
    really passed the steps on (the last one has nobody to pass to)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4))])
    ids = torch.randint(0, 50257, (24,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0][7:]
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        session = model.session(len(ids))
        got = [model.client.logits(session.step(model.client.embed(ids[:8].tolist(), 0)))]
        for t in range(8, len(ids)):
            got.append(model.client.logits(session.step(model.client.embed([int(ids[t])], t))))
        assert (torch.stack(got) - want).abs().max().item() <= 1e-5
        assert len(session.stages) == 3 and all(len(h.entries) == len(ids) - 7 for h in session.history)
        # Every stage's history holds what it was sent (replayed on failover): the hops' outputs.
        hidden = model.client.embed(ids.tolist(), 0)
        for stage, history in zip(session.stages, session.history):
            sent = history.tensor()
            with torch.inference_mode():
                assert (sent - hidden).abs().max().item() <= 1e-5
                hidden = model.swarm.connection(stage.peers[0]).request(
                    "forward", {"layers": [stage.start, stage.stop]}, [hidden]).tensors[0]
        session.close()
        relayed = [stats(model, a)["relayed"] for a in swarm.addresses]
        assert relayed[:2] == [len(ids) - 7] * 2 and relayed[2] == 0  # an 8-token prefill is relayed too
    finally:
        model.close()


def test_relay_and_star_give_the_same_tokens(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    local = SwarmModel.local(tiny_model_dir).generate(PROMPT, 24, GREEDY).ids
    for relay in (True, False):
        model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(relay=relay))
        try:
            assert model.generate(PROMPT, 24, GREEDY).ids == local
        finally:
            model.close()


def three_stages_with_spares() -> list[NodeSpec]:
    return [NodeSpec((0, 4)), NodeSpec((4, 8)), NodeSpec((8, 12)), NodeSpec((4, 8)), NodeSpec((8, 12))]


@pytest.fixture(scope="module")
def expected(small12_model_dir) -> list[int]:
    return SwarmModel.local(small12_model_dir).generate(PROMPT, N_TOKENS, SEEDED).ids


@pytest.mark.parametrize("pick", [1, 2], ids=["middle hop", "last hop"])
def test_killed_hop_mid_generation(small12_model_dir, cluster_factory, expected, pick):
    swarm = cluster_factory(small12_model_dir, three_stages_with_spares())
    killed: list[str] = []

    def kill(i: int) -> None:
        killed.append(swarm.addresses[i])
        swarm.kill(i, signal.SIGKILL)

    notices: list[str] = []
    result = generate_with_fault(small12_model_dir, swarm, kill, notices, lambda route: route[pick]["peers"][0])
    assert result.ids == expected
    assert result.failovers == 1 and "disconnected" in notices[0] and killed[0] in notices[0]
    assert result.route[pick]["peers"][0] not in killed  # the spare took over


@pytest.mark.slow
def test_frozen_middle_hop_is_found_and_replaced(small12_model_dir, cluster_factory, expected):
    """A frozen hop stalls the whole relayed step: after the timeout the client asks each stage
    for `info`, replaces the one that does not answer, and the tokens are unchanged."""
    swarm = cluster_factory(small12_model_dir, three_stages_with_spares())
    frozen: list[int] = []

    def freeze(i: int) -> None:
        frozen.append(i)
        swarm.kill(i, signal.SIGSTOP)

    t0 = time.monotonic()
    try:
        notices: list[str] = []
        result = generate_with_fault(small12_model_dir, swarm, freeze, notices, lambda route: route[1]["peers"][0])
    finally:
        for i in frozen:
            swarm.kill(i, signal.SIGCONT)
    assert result.ids == expected
    assert result.failovers == 1 and "timeout" in notices[0] and swarm.addresses[frozen[0]] in notices[0]
    assert time.monotonic() - t0 < 4 * TIMEOUT + 20  # one timeout and a short probe, not one per stage


def test_nodes_relay_only_to_peers_they_know(small12_model_dir, cluster_factory, expected):
    """Nodes started without introductions know no one: the first hop refuses to relay
    (not_served), the client asks it no more and goes stage by stage, with the same tokens."""
    swarm = cluster_factory(small12_model_dir, [NodeSpec((0, 6)), NodeSpec((6, 12))], bootstrap=False)
    model = SwarmModel.connect(small12_model_dir, peers=swarm.addresses)
    try:
        assert model.generate(PROMPT, N_TOKENS, SEEDED).ids == expected
        first = model.swarm.connection(swarm.addresses[0]).request("info").fields
        assert first["stats"]["relayed"] == 0
        assert first["errors"] == {"not_served": 1}  # refused once; never asked again
    finally:
        model.close()


def test_a_hop_that_would_not_relay_to_a_replaced_stage_is_asked_again(tiny_model_dir, cluster_factory):
    """A refuses to relay to C, a stranger to it (not_served), so the client goes A, C stage by
    stage; when C dies and B, whom A knows, replaces it, the steps are relayed again."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))], bootstrap=False)
    a, c = swarm.addresses
    b = swarm.start_node(NodeSpec((2, 4), args=["--bootstrap", a])).address
    ids = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0]
    model = SwarmModel.connect(tiny_model_dir, peers=[a, c], options=SwarmOptions(timeout=TIMEOUT))
    try:
        session = model.session(len(ids))  # B told A about itself before it printed `listening`
        got = [model.client.logits(session.step(model.client.embed([int(ids[t])], t))) for t in range(4)]
        assert stats(model, a)["relayed"] == 0 and session.stages[1].peers == [c]
        swarm.kill(1)
        model.swarm.add_addresses([b])
        got += [model.client.logits(session.step(model.client.embed([int(ids[t])], t))) for t in range(4, 16)]
        assert session.stages[1].peers == [b]
        assert (torch.stack([g.reshape(-1) for g in got]) - want).abs().max().item() <= 1e-5
        assert stats(model, a)["relayed"] >= 10  # steps 4-15, less one that found C gone
    finally:
        model.close()


def test_a_next_hop_that_refuses_reaches_the_client_as_relay_failed(tiny_model_dir, cluster_factory):
    """The next hop cannot route an error for a session it does not hold to the session's owner;
    it answers the relaying node, which tells the client."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    conn = PeerConnection(swarm.addresses[0], timeout=10)
    try:
        sid = conn.request("open", {"max_length": 8, "layers": [0, 2]}).fields["session"]
        rid = conn.send("step", {"session": sid, "pos": 0, "reply": 7777, "next": [[swarm.addresses[1], "nope"]]},
                        [torch.randn(1, 1, 64)])
        with pytest.raises(PeerError) as e:
            conn.recv(7777)
        assert e.value.code == "relay_failed" and "unknown_session" in e.value.message and rid != 7777
        # The step ran on the first node (it relayed it): a rewind lets the client redo it.
        redo = conn.request("step", {"session": sid, "pos": 0, "rewind": True}, [torch.randn(1, 1, 64)])
        assert redo.type == "result"
    finally:
        conn.close()


# ----- the node's side, in process ---------------------------------------------------------
KNOWN = "tcp://127.0.0.1:5999#" + "ab" * 32


@pytest.fixture
def handler(tiny_model_dir):
    h = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "t")
    h.can_relay = lambda contact: contact == KNOWN
    return h


_ids = iter(range(1000, 10**6))


def ask(h: RequestHandler, peer: bytes, msg_type: str, fields: dict, tensors=()):
    [(to, frames)] = h.handle_batch([(peer, encode(msg_type, next(_ids), fields, tensors))])
    return to, decode(frames)


def x(T: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, T, 64, generator=torch.Generator().manual_seed(seed))


def test_relay_fields_are_checked(handler):
    _, opened = ask(handler, b"owner", "open", {"max_length": 16})
    sid = opened.fields["session"]
    step = {"session": sid, "pos": 0}
    cases = [  # fields, tensors, code, whether the error reaches the owner
        ({"next": [[KNOWN, "s"]]}, [x()], "malformed", False),                 # next without reply
        ({"reply": 5, "next": "tcp://x"}, [x()], "malformed", False),          # not even a list: not decoded
        ({"reply": 5, "hop": 70}, [x()], "malformed", True),
        ({"reply": 5, "next": [[KNOWN]]}, [x()], "malformed", True),
        ({"reply": 5, "busy": ["slow"]}, [x()], "malformed", True),
        ({"reply": 5, "next": [["tcp://10.0.0.1:1#" + "cd" * 32, "s"]]}, [x()], "not_served", True),  # a stranger
        ({"reply": 5, "hop": 2}, [x()], "bad_tensor", True),                   # hop 2 carries 2 tensors
        ({"reply": 5, "hop": 2}, [x(2), x(1)], "bad_shape", True),
        ({"reply": 5, "hop": 2, "trail": False}, [x(), x()], "bad_tensor", True),  # no trail: one tensor
        ({"trail": False}, [x()], "malformed", False),                         # trail without reply
    ]
    for extra, tensors, code, to_owner in cases:
        to, reply = ask(handler, b"relayer", "step", {**step, **extra}, tensors)
        assert reply.type == "error" and reply.fields["code"] == code, (extra, reply.fields)
        # A relayed step of a session held here: its owner hears of the refusal, with its id.
        assert ((to, reply.id) == (b"owner", 5)) is to_owner, extra
    assert handler.sessions.sessions[sid].length == 0


def test_a_relayed_step_goes_on_and_the_last_hop_answers_the_owner(handler):
    sid = ask(handler, b"owner", "open", {"max_length": 16})[1].fields["session"]
    # The first hop: computes, and passes its output on with the rest of the chain.
    chain = {"reply": 42, "next": [[KNOWN, "s2"], [KNOWN, "s3"]]}
    to, out = ask(handler, b"owner", "step", {"session": sid, "pos": 0, **chain}, [x(3)])
    assert isinstance(to, Relay) and (to.contact, to.owner, to.reply) == (KNOWN, b"owner", 42)
    assert out.type == "step" and out.id == to.hop_id
    assert (out.fields["session"], out.fields["pos"], out.fields["hop"], out.fields["reply"]) == ("s2", 0, 1, 42)
    assert out.fields["next"] == [[KNOWN, "s3"]] and len(out.fields["busy"]) == 1 and len(out.tensors) == 1
    # The last hop (hop 2: the outputs of hops 0 and 1 come with it): everything to the owner.
    sid2 = ask(handler, b"owner", "open", {"max_length": 16})[1].fields["session"]
    trail = [x(1, 1), x(1, 2)]
    to, res = ask(handler, b"node-before", "step", {"session": sid2, "pos": 0, "reply": 43, "hop": 2,
                                                    "busy": [10, 20]}, trail)
    assert (to, res.type, res.id) == (b"owner", "result", 43)
    assert len(res.tensors) == 3 and torch.equal(res.tensors[0], trail[0]) and torch.equal(res.tensors[1], trail[1])
    assert res.fields["busy"][:2] == [10, 20] and len(res.fields["busy"]) == 3
    sid3 = ask(handler, b"owner", "open", {"max_length": 16})[1].fields["session"]
    alone = ask(handler, b"owner", "step", {"session": sid3, "pos": 0}, [trail[1]])[1].tensors[0]
    assert torch.equal(res.tensors[2], alone)  # its own output: the blocks on its input, the last one


def test_a_relayed_step_without_trail_passes_on_only_its_own_output(handler):
    """A relayed prefill (`trail` false): every hop gets one tensor, the previous hop's output, and
    sends on one, its own; the last hop's result carries only the chain's output."""
    sid = ask(handler, b"owner", "open", {"max_length": 16})[1].fields["session"]
    chain = {"reply": 44, "next": [[KNOWN, "s2"]], "trail": False}
    to, out = ask(handler, b"owner", "step", {"session": sid, "pos": 0, **chain}, [x(3)])
    assert isinstance(to, Relay) and out.fields["hop"] == 1 and out.fields["trail"] is False
    assert len(out.tensors) == 1
    sid2 = ask(handler, b"owner", "open", {"max_length": 16})[1].fields["session"]
    to, res = ask(handler, b"node-before", "step", {"session": sid2, "pos": 0, "reply": 44, "hop": 2,
                                                    "busy": [10, 20], "trail": False}, [x(3, 1)])
    assert (to, res.type, res.id) == (b"owner", "result", 44)
    assert len(res.tensors) == 1 and res.fields["busy"][:2] == [10, 20] and len(res.fields["busy"]) == 3
    sid3 = ask(handler, b"owner", "open", {"max_length": 16})[1].fields["session"]
    alone = ask(handler, b"owner", "step", {"session": sid3, "pos": 0}, [x(3, 1)])[1].tensors[0]
    assert torch.equal(res.tensors[0], alone)


def test_rewind_redoes_positions_and_only_when_asked(handler):
    sid = ask(handler, b"c", "open", {"max_length": 16})[1].fields["session"]
    ask(handler, b"c", "step", {"session": sid, "pos": 0}, [x(4)])
    first = ask(handler, b"c", "step", {"session": sid, "pos": 4}, [x(1, 5)])[1].tensors[0]
    _, refused = ask(handler, b"c", "step", {"session": sid, "pos": 4}, [x(1, 5)])
    assert refused.fields["code"] == "bad_position"
    _, redo = ask(handler, b"c", "step", {"session": sid, "pos": 4, "rewind": True}, [x(1, 5)])
    assert torch.equal(redo.tensors[0], first) and handler.sessions.sessions[sid].length == 5
    _, back = ask(handler, b"c", "step", {"session": sid, "pos": 2, "rewind": True}, [x(1, 6)])
    assert back.type == "result" and handler.sessions.sessions[sid].length == 3
    _, ahead = ask(handler, b"c", "step", {"session": sid, "pos": 5, "rewind": True}, [x(1)])
    assert ahead.fields["code"] == "bad_position"  # rewind goes back, never forward


def test_head_shards_neither_relay_nor_rewind(tiny_model_dir):
    h = RequestHandler(load_blocks(tiny_model_dir, 0, 2, heads=(0, 2)), read_manifest(tiny_model_dir).model_id, "t")
    h.can_relay = lambda contact: True
    sid = ask(h, b"c", "open", {"max_length": 8})[1].fields["session"]
    step = {"session": sid, "pos": 0, "phase": "attn", "block": 0}
    assert ask(h, b"c", "step", {**step, "reply": 1, "next": [[KNOWN, "s"]]}, [x()])[1].fields["code"] == "malformed"
    assert ask(h, b"c", "step", {**step, "rewind": True}, [x()])[1].fields["code"] == "malformed"


def test_a_relayed_step_with_busy_null_is_served(handler):
    """`busy` may be null on the wire (the schema allows it); it used to be an internal error
    (len(None)), found by the fuzzer once steps reached the relay checks more often."""
    sid = ask(handler, b"owner", "open", {"max_length": 16})[1].fields["session"]
    to, reply = ask(handler, b"owner", "step", {"session": sid, "pos": 0, "reply": 9, "busy": None}, [x()])
    assert (to, reply.type, reply.id) == (b"owner", "result", 9) and len(reply.fields["busy"]) == 1


@pytest.mark.slow
def test_the_stalled_stage_is_the_silent_one_even_behind_a_slow_one(tiny_model_dir, cluster_factory):
    """After a relayed step times out, every stage is asked for `info` at once: a first hop that
    answers late (a busy machine) is not taken for the frozen hop behind it, and when all answer
    nobody is blamed."""
    import threading

    from nanoswarm.client.relay import STALL_SECONDS, stalled_stage
    from nanoswarm.client.stages import RemoteLayerStage

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 2)), NodeSpec((2, 4))])
    model_id = read_manifest(tiny_model_dir).model_id
    stages = [RemoteLayerStage(PeerConnection(a, timeout=10.0), *span, model_id)
              for a, span in zip(swarm.addresses, [(0, 1), (1, 2), (2, 4)])]
    try:
        for stage in stages:  # connected and warm: the first probe is not a handshake
            stage.conn.request("info")
        assert stalled_stage(stages, 20.0) is None
        swarm.kill(1, signal.SIGSTOP)  # frozen for good
        swarm.kill(0, signal.SIGSTOP)  # slow: answers after 1.5 s
        thaw = threading.Timer(1.5 * STALL_SECONDS, swarm.kill, (0, signal.SIGCONT))
        thaw.start()
        t0 = time.monotonic()
        stage, error = stalled_stage(stages, 20.0)
        assert stage is stages[1] and error.code == "timeout" and error.address == swarm.addresses[1]
        assert time.monotonic() - t0 < 15  # three times node 0's answer (~4.5 s), not the 20 s timeout
        thaw.join()
        swarm.kill(1, signal.SIGCONT)
        swarm.kill(2, signal.SIGSTOP)
        stage, error = stalled_stage(stages, 20.0)
        assert stage is stages[2]
    finally:
        for i in range(3):
            swarm.kill(i, signal.SIGCONT)
        for stage in stages:
            stage.conn.close()


def test_a_next_hop_flooding_its_link_is_read_a_batch_at_a_time():
    """A next hop (anyone who signs a record) that sends on its link without end must not hold the
    node's loop: each turn reads at most MAX_READS messages, then the loop serves its own socket."""
    import zmq

    from nanoswarm.node.relay import MAX_READS, RelayLinks

    ctx = zmq.Context.instance()
    hop = ctx.socket(zmq.ROUTER)
    port = hop.bind_to_random_port("tcp://127.0.0.1")
    links = RelayLinks(ctx, None)
    try:
        assert links.send(Relay(f"tcp://127.0.0.1:{port}", b"owner", 1, 2), [encode("step", 2, {})[0]]) is None
        assert hop.poll(5000)
        who = hop.recv_multipart()[0]
        for i in range(3 * MAX_READS):
            hop.send_multipart([who, encode("error", 10_000 + i, {"code": "x", "message": "y"})[0]])
        (link,) = links._links.values()
        deadline = time.monotonic() + 5
        while link.get(zmq.EVENTS) & zmq.POLLIN == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # all of them queued on the link
        assert links.bounced(link) == []  # replies to nothing it sent: dropped
        assert link.get(zmq.EVENTS) & zmq.POLLIN  # the rest waits for the next turn
        for _ in range(2):
            links.bounced(link)
        assert not link.get(zmq.EVENTS) & zmq.POLLIN
    finally:
        links.close()
        hop.close(linger=0)
