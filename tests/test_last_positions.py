"""A step's `last` (protocol/messages.py): the reply to the client carries only the output's last
positions, what a client sampling the next token needs, while every stage stores them all. Node
checks on the handler; the session's use of it over real node processes and sockets, relayed and
stage by stage, exact against the single-process model and with fewer bytes back."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
from test_relay import KNOWN, ask, x

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.relay import Chain
from nanoswarm.client.session import TRAIL_MAX_POSITIONS
from nanoswarm.client.swarm import SwarmOptions
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.node.handler import RequestHandler
from nanoswarm.node.relay import Relay
from nanoswarm.protocol.messages import decode, encode
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks, load_model


@pytest.fixture
def handler(tiny_model_dir):
    h = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "t")
    h.can_relay = lambda contact: contact == KNOWN
    return h


def _open(h: RequestHandler) -> str:
    _, opened = ask(h, b"owner", "open", {"max_length": 16})
    assert opened.fields["last_positions"] is True
    return opened.fields["session"]


def test_a_step_answers_its_last_positions_and_stores_them_all(handler):
    whole, cut = _open(handler), _open(handler)
    want = ask(handler, b"owner", "step", {"session": whole, "pos": 0}, [x(5)])[1].tensors[0]
    _, got = ask(handler, b"owner", "step", {"session": cut, "pos": 0, "last": 2}, [x(5)])
    assert got.type == "result" and got.specs[0][1] == (1, 2, 64)
    assert torch.equal(got.tensors[0], want[:, -2:])
    assert handler.sessions.sessions[cut].length == 5
    # The next position attends to all five: the same as the session answered whole.
    a = ask(handler, b"owner", "step", {"session": whole, "pos": 5}, [x(1, 7)])[1].tensors[0]
    b = ask(handler, b"owner", "step", {"session": cut, "pos": 5}, [x(1, 7)])[1].tensors[0]
    assert torch.equal(a, b)
    _, all_of_it = ask(handler, b"owner", "step", {"session": cut, "pos": 6, "last": 3}, [x(3, 8)])
    assert all_of_it.specs[0][1] == (1, 3, 64)  # `last` equal to the positions: the whole output


def test_a_relayed_step_passes_last_on_and_the_last_hop_answers_only_those(handler):
    sid = _open(handler)
    chain = {"reply": 45, "next": [[KNOWN, "s2"]], "trail": False, "last": 1}
    to, out = ask(handler, b"owner", "step", {"session": sid, "pos": 0, **chain}, [x(4)])
    assert isinstance(to, Relay) and out.fields["last"] == 1 and out.specs[0][1] == (1, 4, 64)
    sid2, sid3 = _open(handler), _open(handler)
    to, res = ask(handler, b"node-before", "step", {"session": sid2, "pos": 0, "reply": 45, "hop": 1,
                                                    "trail": False, "last": 1}, [x(4, 1)])
    assert (to, res.type) == (b"owner", "result") and res.specs[0][1] == (1, 1, 64)
    alone = ask(handler, b"owner", "step", {"session": sid3, "pos": 0}, [x(4, 1)])[1].tensors[0]
    assert torch.equal(res.tensors[0], alone[:, -1:])


@pytest.mark.parametrize("last", [0, -1, 5, True], ids=["zero", "negative", "more than the step", "bool"])
def test_a_wrong_last_is_refused_and_the_session_left_as_it_was(handler, last):
    sid = _open(handler)
    _, reply = ask(handler, b"owner", "step", {"session": sid, "pos": 0, "last": last}, [x(4)])
    assert reply.type == "error" and reply.fields["code"] == "malformed"
    assert handler.sessions.sessions[sid].length == 0


def test_a_head_shards_phase_steps_refuse_last(tiny_model_dir):
    """A phase's partial is every row's (the block's next phase needs them); only an all-reduce
    step's output, the residual itself, may come back cut (below)."""
    h = RequestHandler(load_blocks(tiny_model_dir, 0, 2, heads=(0, 2)), read_manifest(tiny_model_dir).model_id, "t")
    _, opened = ask(h, b"c", "open", {"max_length": 8})
    assert opened.fields["last_positions"] is True
    step = {"session": opened.fields["session"], "pos": 0, "phase": "attn", "block": 0, "last": 1}
    assert ask(h, b"c", "step", step, [x(2)])[1].fields["code"] == "malformed"
    assert h.sessions.sessions[opened.fields["session"]].length == 0


def test_a_chain_with_a_node_that_does_not_say_last_positions_is_not_asked_for_them():
    now = SimpleNamespace(opened={"last_positions": True})
    earlier = SimpleNamespace(opened={})  # a node of an earlier version would answer every position
    assert Chain.keeps(SimpleNamespace(stages=[now, now]))
    assert not Chain.keeps(SimpleNamespace(stages=[now, earlier]))


P = TRAIL_MAX_POSITIONS + 8  # a prompt relayed without trail


def _rows(client, hidden: torch.Tensor) -> torch.Tensor:
    """Every row's logits (ClientModel.logits takes the last row's only)."""
    with torch.inference_mode():
        return client.head(hidden)[0]


@pytest.mark.parametrize("relay,limit,prompt,last", [
    (True, [], P, 1), (True, [], P, 3), (True, [], 20, 1), (False, [], P, 1),
    (False, ["--max-tokens-per-step", "16"], P, 20)],
    ids=["relayed", "relayed, 3 rows", "relayed with the trail", "stage by stage", "in pieces, 20 rows"])
def test_a_prompts_last_positions_alone_come_back_exact_and_the_session_goes_on(tiny_model_dir, cluster_factory,
                                                                                relay, limit, prompt, last):
    """Through real nodes: the rows that come back equal the single-process model's last ones;
    the route's last node sends at least (prompt - last) rows' bytes fewer than for the whole
    output (a node taking 16 positions a step answers its pieces' parts of the tail; a relayed
    step with its trail still brings every earlier hop's output whole, the failover history);
    and decode steps after it stay exact (every stage stored every position)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4), args=limit)])
    ids = torch.randint(0, 50257, (prompt + 4,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0]
    received = []
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(relay=relay)) as model:
        client = model.client
        for ask_for in (None, last):
            with model.session(prompt + 4) as session:
                end = model.swarm.connection(session.stages[-1].peers[0])
                before = end.bytes_received
                hidden = session.step(client.embed(ids[:prompt].tolist(), 0), last=ask_for)
                received.append(end.bytes_received - before)
                assert hidden.shape[1] == (ask_for or prompt)
                assert (_rows(client, hidden) - want[prompt - hidden.shape[1]:prompt]).abs().max().item() <= 1e-5
                got = [client.logits(session.step(client.embed([int(ids[t])], t))) for t in range(prompt, prompt + 4)]
                assert (torch.stack(got) - want[prompt:]).abs().max().item() <= 1e-5
    width = read_manifest(tiny_model_dir).config.n_embd
    pieces = 2 if limit else 0  # a row at least from each piece before the tail's
    assert received[0] - received[1] >= (prompt - last - pieces) * width * 4  # the rest stayed on the node


def test_a_step_halved_after_too_large_answers_each_half_its_part_of_the_tail(tiny_model_dir, cluster_factory):
    """A node that takes fewer positions than it said (here: the client forgot its stated limit)
    refuses `too_large`; the halves each ask for their part of the tail, and the rows are exact."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--max-tokens-per-step", "7"])])
    ids = torch.randint(0, 50257, (P,), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0]
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model, model.session(P) as session:
        stage = session.stages[0]
        stage.opened = {k: v for k, v in stage.opened.items() if k != "max_tokens_per_step"}
        hidden = session.step(model.client.embed(ids.tolist(), 0), last=9)
        assert hidden.shape[1] == 9
        assert (_rows(model.client, hidden) - want[P - 9:]).abs().max().item() <= 1e-5


def test_a_last_node_killed_between_prompts_is_replaced_and_the_next_rows_are_exact(tiny_model_dir,
                                                                                     cluster_factory):
    """Two long steps with `last`, relayed; the last node dies between them: the replacement is
    rebuilt from what the stage before recomputes (the relayed step kept no trail), and the
    second step's rows equal the single-process model's."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4)), NodeSpec((3, 4))])
    ids = torch.randint(0, 50257, (2 * P,), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0]
    options = SwarmOptions(timeout=5.0, ban_seconds=60)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=options) as model, \
            model.session(2 * P) as session:
        client = model.client
        first = session.step(client.embed(ids[:P].tolist(), 0), last=1)
        assert (_rows(client, first) - want[P - 1:P]).abs().max().item() <= 1e-5
        dead = session.stages[-1].peers[0]
        swarm.kill(swarm.addresses.index(dead), signal.SIGKILL)
        second = session.step(client.embed(ids[P:].tolist(), P), last=3)
        assert session.failovers == 1 and session.stages[-1].peers[0] != dead
        assert (_rows(client, second) - want[2 * P - 3:]).abs().max().item() <= 1e-5


def test_an_overflow_in_an_early_row_is_refused_though_only_the_last_was_asked_for(handler):
    """The whole output is checked before it is cut (review152): a row that leaves float16's
    range is refused `bad_value` with the session untouched, whichever rows were asked for."""
    sid = _open(handler)
    h = x(5)
    h[0, 0] *= 1e6
    _, reply = ask(handler, b"owner", "step", {"session": sid, "pos": 0, "wire": "float16", "last": 1}, [h])
    assert reply.type == "error" and reply.fields["code"] == "bad_value"
    assert handler.sessions.sessions[sid].length == 0


def test_a_relayed_step_with_its_trail_cuts_only_the_last_hops_own_output(handler):
    sid = _open(handler)
    to, res = ask(handler, b"node-before", "step", {"session": sid, "pos": 0, "reply": 46, "hop": 1, "last": 1},
                  [x(4, 1)])
    assert (to, res.type) == (b"owner", "result") and [s for _, s in res.specs] == [(1, 4, 64), (1, 1, 64)]
    assert torch.equal(res.tensors[0], x(4, 1))  # the hop before's output, passed on whole


def test_a_session_refuses_a_last_that_is_not_a_positive_int():
    from nanoswarm.client.session import InferenceSession

    session = InferenceSession([], max_length=8)
    for bad in (0, -2, 1.0, True):
        with pytest.raises(ValueError, match="last"):
            session.step(torch.zeros(1, 2, 4), last=bad)


@pytest.mark.parametrize("all_reduce", [True, False], ids=["all-reduce", "fan-out"])
def test_a_head_group_as_the_last_stage_answers_a_prompts_last_position(tiny_model_dir, cluster_factory,
                                                                        all_reduce):
    """All-reduce: every member answers the prompt's last row only (each sends ~1/P of the
    bytes), and they agree; the fan-out's partials are every row's, and the session cuts. Exact
    against the single-process model either way, and so are the decode steps after."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4), (0, 2)), NodeSpec((2, 4), (2, 4))])
    ids = torch.randint(0, 50257, (P + 3,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0]
    received = []
    options = SwarmOptions(all_reduce=all_reduce)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=options) as model:
        client = model.client
        for last in (None, 1):
            with model.session(P + 3) as session:
                group = session.stages[-1]
                assert group.all_reduce is all_reduce and len(group.peers) == 2
                members = [model.swarm.connection(p) for p in group.peers]
                before = [c.bytes_received for c in members]
                hidden = session.step(client.embed(ids[:P].tolist(), 0), last=last)
                received.append([c.bytes_received - b for c, b in zip(members, before)])
                assert hidden.shape[1] == (P if last is None else 1)
                got = [client.logits(hidden)]
                for t in range(P, P + 3):
                    got.append(client.logits(session.step(client.embed([int(ids[t])], t))))
                assert (torch.stack(got) - want[P - 1:]).abs().max().item() <= 1e-5
    row = read_manifest(tiny_model_dir).config.n_embd * 4
    for whole, cut in zip(*received):
        assert (whole - cut >= (P - 1) * row) is all_reduce


@pytest.mark.parametrize("last", [0, 3, True], ids=["zero", "more than the step", "bool"])
def test_an_all_reduce_step_refuses_a_wrong_last_with_the_session_untouched(tiny_model_dir, last):
    from test_all_reduce import _handlers, _member_step

    [a, _], model_id = _handlers(tiny_model_dir)
    a.can_relay = lambda contact: True
    sid = decode(a.handle(b"owner", encode("open", 1, {"model_id": model_id, "max_length": 8}))).fields["session"]
    [(to, frames)] = _member_step(a, sid, x(2), last=last)
    assert to == b"owner" and decode(frames).fields["code"] == "malformed"
    assert a.sessions.sessions[sid].length == 0 and not a.groups.steps


@pytest.mark.parametrize("case", ["pieces, last 3", "pieces, last 6", "fall-back to the fan-out", "an older member"])
def test_a_head_groups_rows_are_exact_in_every_way_it_is_asked_for_the_tail(tiny_model_dir, case):
    """In-process members (review153): a prompt of 10 in pieces of 4 asks each piece for its part
    of the tail (fewer rows come back); members that cannot reach each other fall back to the
    fan-out at position 0 (every row comes back); a member that does not say `last_positions`
    is not asked. The rows the session keeps equal the whole blocks' either way."""
    from test_all_reduce import _handlers
    from test_heads import in_process_nodes

    from nanoswarm.client.head_group import HeadGroupStage
    from nanoswarm.client.transport import PeerConnection
    from nanoswarm.node.sessions import NodeLimits

    last = 6 if case == "pieces, last 6" else 3
    handlers, model_id = _handlers(tiny_model_dir, NodeLimits(max_tokens_per_step=4) if "pieces" in case else None)
    for h in handlers:
        h.can_relay = lambda contact, ok=(case != "fall-back to the fan-out"): ok
    hidden = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(12))
    blocks = load_blocks(tiny_model_dir, 0, 4)
    with torch.inference_mode():
        want = blocks(hidden, [blocks.new_cache(16)])
    with in_process_nodes(handlers) as conns:
        links = [PeerConnection(c.address, 10.0) for c in conns]
        try:
            stage = HeadGroupStage([(links[0], (0, 2)), (links[1], (2, 4))], 0, 4, model_id, timeout=20.0,
                                   all_reduce=True)
            stage.open(16)
            if case == "an older member":
                del stage.limits[1]["last_positions"]
            got = stage.step(hidden, 0, last=last)
            assert (got[:, -last:] - want[:, -last:]).abs().max().item() <= 1e-5
            rows = {"pieces, last 3": 1 + 1 + 2, "pieces, last 6": 1 + 4 + 2}.get(case, 10)
            assert got.shape[1] == rows and stage.all_reduce is (case != "fall-back to the fan-out")
            stage.close()
        finally:
            for link in links:
                link.close()


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "stage by stage"])
def test_a_last_node_that_does_not_say_it_takes_last_is_not_asked_for_it(tiny_model_dir, cluster_factory, relay):
    """A route's last node of an earlier version (its `opened` without `last_positions`) would
    ignore `last` and answer every row, which the client would refuse as the wrong shape and
    blame on it: the client does not ask it, takes every row back and keeps the last ones itself.
    (Here the node does take `last`: had it been asked, fewer bytes would come back.) Review224."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    ids = torch.randint(0, 50257, (P,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0]
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(relay=relay)) as model, \
            model.session(P) as session:
        stage = session.stages[-1]
        stage.opened = {k: v for k, v in stage.opened.items() if k != "last_positions"}
        end = model.swarm.connection(stage.peers[0])
        before = end.bytes_received
        hidden = session.step(model.client.embed(ids.tolist(), 0), last=2)
        assert hidden.shape[1] == 2 and (_rows(model.client, hidden) - want[P - 2:]).abs().max().item() <= 1e-5
        width = read_manifest(tiny_model_dir).config.n_embd
        assert end.bytes_received - before >= P * width * 4  # every row came back
        assert session.failovers == 0 and model.swarm.bans == {}


# Review227: a stage or chain whose last node does not say `last_positions` is not asked for the last rows.


def test_a_step_halved_after_too_large_brings_back_only_the_tails_rows(tiny_model_dir, cluster_factory):
    """A step halved after `too_large` (8 pieces of 5 positions here) asks each half for its part
    of the tail only, so the bytes back are those of the last rows and one row a piece, not every
    row: the point of `last`. (Asking the first half for the whole step's `last`, a review227
    mutation of RemoteLayerStage.step, passed the suite: the rows were exact, just all sent.)"""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--max-tokens-per-step", "5"])])
    ids = torch.randint(0, 50257, (P,), generator=torch.Generator().manual_seed(6))
    received = []
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        for ask_for in (None, 9):
            with model.session(P) as session:
                stage = session.stages[0]
                stage.opened = {k: v for k, v in stage.opened.items() if k != "max_tokens_per_step"}
                before = stage.conn.bytes_received
                assert session.step(model.client.embed(ids.tolist(), 0), last=ask_for).shape[1] == (ask_for or P)
                received.append(stage.conn.bytes_received - before)
    width = read_manifest(tiny_model_dir).config.n_embd
    assert received[0] - received[1] >= (P - 9 - 8) * width * 4  # at most a row a piece besides the tail
