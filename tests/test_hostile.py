"""Hostile input against nodes: every refusal is a specific error, nothing kills the node.

The first half drives RequestHandler in process, one limit at a time (fast and exact); the
second sends hostile frames over a raw ZeroMQ DEALER socket to a real node process, and then
checks that the node still serves a session with exact logits. docs/reliability.md has the table.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.peer_errors import PeerError
from nanoswarm.client.transport import PeerConnection
from nanoswarm.keys.contact import split_contact
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.node.handler import RequestHandler
from nanoswarm.node.server import zmq_max_msgsize
from nanoswarm.node.sessions import NodeLimits, _map_size
from nanoswarm.protocol.errors import ProtocolError
from nanoswarm.protocol.messages import PROTOCOL_VERSION, Message, decode, encode
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks, load_model

N_EMBD = 64  # tests/conftest.TINY
KV_PER_POSITION = 2 * 4 * N_EMBD * 4  # k and v, 4 blocks, float32: 512 bytes


def hidden(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, T, N_EMBD, generator=torch.Generator().manual_seed(seed))


# ----- in process: one limit at a time -----------------------------------------------------
class Driver:
    """Requests to a RequestHandler as if from peer `peer`, with fresh ids."""

    def __init__(self, handler: RequestHandler):
        self.h = handler
        self.next_id = 0

    def frames(self, msg_type: str, fields: dict | None = None, tensors=(), req_id: int | None = None) -> list:
        self.next_id += 1
        return encode(msg_type, self.next_id if req_id is None else req_id, fields, tensors)

    def ask(self, msg_type: str, fields: dict | None = None, tensors=(), peer: bytes = b"p") -> Message:
        return decode(self.h.handle(peer, self.frames(msg_type, fields, tensors)))

    def ok(self, msg_type: str, fields: dict | None = None, tensors=()) -> Message:
        msg = self.ask(msg_type, fields, tensors)
        assert msg.type != "error", msg.fields
        return msg

    def code(self, msg_type: str, fields: dict | None = None, tensors=()) -> str:
        msg = self.ask(msg_type, fields, tensors)
        assert msg.type == "error", f"expected an error, got {msg.type}"
        return msg.fields["code"]

    def refuses(self, code: str, part: str, msg_type: str, fields: dict | None = None, tensors=()) -> None:
        """The request gets an error reply with `code` whose message says `part`."""
        msg = self.ask(msg_type, fields, tensors)
        assert msg.type == "error", f"expected an error, got {msg.type}"
        assert (msg.fields["code"], part in msg.fields["message"]) == (code, True), msg.fields

    def open(self, max_length: int = 16) -> str:
        return self.ok("open", {"max_length": max_length}).fields["session"]


@pytest.fixture(scope="module")
def blocks(tiny_model_dir):
    return load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id


def make_driver(blocks, **limits) -> Driver:
    return Driver(RequestHandler(blocks[0], blocks[1], "test", NodeLimits(**limits)))


# Review173 (sixty-second session): a mutation of the code that no test caught before.
def test_a_forward_takes_up_to_the_longest_session_and_no_more(blocks):
    """A stateless forward's positions are bounded as a session's are: the node's
    max_session_length (here 3) passes, one more is too_large."""
    d = make_driver(blocks, max_session_length=3)
    assert d.ok("forward", {}, [hidden(3)]).tensors[0].shape == (1, 3, N_EMBD)
    d.refuses("too_large", "4 positions exceed 3", "forward", {}, [hidden(4)])


# Review203 (sixty-ninth session): mutations that no test caught before.
def test_a_session_is_no_longer_than_the_models_context_and_limits_are_positive(blocks):
    """However long a session the node's limit allows, its model's context (block_size) bounds
    it: `info` says so and a longer `open` is too_large, not a cache the model has no positions
    for. A node limit of zero is refused where it is set."""
    d = make_driver(blocks, max_session_length=10**6)
    context = d.h.config.block_size
    assert d.h.info()["max_length"] == context
    d.refuses("too_large", "max_length", "open", {"max_length": context + 1})
    assert d.open(context)
    for name in ("max_sessions", "max_session_length", "idle_timeout"):
        with pytest.raises(ValueError, match=name):
            NodeLimits(**{name: 0})


def test_seen_ids_keep_each_peers_latest_and_the_most_recently_active_peers(monkeypatch):
    """Duplicate detection keeps the last PER_PEER ids of a peer (a replay of its latest request
    is refused; its oldest ids are the ones forgotten), drops the least recently active peer
    first (a long-lived busy client keeps its ids while peers come and go), and keeps its count
    true through `forget` (a request refused busy) and `forget_peer` (a connection gone): a count
    that drifted up made the node forget every peer early and then fail every request."""
    from nanoswarm.node import seen_ids
    from nanoswarm.node.seen_ids import SeenIds

    monkeypatch.setattr(seen_ids, "PER_PEER", 4)
    monkeypatch.setattr(seen_ids, "MAX_SEEN_PEERS", 3)
    seen = SeenIds()

    def counted() -> bool:
        return seen.total == sum(len(ids) for ids in seen.by_peer.values())

    for req_id in range(1, 7):
        seen.add(b"old", req_id)
    with pytest.raises(ProtocolError, match="already used"):
        seen.add(b"old", 6)  # the latest is remembered
    seen.add(b"old", 1)  # the oldest were forgotten
    seen.add(b"b", 1)
    seen.add(b"c", 1)
    seen.add(b"old", 7)  # active again: the least recently active is now b
    seen.add(b"d", 1)
    assert list(seen.by_peer) == [b"c", b"old", b"d"] and counted()
    seen.forget(b"old", 7)
    seen.forget(b"old", 99)  # never seen: nothing to forget
    assert counted()
    seen.add(b"old", 7)  # sent again after busy
    seen.forget_peer(b"c")
    seen.forget_peer(b"gone")
    assert list(seen.by_peer) == [b"d", b"old"] and counted()
    seen.total += 10**6  # a count that drifted (a bug): the map empties, the count starts again
    seen.add(b"e", 1)
    assert seen.total == 0 and not seen.by_peer
    seen.add(b"e", 1)
    assert list(seen.by_peer) == [b"e"] and counted()


def test_each_limit_refuses_cleanly_and_spares_other_sessions(blocks):
    d = make_driver(blocks, max_sessions=4, kv_budget_bytes=34 * KV_PER_POSITION, max_session_length=32,
                    max_tokens_per_step=4, max_message_bytes=2048)
    keep = d.open(16)  # a session that must survive every refusal below
    d.ok("step", {"session": keep, "pos": 0}, [hidden(2)])
    d.refuses("too_large", "max_length", "open", {"max_length": 33})        # session length
    d.refuses("too_large", "max_length", "open", {"max_length": 0})
    d.refuses("busy", "KV cache budget", "open", {"max_length": 32})        # 16 + 32 > 34
    short = d.open(4)
    d.open(4)
    d.refuses("busy", "KV cache budget", "open", {"max_length": 16})        # 24 + 16 > 34
    d.open(2)
    d.refuses("busy", "maximum of 4 sessions", "open", {"max_length": 1})   # open sessions
    d.refuses("too_large", "tokens in one", "step", {"session": short, "pos": 0}, [hidden(5)])
    d.refuses("too_large", "tokens in one", "forward", {}, [torch.randn(2, 3, N_EMBD)])
    d.refuses("too_large", "the limit is 2048", "step", {"session": short, "pos": 0}, [hidden(8)])
    d.ok("step", {"session": short, "pos": 0}, [hidden(3)])
    d.refuses("too_large", "exceed the session", "step", {"session": short, "pos": 3}, [hidden(2)])
    y = d.ok("step", {"session": keep, "pos": 2}, [hidden(1)]).tensors[0]
    assert y.shape == (1, 1, N_EMBD) and d.h.sessions.sessions[keep].length == 3
    assert d.h.sessions.kv_bytes == 26 * KV_PER_POSITION
    assert d.h.info()["errors"] == {"too_large": 6, "busy": 3}


def test_a_session_larger_than_the_whole_kv_budget_is_too_large_not_busy(blocks):
    """`busy` says "later": a session that needs more than the node's whole KV budget never fits
    (a review), so a client asks another node at once rather than this one again."""
    d = make_driver(blocks, kv_budget_bytes=8 * KV_PER_POSITION, max_session_length=32)
    d.refuses("too_large", "more than this node's whole budget", "open", {"max_length": 16})
    d.open(8)  # the whole budget: fits
    d.refuses("busy", "KV cache budget exhausted", "open", {"max_length": 1})


def test_requests_in_flight_per_peer(blocks):
    d = make_driver(blocks, max_inflight_per_peer=4)
    batch = [(b"greedy", d.frames("info")) for _ in range(6)] + [(b"polite", d.frames("info"))]
    replies = [(peer, decode(frames)) for peer, frames in d.h.handle_batch(batch)]
    codes = [m.fields.get("code", m.type) for peer, m in replies if peer == b"greedy"]
    assert sorted(codes) == ["busy", "busy"] + ["info_reply"] * 4
    assert [m.type for peer, m in replies if peer == b"polite"] == ["info_reply"]
    # Closes do not count: a client closing more sessions at once than the limit had the rest
    # refused, their slots and caches held until the idle timeout.
    sids = [d.open(16) for _ in range(6)]
    closes = [(b"p", d.frames("close", {"session": sid})) for sid in sids]
    assert [decode(frames).type for _, frames in d.h.handle_batch(closes)] == ["closed"] * 6
    assert not d.h.sessions.sessions


def test_request_ids_remembered_stay_bounded_however_many_peers_come(blocks, monkeypatch):
    """Every reconnect is a new ROUTER identity: duplicate detection keeps at most MAX_SEEN_IDS
    ids in all (4,096 peers x 1,024 ids took a node 440 MiB past its memory bound), forgetting
    the least recently active peers, and still refuses the active peer's repeats."""
    from nanoswarm.node import seen_ids

    monkeypatch.setattr(seen_ids, "MAX_SEEN_IDS", 500)
    d = make_driver(blocks)
    for i in range(60):
        for _ in range(20):
            assert decode(d.h.handle(f"peer-{i}".encode(), d.frames("info"))).type == "info_reply"
    assert d.h.seen.total == sum(len(v) for v in d.h.seen.by_peer.values()) <= 500
    assert b"peer-59" in d.h.seen.by_peer and b"peer-0" not in d.h.seen.by_peer
    repeat = d.frames("info", req_id=d.next_id)  # the id peer-59 used last
    assert decode(d.h.handle(b"peer-59", repeat)).fields["code"] == "duplicate_request"


def test_peers_remembered_stay_bounded_too(blocks, monkeypatch):
    """Each peer costs a map of its own: 65,536 peers of one request each took 34 MiB."""
    from nanoswarm.node import seen_ids

    monkeypatch.setattr(seen_ids, "MAX_SEEN_PEERS", 50)
    d = make_driver(blocks)
    for i in range(80):
        assert decode(d.h.handle(f"peer-{i}".encode(), d.frames("info"))).type == "info_reply"
    by_peer = d.h.seen.by_peer
    assert len(by_peer) == 50 and b"peer-79" in by_peer and b"peer-29" not in by_peer


def test_a_flood_of_small_requests_is_held_back_not_buffered(tiny_model_dir, cluster_factory):
    """libzmq queued 10,000 requests a connection before the node read them: 200 connections of
    `info` took a node to 1.8 GB, never given back (a review). Now each connection's queue is
    short and the senders wait; the node stays small and answers a real client meanwhile."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    node = swarm.nodes[0]

    def rss_mb() -> float:  # anonymous: queued messages, not library code paged in
        return _anonymous_rss(node.pid) / 2**20

    before = rss_mb()
    flooders = [PeerConnection(node.address, timeout=10) for _ in range(40)]
    probe = PeerConnection(node.address, timeout=10)
    try:
        payload = encode("info", 1, {})
        for conn in flooders:
            conn.request("info")  # connected: the handshake is done
        for _ in range(6000):  # never read: replies past the node's SNDHWM are dropped
            for conn in flooders:
                try:
                    conn.socket.send_multipart(payload, zmq.NOBLOCK)
                except zmq.Again:  # held back: what this test is about
                    pass
        grown = rss_mb() - before
        assert probe.request("info").type == "info_reply"
        assert grown < 20, f"the node grew {grown:.0f} MB under the flood"  # 47 MB with the old queue
    finally:
        for conn in [*flooders, probe]:
            conn.close()


def test_overloaded_batch_refuses_the_rest_busy_and_leaves_sessions_untouched(blocks):
    """Work queued behind max_batch_seconds of compute is refused at once, not left to time out;
    steps are computed in arrival order and stateless forwards after them, so a forward cannot
    push steps over the limit (another peer's flood of forwards starved them that way)."""
    d = make_driver(blocks, max_batch_seconds=1e-6)
    sessions = [d.open(8) for _ in range(3)]
    batch = [(b"p", d.frames("step", {"session": sid, "pos": 0}, [hidden(2, i)])) for i, sid in enumerate(sessions)]
    batch.append((b"q", d.frames("forward", {}, [hidden(2)])))
    replies = [decode(f) for _, f in d.h.handle_batch(batch)]
    # The first step is the batch's first computation; everything after it is refused.
    assert [m.fields.get("code", m.type) for m in replies] == ["result", "busy", "busy", "busy"]
    assert "overloaded" in replies[1].fields["message"]
    assert [d.h.sessions.sessions[sid].length for sid in sessions] == [2, 0, 0]
    forward_first = [(b"q", d.frames("forward", {}, [hidden(2)]))]
    forward_first += [(b"p", d.frames("step", {"session": sid, "pos": 0}, [hidden(2, i)]))
                      for i, sid in enumerate(sessions[1:])]
    assert [(peer, decode(f).fields.get("code", "result")) for peer, f in d.h.handle_batch(forward_first)] == \
        [(b"p", "result"), (b"p", "busy"), (b"q", "busy")]  # the forward after the steps
    y = d.ok("step", {"session": sessions[2], "pos": 0}, [hidden(2, 2)]).tensors[0]  # the retry is served
    assert y.shape == (1, 2, N_EMBD)


def test_a_flood_of_forwards_from_many_peers_does_not_hold_back_steps(blocks):
    """Many connections, each within --max-inflight, sent stateless forwards together: computed
    as read, they made the steps of a generation wait behind them until its client timed out
    and banned the node (a review). A turn computes its steps first, then at most
    MAX_FORWARDS_PER_BATCH forwards, refusing the rest `busy` at once."""
    from nanoswarm.node.handler import MAX_FORWARDS_PER_BATCH

    d = make_driver(blocks)
    sid = d.open(8)
    batch = [(f"flood-{i}".encode(), d.frames("forward", {}, [hidden(2, i)])) for i in range(6)]
    batch.insert(3, (b"p", d.frames("step", {"session": sid, "pos": 0}, [hidden(2)])))  # the session's owner
    replies = [(peer, decode(f)) for peer, f in d.h.handle_batch(batch)]
    assert [m.type for peer, m in replies if peer == b"p"] == ["result"]
    codes = [m.fields.get("code", m.type) for peer, m in replies if peer != b"p"]
    assert sorted(codes) == ["busy"] * (6 - MAX_FORWARDS_PER_BATCH) + ["result"] * MAX_FORWARDS_PER_BATCH
    order = [peer for peer, m in replies if m.type == "result"]
    assert order[0] == b"p"  # computed before the forwards that came before it
    busy = next(m for peer, m in replies if m.fields.get("code") == "busy")
    assert "stateless forwards" in busy.fields["message"]
    # A forward the node would refuse anyway is refused as such, not `busy` ("again later"), and
    # one refused `busy` may be sent again as it was (its id was kept: `duplicate_request`).
    forwards = [d.frames("forward", {}, [hidden(2, i)]) for i in range(MAX_FORWARDS_PER_BATCH)]
    wrong = d.frames("forward", {}, [torch.randn(1, 2, N_EMBD + 1)])
    last = d.frames("forward", {}, [hidden(2)])
    sent = [*forwards, wrong, last]
    replies = {(m := decode(f)).id: m for _, f in d.h.handle_batch([(b"q", f) for f in sent])}
    codes = [replies[decode(f).id].fields.get("code", replies[decode(f).id].type) for f in sent]
    assert codes == ["result"] * MAX_FORWARDS_PER_BATCH + ["bad_shape", "busy"]
    assert decode(d.h.handle(b"q", last)).type == "result"


def test_a_request_refused_busy_may_be_sent_again_as_it_was(blocks):
    """`busy` says "retry the same request later"; its id was kept before the refusal, so the
    same frames sent again got `duplicate_request` and were never served (a review)."""
    d = make_driver(blocks, max_inflight_per_peer=2)
    batch = [d.frames("info") for _ in range(3)]
    codes = [decode(f).fields.get("code", decode(f).type) for _, f in d.h.handle_batch([(b"p", f) for f in batch])]
    assert codes == ["info_reply", "info_reply", "busy"]
    assert decode(d.h.handle(b"p", batch[2])).type == "info_reply"
    assert decode(d.h.handle(b"p", batch[2])).fields["code"] == "duplicate_request"  # once served, it is kept
    # The other `busy` refusals: an open at the session limit, a step past the batch's time
    d = make_driver(blocks, max_sessions=2, max_batch_seconds=1e-9)
    first, second = d.open(8), d.open(8)
    opening = d.frames("open", {"max_length": 8})
    assert decode(d.h.handle(b"p", opening)).fields["code"] == "busy"
    d.ok("close", {"session": first})
    assert decode(d.h.handle(b"p", opening)).type == "opened"
    steps = [d.frames("step", {"session": second, "pos": 0}, [hidden(2)]),
             d.frames("step", {"session": second, "pos": 2}, [hidden(3)])]  # two groups: the second waits
    replies = [decode(f) for _, f in d.h.handle_batch([(b"p", f) for f in steps])]
    assert [m.fields.get("code", m.type) for m in replies] == ["result", "busy"]
    assert decode(d.h.handle(b"p", steps[1])).type == "result"


def test_specific_codes_for_bad_requests(blocks):
    d = make_driver(blocks)
    sid = d.open(16)
    bad_nan = hidden(1)
    bad_nan[0, 0, 3] = float("nan")
    bad_inf = hidden(1)
    bad_inf[0, 0, 0] = float("-inf")
    assert d.code("step", {"session": sid, "pos": 0}, [bad_nan]) == "bad_value"
    assert d.code("step", {"session": sid, "pos": 0}, [bad_inf]) == "bad_value"
    assert d.code("step", {"session": sid, "pos": -1}, [hidden(1)]) == "bad_position"
    assert d.code("step", {"session": sid, "pos": 3}, [hidden(1)]) == "bad_position"  # out of order
    assert d.code("step", {"session": sid, "pos": 0}, [torch.randn(1, 1, N_EMBD + 1)]) == "bad_shape"
    assert d.code("step", {"session": sid, "pos": 0}, [torch.randn(2, 1, N_EMBD)]) == "bad_shape"
    assert d.code("step", {"session": sid, "pos": 0}, [torch.randn(1, 0, N_EMBD)]) == "bad_shape"  # no position
    assert d.code("step", {"session": sid, "pos": 0}, [hidden(1), hidden(1)]) == "bad_tensor"
    assert d.code("step", {"session": "nope", "pos": 0}, [hidden(1)]) == "unknown_session"
    assert d.code("step", {"session": sid, "pos": "0"}, [hidden(1)]) == "malformed"
    assert d.code("open", {"max_length": 8, "model_id": "f" * 64}) == "wrong_model"
    assert d.code("open", {"max_length": 8, "layers": [0, 5]}) == "malformed"
    # A reply type sent as a request, whatever its fields (they were checked first, and a bare
    # info_reply was `malformed`).
    for reply in ("result", "info_reply", "opened", "closed", "error", "records_reply", "leaving"):
        assert d.code(reply, {}) == "unknown_type", reply
    assert d.code("frobnicate", {}) == "unknown_type"
    frames = d.frames("info")
    assert decode(d.h.handle(b"p", frames)).type == "info_reply"
    assert decode(d.h.handle(b"p", frames)).fields["code"] == "duplicate_request"
    assert decode(d.h.handle(b"other", frames)).type == "info_reply"  # ids are per peer
    d.ok("close", {"session": sid})
    assert d.code("step", {"session": sid, "pos": 0}, [hidden(1)]) == "session_closed"


def test_a_session_that_ended_long_ago_is_still_session_closed(blocks):
    """Why sessions ended is kept for the last 4,096 only; after that a reclaimed session's id got
    `unknown_session`, which a client takes for a fault and bans the node for (a review: a client
    pausing past the idle timeout on a busy node). Ids carry an HMAC under the node's secret, so
    the node knows its own; other ids, and ours altered, are still unknown."""
    d = make_driver(blocks, max_sessions=8)
    old = d.open(4)
    d.ok("close", {"session": old})
    for _ in range(4100):
        d.h.sessions.close(d.h.sessions.open(d.h.blocks, 0, 4, 1, b"p").id)
    assert old not in d.h.sessions._ended
    d.refuses("session_closed", "no longer keeps why", "step", {"session": old, "pos": 0}, [hidden(1)])
    forged = old[:-1] + ("0" if old[-1] != "0" else "1")
    for sid in (forged, old[:24], "zz" * 20, "a" * 40, old.upper(), " ".join([old[:20], old[20:]])):
        assert d.code("step", {"session": sid, "pos": 0}, [hidden(1)]) == "unknown_session", sid
    assert RequestHandler(blocks[0], blocks[1], "t", NodeLimits()).sessions.issued_here(old) is False  # another process


@pytest.mark.parametrize("wire,big", [("float16", 1e30), ("q80", 1e8)])  # q80: up to 65504 x 127
def test_overflowing_values_are_refused_and_the_step_undone(blocks, wire, big):
    d = make_driver(blocks)
    sid = d.open(16)
    x = hidden(2)
    x[0, 1] *= big  # one position past the format's range
    assert d.code("step", {"session": sid, "pos": 0, "wire": wire}, [x]) == "bad_value"
    assert d.h.sessions.sessions[sid].length == 0  # the refused step left no trace
    y = d.ok("step", {"session": sid, "pos": 0}, [hidden(2)]).tensors[0]
    assert bool(torch.isfinite(y).all())
    # A rewinding step cannot be undone (the positions it was to rewrite are gone): its error says
    # what the session holds now, where the docs said "undone" (a review).
    d.ok("step", {"session": sid, "pos": 2}, [hidden(4)])
    d.refuses("bad_value", "the session now holds 1 positions", "step",
              {"session": sid, "pos": 1, "wire": wire, "rewind": True}, [x])
    assert d.h.sessions.sessions[sid].length == 1
    d.ok("step", {"session": sid, "pos": 1}, [hidden(1)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_value_leaves_the_session_as_it_was(blocks, tiny_model_dir, bad):
    """Inputs are checked after the forward pass (node/steps.py `_unsendable`): the refused step
    must still leave no trace, in a whole-block session and in a head shard mid-block, and must not
    touch another session batched with it."""
    d = make_driver(blocks)
    sid, other = d.open(16), d.open(16)
    d.ok("step", {"session": sid, "pos": 0}, [hidden(3)])
    d.ok("step", {"session": other, "pos": 0}, [hidden(3)])
    x = hidden(1, 7)
    x[0, 0, 5] = bad
    batch = [(b"p", d.frames("step", {"session": sid, "pos": 3}, [x])),
             (b"p", d.frames("step", {"session": other, "pos": 3}, [hidden(1, 8)]))]
    replies = [decode(f) for _, f in d.h.handle_batch(batch)]
    assert replies[0].fields["code"] == "bad_value" and "NaN or Inf" in replies[0].fields["message"]
    assert d.h.sessions.sessions[sid].length == 3
    fresh = d.open(16)
    d.ok("step", {"session": fresh, "pos": 0}, [hidden(3)])
    solo = d.ok("step", {"session": fresh, "pos": 3}, [hidden(1, 8)]).tensors[0]
    assert (replies[1].tensors[0] - solo).abs().max() <= 1e-5  # batched with the bad row, unharmed
    y = d.ok("step", {"session": sid, "pos": 3}, [hidden(1, 9)]).tensors[0]
    again = d.open(16)
    d.ok("step", {"session": again, "pos": 0}, [hidden(3)])
    assert torch.equal(y, d.ok("step", {"session": again, "pos": 3}, [hidden(1, 9)]).tensors[0])

    heads = make_driver((load_blocks(tiny_model_dir, 0, 2, heads=(0, 2)), blocks[1]))
    hs = heads.open(8)
    step = {"session": hs, "pos": 0, "phase": "attn", "block": 0}
    heads.ok("step", step, [hidden(1)])
    heads.ok("step", {**step, "phase": "mlp"}, [hidden(1)])
    assert heads.code("step", {**step, "block": 1}, [x]) == "bad_value"
    session = heads.h.sessions.sessions[hs]
    assert (session.length, session.next_block) == (0, 1)  # still expecting block 1's attention
    heads.ok("step", {**step, "block": 1}, [hidden(1)])
    assert (session.length, session.next_block) == (1, 0)


def test_only_the_owner_steps_or_closes_a_session_and_relayed_steps_cannot_rewind(blocks):
    """Session ids travel in relayed steps (`next`), so the hops before a node know them: another
    peer's plain step or close looks like one for an unknown id, and a relayed step (which may
    come from any earlier hop) may append the next position but never rewrite held ones."""
    d = make_driver(blocks)
    sid = d.open(16)
    first = d.ok("step", {"session": sid, "pos": 0}, [hidden(3)]).tensors[0]
    stranger = decode(d.h.handle(b"stranger", d.frames("step", {"session": sid, "pos": 3}, [hidden(1)])))
    assert (stranger.type, stranger.fields.get("code")) == ("error", "unknown_session")
    decode(d.h.handle(b"stranger", d.frames("step", {"session": sid, "pos": 0, "rewind": True}, [hidden(3, 9)])))
    assert decode(d.h.handle(b"stranger", d.frames("close", {"session": sid}))).type == "closed"
    assert sid in d.h.sessions.sessions and d.h.sessions.sessions[sid].length == 3
    relayed = decode(d.h.handle(b"stranger", d.frames("step", {"session": sid, "pos": 0, "rewind": True,
                                                               "reply": 5}, [hidden(3, 9)])))
    assert relayed.fields["code"] == "malformed" and "cannot rewind" in relayed.fields["message"]
    # The owner's session is as it was: redoing position 0 gives the first result again.
    again = d.ok("step", {"session": sid, "pos": 0, "rewind": True}, [hidden(3)]).tensors[0]
    assert torch.equal(again, first)
    assert d.ask("close", {"session": sid}).type == "closed" and sid not in d.h.sessions.sessions


def test_pipelined_steps_of_one_session_in_one_batch(blocks):
    d = make_driver(blocks)
    a, b = d.open(8), d.open(8)
    x = [hidden(1, s) for s in range(3)]
    for t in range(3):
        d.ok("step", {"session": b, "pos": t}, [x[t]])
    batch = [(b"p", d.frames("step", {"session": a, "pos": t}, [x[t]])) for t in range(3)]
    batch.append((b"p", d.frames("close", {"session": a})))
    replies = [decode(f) for _, f in d.h.handle_batch(batch)]
    assert [m.type for m in replies] == ["result", "result", "result", "closed"]
    # Same positions as the session stepped one request at a time: same cache, same outputs.
    c = d.open(8)
    for t in range(3):
        want = d.ok("step", {"session": c, "pos": t}, [x[t]]).tensors[0]
        assert torch.equal(want, replies[t].tensors[0])


def test_device_memory_running_out_is_busy_and_leaves_the_session_as_it_was(blocks, monkeypatch):
    """A GPU whose memory other work took refuses `busy` (the client asks again later) wherever
    the allocation fails: in a step's compute, in a forward's, or copying a step's input to the
    device; none of them bans a healthy node as `internal` would. Simulated on the CPU."""
    d = make_driver(blocks)
    sid, x = d.open(8), [hidden(1, s) for s in range(2)]
    d.ok("step", {"session": sid, "pos": 0}, [x[0]])

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with monkeypatch.context() as m:
        m.setattr(blocks[0], "forward", out_of_memory)
        d.refuses("busy", "memory", "step", {"session": sid, "pos": 1}, [x[1]])
        d.refuses("busy", "memory", "forward", {}, [x[1]])
    with monkeypatch.context() as m:
        m.setattr(d.h.steps.checks, "hidden", out_of_memory)
        d.refuses("busy", "memory", "step", {"session": sid, "pos": 1}, [x[1]])
    assert d.h.sessions.sessions[sid].length == 1
    got = d.ok("step", {"session": sid, "pos": 1}, [x[1]]).tensors[0]
    fresh = d.open(8)
    d.ok("step", {"session": fresh, "pos": 0}, [x[0]])
    assert torch.equal(got, d.ok("step", {"session": fresh, "pos": 1}, [x[1]]).tensors[0])


def test_idle_sessions_expire_in_process(blocks):
    d = make_driver(blocks, idle_timeout=10.0)
    clock = [0.0]
    d.h.sessions.clock = lambda: clock[0]
    idle, busy = d.open(8), d.open(8)
    clock[0] = 6.0
    d.ok("step", {"session": busy, "pos": 0}, [hidden(1)])
    clock[0] = 12.0
    assert d.h.expire_idle() == [idle]
    assert d.code("step", {"session": idle, "pos": 0}, [hidden(1)]) == "session_closed"
    assert d.h.sessions.kv_bytes == 8 * KV_PER_POSITION
    clock[0] = 17.0
    assert d.h.expire_idle() == [busy] and d.h.sessions.kv_bytes == 0


def test_a_closed_sessions_cache_memory_serves_the_next_session_exactly(blocks):
    """A closed session's KV-cache maps wait in the pool and serve the next session; what they
    held is never read: the next session computes exactly what it computes in fresh memory."""
    d, fresh = make_driver(blocks), make_driver(blocks)
    first = d.open(16)
    d.ok("step", {"session": first, "pos": 0}, [hidden(12, seed=1)])  # more positions than below
    held = d.h.sessions.sessions[first].maps  # held, so their ids cannot be reused
    d.ok("close", {"session": first})
    assert d.h.sessions.kv_bytes == 0 and d.h.sessions.pool.nbytes > 0
    second, ref = d.open(16), fresh.open(16)
    assert sorted(map(id, d.h.sessions.sessions[second].maps)) == sorted(map(id, held))
    assert d.h.sessions.pool.nbytes == 0
    for pos, T in ((0, 3), (3, 1), (4, 2)):
        x = hidden(T, seed=pos + 2)
        y = d.ok("step", {"session": second, "pos": pos}, [x]).tensors[0]
        assert torch.equal(y, fresh.ok("step", {"session": ref, "pos": pos}, [x]).tensors[0])
    assert d.h.info()["kv_pool_bytes"] == 0


def _reused_cache(d: Driver, head_blocks: int = 0) -> str:
    """A session on memory an earlier session filled with large values (from the pool)."""
    earlier, x = d.open(16), hidden(8, seed=99) * 50
    for block in range(head_blocks):  # a head shard stores positions block by block
        d.ok("step", {"session": earlier, "pos": 0, "phase": "attn", "block": block}, [x])
    if not head_blocks:
        d.ok("step", {"session": earlier, "pos": 0}, [x])
    d.ok("close", {"session": earlier})
    return d.open(16)


def test_a_half_stored_position_refuses_a_plain_step(blocks):
    """After attention of block 0 only, blocks 1-3 do not hold position 0: a plain step there
    would count it as held by all, and a later step would read what the pool's earlier session
    left in those rows."""
    d = make_driver(blocks)
    sid = _reused_cache(d)
    d.ok("step", {"session": sid, "pos": 0, "phase": "attn", "block": 0}, [hidden(1, 1)])
    for rewind in (False, True):
        d.refuses("bad_position", "half stored", "step", {"session": sid, "pos": 0, "rewind": rewind}, [hidden(1, 2)])
    assert d.h.sessions.sessions[sid].length == 0
    # The session carries on once the position is finished block by block.
    for block in (1, 2, 3):
        d.ok("step", {"session": sid, "pos": 0, "phase": "attn", "block": block}, [hidden(1, 3)])
    assert d.h.sessions.sessions[sid].length == 1
    d.ok("step", {"session": sid, "pos": 1}, [hidden(1, 4)])


def test_head_shard_attention_of_one_position_stores_as_many_tokens_in_every_block(tiny_model_dir):
    """A position stored over a different number of tokens per block would leave rows of some
    blocks unwritten below the session's length."""
    shard = load_blocks(tiny_model_dir, 0, 2, heads=(0, 2)), read_manifest(tiny_model_dir).model_id
    d, fresh = make_driver(shard), make_driver(shard)
    sid, ref = _reused_cache(d, head_blocks=2), fresh.open(16)
    for s, drv in ((sid, d), (ref, fresh)):
        drv.ok("step", {"session": s, "pos": 0, "phase": "attn", "block": 0}, [hidden(1, 1)])
    d.refuses("bad_shape", "stored 1", "step", {"session": sid, "pos": 0, "phase": "attn", "block": 1},
              [hidden(3, 2)])
    # The same step with as many tokens is taken, and reads nothing the earlier session left.
    for s, drv in ((sid, d), (ref, fresh)):
        drv.ok("step", {"session": s, "pos": 0, "phase": "attn", "block": 1}, [hidden(1, 2)])
    assert d.h.sessions.sessions[sid].length == 1
    ys = [drv.ok("step", {"session": s, "pos": 1, "phase": "attn", "block": 0}, [hidden(2, 3)]).tensors[0]
          for s, drv in ((sid, d), (ref, fresh))]
    assert torch.equal(*ys)


# Review203 (sixty-ninth session): a mutation of the code that no test caught before.
def test_a_head_shard_phase_step_past_its_sessions_blocks_is_not_served(tiny_model_dir):
    """A session opened on some of a head shard's blocks takes phase steps of those blocks only:
    one at its end block (half-open, as every range) is not_served, not computed."""
    shard = load_blocks(tiny_model_dir, 0, 4, heads=(0, 2)), read_manifest(tiny_model_dir).model_id
    d = make_driver(shard)
    sid = d.ok("open", {"max_length": 4, "layers": [0, 2], "heads": [0, 2]}).fields["session"]
    d.ok("step", {"session": sid, "pos": 0, "phase": "attn", "block": 0}, [hidden(1)])
    d.ok("step", {"session": sid, "pos": 0, "phase": "mlp", "block": 1}, [hidden(1)])
    for phase in ("attn", "mlp"):
        d.refuses("not_served", "not in this session's 0:2", "step",
                  {"session": sid, "pos": 0, "phase": phase, "block": 2}, [hidden(1)])


def test_the_cache_pool_stays_within_the_kv_budget_and_empties_when_idle(blocks):
    session = 64 * KV_PER_POSITION  # k and v of a 64-position session: one 64 KiB map each
    d = make_driver(blocks, kv_budget_bytes=4 * session, idle_timeout=10.0)
    clock = [0.0]
    store = d.h.sessions
    store.clock = lambda: clock[0]
    a, b, c = d.open(64), d.open(64), d.open(64)
    d.ok("close", {"session": a})
    assert store.pool.nbytes == session  # its bound: a quarter of the budget
    d.ok("close", {"session": b})
    assert store.pool.nbytes == session  # the older maps went back to the OS
    d.open(100)  # another size class: live caches come first, the pool gives way
    assert store.kv_bytes == session + 100 * KV_PER_POSITION
    assert store.pool.nbytes <= 4 * session - store.kv_bytes
    d.ok("close", {"session": c})
    assert store.pool.nbytes == session
    clock[0] = 16.0
    # An expired session's maps are not kept (its client is gone, the node idles); c's, 16 s old, are.
    assert len(d.h.expire_idle()) == 1 and store.pool.nbytes == session
    clock[0] = 31.0
    d.h.expire_idle()
    assert store.pool.nbytes == 0 and store.kv_bytes == 0  # unused for POOL_KEEP_SECONDS


def test_an_open_makes_the_cache_pool_give_way_at_once(blocks):
    """Live caches come first: an open that leaves the KV budget less room than the pool holds
    trims the pool then, not at the next close (pinned after a mutation that did that passed)."""
    session = 64 * KV_PER_POSITION
    d = make_driver(blocks, kv_budget_bytes=4 * session)
    store = d.h.sessions
    a, _, _ = d.open(64), d.open(64), d.open(64)
    d.ok("close", {"session": a})
    assert store.pool.nbytes == session
    d.open(128)  # another size class, the budget's last room
    assert store.kv_bytes == 4 * session and store.pool.nbytes == 0


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="no MADV_DONTNEED on this platform")
def test_a_reused_maps_pages_past_the_new_cache_are_freed(blocks):
    """A session reusing a longer session's map of its size class holds only its own cache's
    pages: the rest go back to the OS (a private map's freed pages read back as zeros; a shared
    one's would keep the old session's data in shared memory)."""
    d = make_driver(blocks)
    first = d.open(128)
    d.ok("step", {"session": first, "pos": 0}, [hidden(128, seed=1)])
    held = d.h.sessions.sessions[first].maps
    d.ok("close", {"session": first})
    second = d.open(113)  # the same size class as 128 positions
    maps = d.h.sessions.sessions[second].maps
    assert sorted(map(id, maps)) == sorted(map(id, held))
    used = -(-113 * KV_PER_POSITION // 2 // mmap.PAGESIZE) * mmap.PAGESIZE  # k or v: half of it
    for m in maps:
        assert len(m) > used and m[used:] == bytes(len(m) - used)


@pytest.mark.parametrize("nbytes", [1, 4095, 65536, 65537, 100_000, 2**20 + 1, 1_474_560, 10**9])
def test_cache_map_size_classes(nbytes):
    size = _map_size(nbytes)
    assert size >= nbytes and size % mmap.PAGESIZE == 0
    assert size <= max(65536, 1.25 * nbytes)


def test_cache_maps_come_in_four_size_classes_a_doubling():
    """Sessions of about the same length share maps (MapPool): four classes a doubling, no more."""
    for doubling in (1 << 17, 1 << 20, 1 << 24):
        assert len({_map_size(n) for n in range(doubling + 1, 2 * doubling + 1, 512)}) == 4


# ----- over a real socket, to a real node process ------------------------------------------
class RawPeer:
    """A bare DEALER socket: sends whatever frames it is given, returns the decoded reply."""

    def __init__(self, contact: str):
        endpoint, key = split_contact(contact)
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if key is not None:  # the node runs CURVE: any client key will do
            public, secret = zmq.curve_keypair()
            self.socket.curve_serverkey, self.socket.curve_publickey, self.socket.curve_secretkey = key, public, secret
        self.socket.connect(endpoint)
        self.next_id = 1000

    def header(self, msg_type: str, req_id: int | None = None, **fields) -> tuple[int, bytes]:
        self.next_id += 1
        req_id = self.next_id if req_id is None else req_id
        return req_id, msgpack.packb({"v": PROTOCOL_VERSION, "id": req_id, "type": msg_type, **fields})

    def send(self, frames: list) -> None:
        self.socket.send_multipart(frames)

    def recv(self, timeout: float = 10.0) -> Message | None:
        if not self.socket.poll(int(timeout * 1000)):
            return None
        return decode(self.socket.recv_multipart())

    def ask(self, msg_type: str, tensors=(), **fields) -> Message:
        self.next_id += 1
        self.send(encode(msg_type, self.next_id, fields, tensors))
        reply = self.recv()
        assert reply is not None and reply.id == self.next_id, reply
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)


def reference_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return load_model(model_dir)(ids[None])[0]


def assert_serves_exact_logits(model_dir, contacts: list[str]) -> None:
    """A whole session through the swarm: prefill 8, then 12 decode steps; logits within 1e-5."""
    ids = torch.randint(0, 50257, (20,), generator=torch.Generator().manual_seed(11))
    model = SwarmModel.connect(model_dir, peers=contacts)
    try:
        session = model.session(len(ids))
        got = [model.client.logits(session.step(model.client.embed(ids[:8].tolist(), 0)))]
        for t in range(8, len(ids)):
            got.append(model.client.logits(session.step(model.client.embed([int(ids[t])], t))))
        session.close()
    finally:
        model.close()
    want = reference_logits(model_dir, ids)[7:]
    assert (torch.stack(got) - want).abs().max().item() <= 1e-5


def test_hostile_frames_to_a_node_process(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=[
        "--max-message-mb", "1", "--max-inflight", "4", "--max-tokens-per-step", "16"])])
    node, contact = swarm.nodes[0], swarm.addresses[0]
    peer, bystander = RawPeer(contact), RawPeer(contact)
    try:
        victim = bystander.ask("open", max_length=16).fields["session"]  # must survive all of this
        bystander.ask("step", [hidden(2)], session=victim, pos=0)
        sid = peer.ask("open", max_length=16).fields["session"]
        closed = peer.ask("open", max_length=16).fields["session"]
        peer.ask("close", session=closed)
        x = hidden(1)
        nan = hidden(1)
        nan[0, 0, 5] = float("nan")
        raw = bytes(memoryview(x.numpy()).cast("B"))
        spec = [["float32", [1, 1, N_EMBD]]]
        cases = {  # name: (frames, expected code, whether the reply can carry our id)
            "not msgpack": ([b"\xc1 this is not msgpack"], "malformed", False),
            "header not a map": ([msgpack.packb([1, 2, 3])], "malformed", False),
            "unknown type": ([peer.header("frobnicate")[1]], "unknown_type", True),
            "bad version": ([msgpack.packb({"v": 99, "id": 5, "type": "info"})], "bad_version", True),
            "wrong tensor shape": ([peer.header("step", session=sid, pos=0,
                                                tensors=[["float32", [1, 1, N_EMBD - 1]]])[1], raw[:-4]],
                                   "bad_shape", True),
            "wrong dtype string": ([peer.header("step", session=sid, pos=0,
                                                tensors=[["int8", [1, 1, N_EMBD]]])[1], raw], "bad_tensor", True),
            "frame count": ([peer.header("step", session=sid, pos=0, tensors=spec)[1]], "bad_tensor", True),
            "short frame": ([peer.header("step", session=sid, pos=0, tensors=spec)[1], raw[:100]],
                            "bad_tensor", True),
            "unknown session": ([peer.header("step", session="no-such", pos=0, tensors=spec)[1], raw],
                                "unknown_session", True),
            "oversized (under MAXMSGSIZE)": ([peer.header("info")[1], b"\0" * (3 * 2**19)], "too_large", True),
            "NaN tensor": ([peer.header("step", session=sid, pos=0, tensors=spec)[1],
                            bytes(memoryview(nan.numpy()).cast("B"))], "bad_value", True),
            "negative position": ([peer.header("step", session=sid, pos=-1, tensors=spec)[1], raw],
                                  "bad_position", True),
            "negative position, rewinding": ([peer.header("step", session=sid, pos=-1, rewind=True,
                                                          tensors=spec)[1], raw], "bad_position", True),
            "more tensors than a step can carry": ([peer.header("step", session=sid, pos=0, tensors=spec * 66)[1],
                                                    *[raw] * 66], "bad_tensor", True),
            "more dimensions than a tensor has": ([peer.header("step", session=sid, pos=0,
                                                               tensors=[["float32", [1, 1, 1, 1, N_EMBD]]])[1], raw],
                                                  "bad_tensor", True),
            "position out of order": ([peer.header("step", session=sid, pos=4, tensors=spec)[1], raw],
                                      "bad_position", True),
            "too many tokens": (encode("step", 9001, {"session": sid, "pos": 0}, [hidden(17)]), "too_large", True),
            "session too long": ([peer.header("open", max_length=10**6)[1]], "too_large", True),
            "step on a closed session": ([peer.header("step", session=closed, pos=0, tensors=spec)[1], raw],
                                         "session_closed", True),
            "id reused": ([peer.header("info", req_id=1001)[1]], "duplicate_request", True),  # ask() used 1001
        }
        said = {"more tensors than a step can carry": "'tensors' must be a list of at most 65",  # not a later check's
                "more dimensions than a tensor has": "bad tensor shape"}
        for name, (frames, code, has_id) in cases.items():
            peer.send(frames)
            reply = peer.recv()
            assert reply is not None, f"{name}: no reply"
            assert reply.type == "error" and reply.fields["code"] == code, f"{name}: {reply.fields}"
            assert said.get(name, "") in reply.fields["message"], f"{name}: {reply.fields}"
            if has_id:
                assert reply.id == msgpack.unpackb(frames[0])["id"], name
        _check_inflight_limit(node.pid, peer)
        _check_over_maxmsgsize(contact)
        assert node.proc.poll() is None, "the node died"
        # Every refusal left the bystander's session intact, and the node serves new sessions exactly.
        assert bystander.ask("step", [hidden(1)], session=victim, pos=2).type == "result"
        assert_serves_exact_logits(tiny_model_dir, swarm.addresses)
        info = peer.ask("info").fields
        assert info["sessions"] == 2 and info["errors"]["bad_tensor"] == 5
    finally:
        peer.close()
        bystander.close()


def _check_inflight_limit(pid: int, peer: RawPeer) -> None:
    """Requests queued while the node is frozen arrive as one batch: past 4 from one peer, `busy`."""
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(12):
            peer.send([peer.header("info")[1]])
        time.sleep(1.5)  # all 12 reach the frozen node's queue, so they arrive as one batch
    finally:
        os.kill(pid, signal.SIGCONT)
    replies = [peer.recv() for _ in range(12)]
    assert all(r is not None for r in replies), "every queued request gets a reply"
    codes = Counter(r.fields.get("code", r.type) for r in replies)
    assert set(codes) == {"info_reply", "busy"} and codes["busy"] >= 1, codes


def _check_over_maxmsgsize(contact: str) -> None:
    """A frame over ZeroMQ's MAXMSGSIZE (2x the message limit): libzmq drops the connection
    without a reply. The client sees `disconnected` (or a timeout), and its socket reconnects."""
    conn = PeerConnection(contact, timeout=5.0)
    try:
        # Sent by hand: our own encoder splits a tensor into frames of PART_BYTES.
        size = zmq_max_msgsize(2**20) // 4 + 1
        header = msgpack.packb({"v": PROTOCOL_VERSION, "id": 7, "type": "info", "tensors": [["float32", [size]]]})
        conn.socket.send_multipart([header, bytes(4 * size)])
        with pytest.raises(PeerError) as e:
            conn.recv(7, "info_reply", timeout=3.0)
        assert e.value.code in ("disconnected", "timeout")
        # Split into parts, the same bytes are a message like any other: refused, as too large
        with pytest.raises(PeerError, match="too_large"):
            conn.request("info", tensors=[torch.zeros(size)], timeout=3.0)
        assert conn.request("info").type == "info_reply"  # the same socket, reconnected
    finally:
        conn.close()


def _anonymous_rss(pid: int) -> int:
    """RssAnon of a process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for pid {pid}")


@pytest.mark.slow
def test_idle_sessions_reclaimed_by_a_node_process(small12_model_dir, cluster_factory):
    """Sessions whose clients vanish without closing are reclaimed after --idle-timeout: the
    node's sessions and KV bytes return to zero and its anonymous resident memory (where KV caches
    live) to about the baseline. (Not all of its resident memory: a node forked from the harness's
    launcher pages in the launcher's library code as it first runs it, ~8 MB more here.)"""
    # 12 s: the first session waits idle while the other 11 open and prefill (0.5-1.3 s each on a
    # busy machine; 5 s was too short when the test processes got a tenth of a core each).
    swarm = cluster_factory(small12_model_dir, [NodeSpec((0, 12), args=["--idle-timeout", "12"])])
    peer = RawPeer(swarm.addresses[0])
    try:
        base = peer.ask("info").fields
        base_anon = _anonymous_rss(swarm.nodes[0].pid)
        assert (base["sessions"], base["kv_bytes"]) == (0, 0)
        x = torch.randn(1, 256, 96)  # every position written: cache pages are taken as they are used
        sessions = []
        for _ in range(12):
            sessions.append(peer.ask("open", max_length=256).fields["session"])
            assert peer.ask("step", [x], session=sessions[-1], pos=0).type == "result"
        held = peer.ask("info").fields
        kv = 12 * 2 * 12 * 256 * 96 * 4  # 12 sessions of 12 blocks, 256 positions, k and v
        assert (held["sessions"], held["kv_bytes"]) == (12, kv)
        assert held["rss_bytes"] - base["rss_bytes"] >= 0.9 * kv
        assert _anonymous_rss(swarm.nodes[0].pid) - base_anon >= 0.9 * kv
        deadline = time.monotonic() + 40
        while (info := peer.ask("info").fields)["sessions"] and time.monotonic() < deadline:
            time.sleep(0.25)
        assert (info["sessions"], info["kv_bytes"]) == (0, 0)
        anon = _anonymous_rss(swarm.nodes[0].pid)
        assert anon - base_anon <= 0.25 * kv, (base_anon, anon)
        assert peer.ask("step", [x[:, :1]], session=sessions[0], pos=256).fields["code"] == "session_closed"
    finally:
        peer.close()


@contextmanager
def _fake_node(answer: Callable[[dict], dict]) -> Iterator[str]:
    """A CURVE ROUTER on 127.0.0.1 playing a node: each request (its header) is answered with the
    fields `answer` gives, in a thread, until the block ends. Yields its contact."""
    from nanoswarm.keys.contact import format_contact

    public, secret = zmq.curve_keypair()
    server = zmq.Context.instance().socket(zmq.ROUTER)
    server.curve_server, server.curve_publickey, server.curve_secretkey = True, public, secret
    server.setsockopt(zmq.LINGER, 0)
    contact = format_contact(f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}", public)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if server.poll(50):
                peer, header, *_ = server.recv_multipart()
                req = msgpack.unpackb(header)
                server.send_multipart([peer, msgpack.packb({"v": PROTOCOL_VERSION, "id": req["id"], **answer(req)})])

    t = threading.Thread(target=serve)
    t.start()
    try:
        yield contact
    finally:
        stop.set()
        t.join()
        server.close()


@pytest.mark.parametrize("claims", [{"throughput": "x"}, {"layers": [3, 9]}, {"layers": ["a", "b"]},
                                    {"heads": [0, 99]}, {"load": float("nan")}])
def test_a_peer_whose_info_makes_no_sense_is_rejected_with_a_reason(claims):
    """A `--peers` contact answering `info` with claims outside the model (or not numbers) is not
    used, and says why; it used to stop the client with a bare Python error."""
    from nanoswarm.client.swarm import Swarm

    swarm = Swarm("m" * 64, 4, 4)
    info = {"type": "info_reply", "peer_id": "p", "model_id": "m" * 64, "layers": [0, 4], **claims}
    try:
        with _fake_node(lambda req: info) as contact:
            swarm.add_addresses([contact], timeout=10.0)
            assert contact not in swarm.peers and contact not in swarm._conns  # (its link closed)
            assert swarm.rejected[contact].startswith("bad_reply: its info is malformed")
    finally:
        swarm.close()


def test_a_reply_of_another_type_is_the_peers_fault_not_a_crash(tiny_model_dir, tmp_path):
    """A peer that answers a request with a well-formed reply of another type (`result` for
    `open` or `records`): its fields are not the ones the caller reads. The client raised a bare
    KeyError, and a node whose bootstrap answered so exited; now the peer is blamed (bad_reply),
    banned like any peer that answers nonsense, and the node starts on its own (a review)."""
    import subprocess

    from conftest import CLI

    from nanoswarm.client.discovery import DiscoveryError
    from nanoswarm.client.route import RouteError

    model_id = read_manifest(tiny_model_dir).model_id
    info = {"type": "info_reply", "peer_id": "p", "model_id": model_id, "layers": [0, 4]}
    # `info` answered as a node would, anything else with an empty `result`
    with _fake_node(lambda req: info if req["type"] == "info" else {"type": "result"}) as contact:
        model = SwarmModel.connect(tiny_model_dir, peers=[contact])
        with model, pytest.raises(RouteError, match="bad_reply: answered 'result' where 'opened' was due"):
            model.generate("x", 2)
        assert model.swarm.bans[contact].strikes == 1
        with pytest.raises(DiscoveryError, match="answered 'result' where 'records_reply' was due"):
            SwarmModel.connect(tiny_model_dir, bootstrap=[contact])
        node = subprocess.Popen([*CLI, "node", str(tiny_model_dir), "--num-blocks", "2", "--bootstrap", contact,
                                 "--listen", "tcp://127.0.0.1:*", "--key-file", str(tmp_path / "node.key")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            assert node.stdout.readline().startswith("listening tcp://127.0.0.1:")
        finally:
            node.terminate()
            _, err = node.communicate(timeout=60)
        assert "answered 'result' where 'records_reply' was due" in err and node.returncode == 0


EVIL = "\x1b[2J\x1b]0;owned\x07\nerror: forged line\u202e"  # clear the screen, set the title, forge a line


@pytest.mark.parametrize("reply", [{"type": "error", "code": "busy" + EVIL, "message": EVIL + "x" * 50_000},
                                   {"type": "info_reply", "peer_id": "p", "model_id": EVIL, "layers": [0, 4]}],
                         ids=["error", "model_id"])
def test_a_peers_words_reach_the_terminal_escaped_and_cut(tiny_model_dir, reply):
    """What a peer says (an error's code and message, its `info`'s model id) is shown to the user
    in the client's error line and failover notices. Raw, a hostile peer's ESC sequences were
    obeyed by the user's terminal (clearing it, forging lines) and a 50 KB message filled it
    (a review): now control characters are shown as escapes and a message is cut at 300 characters."""
    from conftest import run_cli

    with _fake_node(lambda req: reply) as contact:
        done = run_cli("generate", "x", "--model", str(tiny_model_dir), "--peers", contact, "--max-new-tokens", "2",
                       "--timeout", "5")
    assert done.returncode != 0 and "error:" in done.stderr
    assert "\x1b" not in done.stderr and "\u202e" not in done.stderr and "\nerror: forged" not in done.stderr
    assert "\\x1b[2J" in done.stderr and len(done.stderr) < 4000, done.stderr[:4000]


def test_a_peers_error_code_is_cut_shorter_than_its_message():
    """An error's code names a kind of failure (busy, timeout): a peer's code of hundreds of
    characters is cut at 64 (then `...`), its message at 300, both escaped, in the PeerError a
    caller gets and shows."""
    from nanoswarm.client.peer_errors import PeerError
    from nanoswarm.client.transport import PeerConnection

    code = "busy" + "x" * 250
    with _fake_node(lambda req: {"type": "error", "code": code, "message": "m" * 500 + EVIL}) as contact:
        conn = PeerConnection(contact, timeout=5)
        try:
            with pytest.raises(PeerError) as refused:
                conn.request("info")
        finally:
            conn.close()
    assert refused.value.code == code[:64] + "..."
    assert refused.value.message == "m" * 300 + "..."


def test_a_peer_that_answers_with_an_oversized_frame_is_dropped_unread():
    """Clients and gossip links cap the frames they accept (MAXMSGSIZE: client/transport.py,
    node/gossip_links.py), so a peer cannot make them buffer a frame of any size."""
    from nanoswarm.client.transport import MAX_FRAME_BYTES
    from nanoswarm.node.gossip_links import LINK_MAX_FRAME

    server = zmq.Context.instance().socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"

    def answer(size: int) -> None:
        if server.poll(10000):
            peer, header = server.recv_multipart()
            req = msgpack.unpackb(header)
            server.send_multipart([peer, msgpack.packb({"v": PROTOCOL_VERSION, "id": req["id"], "type": "info_reply",
                                                       "peer_id": "p" * size, "model_id": "m", "layers": [0, 1]})])

    try:
        for size, expect in ((100, None), (4 * LINK_MAX_FRAME, "disconnected")):
            conn = PeerConnection(address, 5.0, max_frame=LINK_MAX_FRAME)
            t = threading.Thread(target=answer, args=(size,))
            t.start()
            try:
                if expect is None:
                    assert conn.request("info").fields["peer_id"] == "p" * size
                else:
                    with pytest.raises(PeerError) as info:
                        conn.request("info")
                    assert info.value.code == expect
            finally:
                t.join()
                conn.close()
        conn = PeerConnection(address, 1.0)
        assert conn.socket.getsockopt(zmq.MAXMSGSIZE) == MAX_FRAME_BYTES
        conn.close()
    finally:
        server.close()


def test_peers_that_claim_the_next_routing_ids_do_not_abort_the_node(tiny_model_dir, cluster_factory):
    """libzmq names a connection that does not name itself 0x00 + a counter starting at libc's
    rand(); unseeded, that start was 0x6b8b4567 in every node, and peers holding the next ids
    (ZMQ_ROUTING_ID) made libzmq assert when the counter reached them: SIGABRT, every session
    lost. Nodes seed rand() (node/server.py seed_routing_ids)."""
    import struct

    nodes = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    contact = nodes.addresses[0]
    endpoint, key = split_contact(contact)
    bystander = RawPeer(contact)
    squatters = []
    try:
        assert bystander.ask("info").type == "info_reply"  # takes the first id
        for i in range(64):
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTING_ID, b"\x00" + struct.pack(">I", 0x6B8B4567 + i))
            public, secret = zmq.curve_keypair()
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = key, public, secret
            s.connect(endpoint)
            squatters.append(s)
        time.sleep(1.0)  # their handshakes are done: the node holds those ids
        fresh = RawPeer(contact)  # an ordinary client connecting now draws the next id
        try:
            assert fresh.ask("info").type == "info_reply"
        finally:
            fresh.close()
        assert nodes.nodes[0].proc.poll() is None
    finally:
        for s in squatters:
            s.close(linger=0)
        bystander.close()


def test_a_client_marking_its_own_steps_relayed_still_counts_as_one_peer(tiny_model_dir, cluster_factory):
    """Steps carrying `reply` count per session (a relaying node carries many clients' steps),
    but a session's owner adding `reply` to its own steps got past --max-inflight that way."""
    nodes = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--max-inflight", "4"])])
    peer = RawPeer(nodes.addresses[0])
    try:
        sessions = [peer.ask("open", max_length=8).fields["session"] for _ in range(12)]
        os.kill(nodes.nodes[0].pid, signal.SIGSTOP)
        try:
            for sid in sessions:
                peer.next_id += 1
                peer.send(encode("step", peer.next_id, {"session": sid, "pos": 0, "reply": peer.next_id},
                                 [hidden(1)]))
            time.sleep(1.5)  # all 12 reach the frozen node's queue: mostly one batch
        finally:
            os.kill(nodes.nodes[0].pid, signal.SIGCONT)
        replies = [peer.recv() for _ in range(12)]
        codes = Counter(r.fields.get("code", r.type) for r in replies if r is not None)
        # One batch gives exactly 4 results and 8 busy (test_requests_in_flight_per_peer checks
        # that in process); a starved node may read the 12 in two or three batches, each limited.
        assert codes["result"] + codes["busy"] == 12 and codes["busy"] >= 1 and codes["result"] >= 4, codes
    finally:
        peer.close()


def test_a_step_that_fails_after_computing_leaves_its_session_as_it_was(blocks, monkeypatch):
    """Review78: a GPU's error comes out when the result is copied back (`_timed`), after the
    caches counted the step's positions; the `internal` reply then left the session one step
    ahead of what it holds. Decode steps of two sessions in one batch, as a node batches them."""
    d = make_driver(blocks)
    sessions = [d.open(8), d.open(8)]
    for s in sessions:
        d.ok("step", {"session": s, "pos": 0}, [hidden(3)])
    timed = d.h.steps._timed

    def fails_when_copied_back(fn, tokens):
        timed(fn, tokens)  # the caches have counted the step
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(d.h.steps, "_timed", fails_when_copied_back)
    batch = [(b"p", d.frames("step", {"session": s, "pos": 3}, [hidden(1)])) for s in sessions]
    replies = [decode(frames) for _, frames in d.h.handle_batch(batch)]
    assert [m.fields.get("code") for m in replies] == ["internal", "internal"]
    assert [d.h.sessions.get(s).length for s in sessions] == [3, 3]
    # On a GPU a plain RuntimeError (cuBLAS's, cuDNN's) is asked about too: is the device lost?
    assert d.h.device_failure is None  # (a CPU's errors are the step's own)
    monkeypatch.setattr(d.h.steps, "_cpu", False)
    monkeypatch.setattr(d.h.steps, "device_works", lambda: False)
    assert d.ask("step", {"session": sessions[0], "pos": 3}, [hidden(1)]).fields.get("code") == "internal"
    assert d.h.device_failure == "RuntimeError on cpu: CUDA error: unspecified launch failure"


def test_a_node_whose_device_failed_leaves_with_the_reason(tiny_model_dir, monkeypatch):
    """A lost CUDA context (an illegal memory access, a device-side assert) fails every later
    kernel: the step that met it is answered `internal`, the node tells its clients it leaves and
    stops with the reason, instead of staying on every route and failing every step. Raised here
    by hand: torch.AcceleratorError is what CUDA's errors are."""
    from nanoswarm.node.server import NodeServer

    handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "a",
                             NodeLimits())

    def lost(group):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

    node = NodeServer(handler, "tcp://127.0.0.1:*")
    serving = threading.Thread(target=node.serve_forever, daemon=True)
    serving.start()
    conn = PeerConnection(node.address, timeout=5.0)
    try:
        session = conn.request("open", {"max_length": 8}).fields["session"]
        conn.sessions.add(session)  # as a stage notes it: a notice of leaving names it
        assert conn.request("step", {"session": session, "pos": 0}, [hidden(1)]).type == "result"
        serving.join(0.3)
        assert serving.is_alive() and node.failure is None  # a step that went well: nothing to report
        monkeypatch.setattr(handler.steps, "_compute", lost)
        # An error that ends one call only (a tiny kernel still runs): answered, the node stays
        with pytest.raises(PeerError, match="internal"):
            conn.request("step", {"session": session, "pos": 1}, [hidden(1)])
        serving.join(0.3)
        assert serving.is_alive() and node.failure is None
        monkeypatch.setattr(handler.steps, "device_works", lambda: False)  # the context is lost
        with pytest.raises(PeerError) as e:
            conn.request("step", {"session": session, "pos": 1}, [hidden(1)])
        assert e.value.code == "internal"
        serving.join(10)
        assert not serving.is_alive()
        try:
            conn.take(0, "result")  # reads its notice (and perhaps its close)
        except PeerError:
            pass
        assert conn.leaving  # told, as on SIGTERM
        assert "AcceleratorError" in node.failure and "illegal memory access was encountered" in node.failure
        assert "CUDA kernel errors" not in node.failure  # one line
    finally:
        conn.close()
        node.stop()
        serving.join(5)


def test_a_nodes_timers_run_when_due_between_the_steps_it_serves(tiny_model_dir):
    """The loop keeps its timers' next due time instead of looking at every timer each turn
    (docs/performance.md, fifty-sixth session): each timer still runs when due and not before,
    while steps are served in between and while the node is idle, when it wakes for them only; one
    added by another timer runs too, and one that fails stops no other."""
    from nanoswarm.node.server import NodeServer

    handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "a",
                             NodeLimits())
    node = NodeServer(handler, "tcp://127.0.0.1:*")
    calls: dict[str, list[float]] = {"fast": [], "slow": [], "added": [], "failing": []}

    def slow() -> None:
        calls["slow"].append(time.monotonic())
        if len(calls["slow"]) == 1:
            node.add_timer(0.05, lambda: calls["added"].append(time.monotonic()))

    def failing() -> None:
        calls["failing"].append(time.monotonic())
        raise RuntimeError("a timer's bug")

    turns: list[float] = []  # each turn of the loop asks how long it may sleep
    sleep_ms = node._sleep_ms
    node._sleep_ms = lambda deadline: (turns.append(time.monotonic()), sleep_ms(deadline))[1]
    start = time.monotonic()
    node.add_timer(0.05, lambda: calls["fast"].append(time.monotonic()))
    node.add_timer(0.2, slow)
    node.add_timer(0.1, failing)
    serving = threading.Thread(target=node.serve_forever, daemon=True)
    serving.start()
    conn = PeerConnection(node.address, timeout=5.0)
    try:
        session, pos, steps = None, 0, 0
        while time.monotonic() - start < 1.0:
            if pos % 128 == 0:  # (the tiny model's block_size: a fresh session when one is full)
                session, pos = conn.request("open", {"max_length": 128}).fields["session"], 0
            assert conn.request("step", {"session": session, "pos": pos}, [hidden(1)]).type == "result"
            pos, steps = pos + 1, steps + 1
        idle = time.monotonic()
        time.sleep(0.4)  # nothing to serve: the loop sleeps until the next timer is due, no longer
    finally:
        conn.close()
        node.stop()
        serving.join(5)
    assert steps > 10  # steps were served all along
    assert sum(t > idle for t in calls["fast"]) >= 4
    # ... and it wakes for them only: one turn a timer that is due (~16 in 0.4 s here); a kept due
    # time left in the past made it wake every millisecond (~400)
    assert sum(t > idle + 0.01 for t in turns) < 60
    fast = calls["fast"]
    assert len(fast) >= 5 and fast[0] >= start + 0.05
    # Never before due: each is due `every` after the turn that ran it last began (the timers run
    # before it in that turn may have taken a little of that: hence the margin).
    assert all(b - a >= 0.03 for a, b in zip(fast, fast[1:]))
    assert len(calls["slow"]) >= 2 and all(b - a >= 0.18 for a, b in zip(calls["slow"], calls["slow"][1:]))
    assert len(calls["failing"]) >= 3  # its failure is logged; it and the others go on
    added = calls["added"]
    assert len(added) >= 3 and added[0] >= calls["slow"][0] + 0.05


NAN = float("nan")


@pytest.mark.parametrize("claims", [{"peak_rss_bytes": NAN}, {"peak_rss_bytes": "big"}, {"peak_rss_bytes": -5},
                                    {"layers": [0, "x"]}, {"dtype": ["x"]}, {"kv_budget": "lots"},
                                    {"errors": {EVIL: NAN, "busy": 3, "x\x1b": 1}}],
                         ids=["nan", "str", "negative", "layers", "dtype", "kv_budget", "errors"])
def test_a_nodes_info_after_the_load_is_checked_before_the_report(tiny_model_dir, claims):
    """`load --peers` asks every node's `info` again after the load for its memory and errors.
    Taken as sent, a NaN peak passed the memory check (NaN > bound is False: "OK") and made
    `--json` print NaN; a string or a malformed range stopped the report with a Python error
    (a review). Now a figure that is not a byte count is unknown, and a malformed range keeps
    what the node served before the load."""
    from nanoswarm.client.load import LoadOptions
    from nanoswarm.client.load_nodes import node_reports
    from nanoswarm.client.load_report import LoadReport

    manifest = read_manifest(tiny_model_dir)
    meta, config = (manifest.model_id, manifest.config.n_layer, manifest.config.n_head), manifest.config
    earlier = {"peer_id": "p", "model_id": manifest.model_id, "layers": [0, 4], "kv_budget": 2**20}
    info = {"type": "info_reply", **earlier, "peak_rss_bytes": 3 * 2**20, **claims}
    if "kv_budget" in claims:  # the info before the load said it too
        earlier["kv_budget"] = claims["kv_budget"]
    with _fake_node(lambda req: info) as contact:
        report = LoadReport(1, 1.0)
        opts = LoadOptions(tiny_model_dir, peers=[contact], timeout=5.0)
        report.nodes = node_reports(opts.swarm_options(), opts.timeout, meta, {contact: earlier}, {}, config)
    [node] = report.nodes
    assert node.alive and node.layers == [0, 4] and node.heads is None
    assert node.peak_rss_bytes == (3 * 2**20 if set(claims) <= {"dtype", "kv_budget", "errors"} else None)
    assert node.kv_budget_bytes == (None if "kv_budget" in claims else 2**20)
    assert node.errors == ({"busy": 3, "x\\x1b": 1} if "errors" in claims else {})  # a NaN count is none
    json.dumps(report.to_json(), allow_nan=False)  # no NaN, nothing that is not JSON


def test_a_nodes_counts_after_the_load_are_whole_numbers_and_a_head_shard_weighs_its_share(tiny_model_dir):
    """`load`'s node report after the load: a count of 0 is a count (an error code seen 0 times,
    a peak of 0), True and False are not numbers (a bool is an int in Python: True passed for
    1 byte), and a head shard's weights are its heads' share of its blocks', not the whole."""
    from nanoswarm.client.load import LoadOptions
    from nanoswarm.client.load_nodes import node_reports
    from nanoswarm.node.placement import block_bytes

    manifest = read_manifest(tiny_model_dir)
    meta, config = (manifest.model_id, manifest.config.n_layer, manifest.config.n_head), manifest.config
    assert config.n_head >= 2  # (the premise: a head shard of fewer than all heads)
    earlier = {"peer_id": "p", "model_id": manifest.model_id, "layers": [0, 4], "heads": [0, 1], "kv_budget": 2**20}
    for claims, peak, kv_budget, errors in (
            ({"peak_rss_bytes": 0, "errors": {"busy": 0, "timeout": 2}}, 0, 2**20, {"busy": 0, "timeout": 2}),
            ({"peak_rss_bytes": True, "kv_budget": False, "errors": {"busy": True, "timeout": 2}},
             None, None, {"timeout": 2})):
        info = {"type": "info_reply", **earlier, **claims}
        with _fake_node(lambda req, info=info: info) as contact:
            opts = LoadOptions(tiny_model_dir, peers=[contact], timeout=5.0)
            [node] = node_reports(opts.swarm_options(), opts.timeout, meta, {contact: earlier}, {}, config)
        assert node.alive and node.layers == [0, 4] and node.heads == [0, 1]
        assert node.peak_rss_bytes == peak and node.kv_budget_bytes == kv_budget and node.errors == errors
        assert node.weight_bytes == 4 * block_bytes(config, torch.float32) // config.n_head

def _two_pages(asked: list[dict]) -> Callable[[dict], dict]:
    """A bootstrap's `records` answers: an empty first page that says more follow after "m",
    then the last; `asked` gets every request."""
    def answer(req: dict) -> dict:
        asked.append(req)
        return {"type": "records_reply", "records": [], **({} if req.get("after") else {"after": "m"})}
    return answer


def test_a_node_placing_itself_asks_for_its_models_records(tiny_model_dir):
    """A node started without --layers chose its blocks from the gossip sample a bootstrap sends
    without a model id (at most 128 records of every model: junk or other models crowd it out),
    not from the model's table as docs/discovery.md says (review80)."""
    from nanoswarm.keys.identity import generate_identity
    from nanoswarm.node.daemon import _choose_layers
    from nanoswarm.node.options import NodeOptions

    asked: list[dict] = []
    with _fake_node(_two_pages(asked)) as contact:
        span, n_blocks, _ = _choose_layers(NodeOptions(tiny_model_dir, bootstrap=[contact], num_blocks=2),
                                           generate_identity())
    model_id = read_manifest(tiny_model_dir).model_id
    assert [(req.get("model_id"), req.get("after")) for req in asked] == [(model_id, None), (model_id, "m")]
    assert n_blocks == 2 and span[1] - span[0] == 2


def test_peers_with_a_model_asks_for_that_models_records(tiny_model_dir):
    """Without a model id a node answers `records` with the sample it gossips (at most 128
    records), so `peers --model` listed a random part of a large swarm (a review); with it, all
    of that model's live records, page by page."""
    from conftest import run_cli

    asked: list[dict] = []
    with _fake_node(_two_pages(asked)) as contact:
        done = run_cli("peers", "--bootstrap", contact, "--model", str(tiny_model_dir), "--json")
    assert done.returncode == 0, done.stderr
    model_id = read_manifest(tiny_model_dir).model_id
    assert [(req.get("model_id"), req.get("after")) for req in asked] == [(model_id, None), (model_id, "m")]
    assert json.loads(done.stdout)["models"][0]["peers"] == []


def test_a_refusal_is_logged_at_debug_with_its_code(blocks, caplog):
    """A node logged no refusal at any level, so a misconfigured client was invisible to its
    operator (a review). -vv shows each one: the request, the connection, the code and the
    message, a peer's words escaped."""
    d = make_driver(blocks)
    with caplog.at_level("DEBUG", logger="nanoswarm.node.handler"):
        d.refuses("bad_tensor", "", "step", {"session": d.open(), "pos": 0, "wire": "\x1b[2Jq99"}, [hidden(1)])
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert line.startswith("refused step from connection ") and ": bad_tensor: unknown reply format " in line
    assert "\x1b" not in line and "\\x1b[2Jq99" in line


_OUT_OF_DESCRIPTORS = r"""
import logging, resource, sys
import nanoswarm
from nanoswarm import descriptors
from nanoswarm.client.peer_errors import unreachable_why
from nanoswarm.client.swarm import Swarm

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
contact = sys.argv[1]
swarm = Swarm("m" * 64, 4, 4)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
print("explained before:", descriptors.explain(RuntimeError("no peer serves layers 0:4")))
try:
    try:
        raise OSError(24, "Too many open files")
    except OSError as e:
        raise ValueError("embeddings.safetensors: cannot read it") from e
except ValueError as e:
    print("explained cause:", descriptors.explain(e))
resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors.usage()[0] + 1, hard))
try:
    swarm.connection(contact)
    print("connected")
except descriptors.OutOfDescriptors as e:
    print("out:", e)
print("unreachable:", unreachable_why("tcp://127.0.0.1:9"))
print("explained after:", descriptors.explain(RuntimeError("no peer serves layers 0:4")) is not None)
watch = descriptors.ShortageWatch()
watch.check()
watch.check()  # once a minute at most
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
raised = descriptors.raise_limit()
print("raised:", raised is not None and raised[0] == 256 and (raised[1] == hard or hard == resource.RLIM_INFINITY))
print("at hard:", resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised[1])
"""


def test_a_process_out_of_file_descriptors_says_so(tiny_model_dir, cluster_factory):
    """Review141: a client out of descriptors called its peers' contacts bad ("bad_contact:
    cannot connect: Too many open files") or said nothing listened at them, and a node at its
    limit spun a core on connections it could not accept, saying nothing. A client now fails with
    what ran out, a drop while short says so, a node warns (once a minute), and the command line
    raises its soft limit to the hard one."""
    import subprocess
    import sys

    contact = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))]).addresses[0]
    out = subprocess.run([sys.executable, "-c", _OUT_OF_DESCRIPTORS, contact], capture_output=True, text=True,
                         timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    # An error on the way is told its cause first (the CLI's line): caused by it, or soon after it
    assert lines[:2] == ["explained before: None", "explained cause: this process ran out of file descriptors: "
                         "raise its limit (ulimit -n)"]
    del lines[:2]
    assert lines[2] == "explained after: True"
    del lines[2]
    assert lines[0].startswith("out: this process is out of file descriptors (") and "ulimit -n" in lines[0]
    assert lines[1].startswith("unreachable: no connection: this process has ") and "raise its limit" in lines[1]
    warned = [line for line in lines if line.startswith("WARNING")]
    assert len(warned) == 1 and "connections past the limit wait unaccepted" in warned[0], lines
    assert lines[-2:] == ["raised: True", "at hard: True"]
    # The command line, as a user meets it: one line that names the cause
    import resource

    from conftest import CLI

    def ten_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (10, 10))

    gen = subprocess.run([*CLI, "generate", "hi", "--model", str(tiny_model_dir), "--bootstrap", contact,
                          "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120,
                         preexec_fn=ten_descriptors)
    last = gen.stderr.strip().splitlines()[-1]
    assert gen.returncode == 1 and last.startswith("error: this process ") and "out of file descriptors" in last, last


# Review173 (sixty-second session): a mutation of the code that no test caught before.
def test_a_head_shard_attention_step_at_another_position_is_refused(tiny_model_dir):
    """A phase step's attention must be at the session's length (an mlp partial is
    stateless): one at a stale position would be stored at the length and answered for it."""
    d = make_driver((load_blocks(tiny_model_dir, 0, 2, heads=(0, 2)), read_manifest(tiny_model_dir).model_id))
    sid = d.open(8)
    for block in (0, 1):
        d.ok("step", {"session": sid, "pos": 0, "phase": "attn", "block": block}, [hidden(1)])
    for pos in (0, 2):  # held already; ahead
        d.refuses("bad_position", "holds 1", "step", {"session": sid, "pos": pos, "phase": "attn", "block": 0},
                  [hidden(1)])
    d.ok("step", {"session": sid, "pos": 0, "phase": "mlp", "block": 0}, [hidden(1)])  # stateless: any position
    assert d.h.sessions.sessions[sid].length == 1 and d.h.sessions.sessions[sid].next_block == 0


# Review209: mutations of node/handler.py that no test caught before.
def test_a_strangers_close_does_not_split_the_batchs_forward_pass(blocks):
    """Another peer's `close` of a session is a no-op (handler._owns): between two sessions'
    decode steps in one batch it must not make them two forward passes (a cheap way to halve a
    node's decode throughput for anyone who learned a session id from a relayed step)."""
    d = make_driver(blocks)
    a, b = d.open(8), d.open(8)
    batch = [(b"p", d.frames("step", {"session": a, "pos": 0}, [hidden(1, 1)])),
             (b"stranger", d.frames("close", {"session": a})),
             (b"p", d.frames("step", {"session": b, "pos": 0}, [hidden(1, 2)]))]
    replies = [decode(f) for _, f in d.h.handle_batch(batch)]
    assert [m.type for m in replies] == ["closed", "result", "result"]  # (the close is answered first)
    assert (d.h.stats.steps, d.h.stats.max_batch) == (1, 2) and a in d.h.sessions.sessions


def test_a_device_lost_outside_a_step_is_noticed_too(blocks, monkeypatch):
    """A device error raised handling a request outside StepRunner.run (a stateless forward; a
    step's input copied to the device) is asked about as a step's is: a node whose CUDA context
    was lost there answered `internal` forever and stayed on every route."""
    d = make_driver(blocks)
    monkeypatch.setattr(d.h.steps, "_cpu", False)  # on a GPU any RuntimeError asks
    monkeypatch.setattr(d.h.steps, "device_works", lambda: False)

    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(d.h.steps.checks, "hidden", lost)
    assert d.code("forward", {}, [hidden(1)]) == "internal"
    assert d.h.device_failure == "RuntimeError on cpu: CUDA error: an illegal memory access was encountered"


def test_a_leaving_node_refuses_new_sessions_and_serves_its_open_ones(blocks):
    """A node draining after SIGTERM (handler.leaving) refuses `open` with `leaving`, so that a
    client goes elsewhere at once, while the sessions it holds step on until the grace ends."""
    d = make_driver(blocks)
    sid = d.open(8)
    d.h.leaving = True
    d.refuses("leaving", "leaving", "open", {"max_length": 8})
    d.ok("step", {"session": sid, "pos": 0}, [hidden(1)])
    assert d.h.info()["leaving"] is True and list(d.h.sessions.sessions) == [sid]


def test_a_session_or_forward_takes_any_blocks_within_the_served_ones_and_no_others(tiny_model_dir):
    """`layers` may name any blocks of the node's own, its first and last included; a range that
    reaches past either end is not_served, not a session over blocks the node does not hold."""
    d = make_driver((load_blocks(tiny_model_dir, 1, 3), read_manifest(tiny_model_dir).model_id))
    for layers in ([1, 3], [1, 2], [2, 3]):
        opened = d.ok("open", {"max_length": 4, "layers": layers})
        assert opened.fields["layers"] == layers
        assert d.ok("forward", {"layers": layers}, [hidden(1)]).tensors[0].shape == (1, 1, N_EMBD)
    for layers in ([0, 2], [2, 4], [0, 4]):
        d.refuses("not_served", "not within the served 1:3", "open", {"max_length": 4, "layers": layers})
        d.refuses("not_served", "not within the served 1:3", "forward", {"layers": layers}, [hidden(1)])


def test_a_head_shard_refuses_a_stateless_forward(tiny_model_dir):
    """A stateless forward runs whole blocks: a head shard holds some heads of its blocks, and
    its blocks' output alone is no block's output (not_served, not a result, nor `internal`)."""
    d = make_driver((load_blocks(tiny_model_dir, 0, 2, heads=(0, 2)), read_manifest(tiny_model_dir).model_id))
    d.refuses("not_served", "head shard", "forward", {}, [hidden(1)])
    assert d.h.stats.steps == 0


def test_a_dropped_connections_request_ids_are_forgotten(blocks):
    """peers_gone closes a dropped connection's sessions and forgets its request ids: they
    held their share of MAX_SEEN_IDS, pushing out the ids of peers still connected."""
    d = make_driver(blocks)
    sid = d.ok("open", {"max_length": 8}).fields["session"]  # (from peer b"p")
    decode(d.h.handle(b"q", d.frames("info")))
    assert d.h.peers_gone({b"p"}) == [sid]
    assert list(d.h.seen.by_peer) == [b"q"] and d.h.seen.total == 1


def test_records_to_a_node_without_a_swarm_table_are_not_served(blocks):
    """docs/protocol.md: `records` to a node that keeps no table is refused `not_served`."""
    d = make_driver(blocks)
    assert d.h.on_records is None
    d.refuses("not_served", "keeps no swarm table", "records", {"records": [], "want": True})


def test_a_step_refused_busy_for_device_memory_may_be_sent_again_as_it_was(blocks, monkeypatch):
    """`busy` for device memory taken meanwhile says "send it again": the same frames sent again
    are served, not refused `duplicate_request` (its id was forgotten with the refusal)."""
    d = make_driver(blocks)
    sid = d.open(8)
    step = d.frames("step", {"session": sid, "pos": 0}, [hidden(2)])

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with monkeypatch.context() as m:
        m.setattr(blocks[0], "forward", out_of_memory)
        assert decode(d.h.handle(b"p", step)).fields["code"] == "busy"
    assert decode(d.h.handle(b"p", step)).type == "result"
    assert decode(d.h.handle(b"p", step)).fields["code"] == "duplicate_request"  # once served, it is kept


def test_a_nodes_stats_count_its_forward_passes_and_their_tokens(blocks):
    """`info`'s stats (shown by `nanoswarm info`): a step's positions and a forward's rows x
    positions are the tokens a node computed."""
    d = make_driver(blocks)
    sid = d.open(8)
    d.ok("step", {"session": sid, "pos": 0}, [hidden(3)])
    d.ok("forward", {}, [torch.randn(2, 2, N_EMBD)])
    stats = d.h.info()["stats"]
    assert (stats["steps"], stats["tokens"]) == (2, 7)


def test_a_refused_step_that_rewound_nothing_does_not_say_it_did(blocks):
    """A refused step's error says the session was rewound only when the step dropped positions:
    a plain step, or a `rewind` to the session's end, leaves it as it was and says nothing so."""
    d = make_driver(blocks)
    sid = d.open(8)
    d.ok("step", {"session": sid, "pos": 0}, [hidden(2)])
    bad = hidden(1)
    bad[0, 0, 0] = float("nan")
    for rewind in (False, True):
        msg = d.ask("step", {"session": sid, "pos": 2, "rewind": rewind}, [bad])
        assert msg.fields["code"] == "bad_value" and "rewound" not in msg.fields["message"], msg.fields
    assert d.h.sessions.sessions[sid].length == 2


# Review209: mutations of node/server.py that no test caught before.
@pytest.mark.parametrize("lost", ["not taken", "never reached"])
def test_a_relayed_step_its_next_hop_cannot_take_is_relay_failed_to_its_owner(tiny_model_dir, monkeypatch, lost):
    """A relayed step the node computed but cannot pass on is answered to the session's owner
    `relay_failed`, under the chain's id: `internal` would say the node failed, and its client
    would ban an honest node for a hop it could not reach. Either the link refuses it at once
    ("not taken"), or it waits on a link to an address where nothing listens until the link is
    given up (UNREACHED_SECONDS): the node's loop then sends what RelayLinks.take_failed holds
    (no test had the loop send it; the owner waited out its timeout)."""
    from conftest import free_port

    from nanoswarm.node import relay as relay_module
    from nanoswarm.node.server import NodeServer

    monkeypatch.setattr(relay_module, "UNREACHED_SECONDS", 0.3)
    handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "a",
                             NodeLimits())
    handler.can_relay = lambda contact: True
    node = NodeServer(handler, "tcp://127.0.0.1:*")
    if lost == "not taken":
        monkeypatch.setattr(node.relays, "send", lambda relay, frames: "the next hop is not reached from this node")
    serving = threading.Thread(target=node.serve_forever, daemon=True)
    serving.start()
    peer = RawPeer(node.address)
    try:
        sid = peer.ask("open", max_length=8).fields["session"]
        peer.send(encode("step", 500, {"session": sid, "pos": 0, "reply": 77,
                                       "next": [[f"tcp://127.0.0.1:{free_port()}", "s-next"]]}, [hidden(1)]))
        reply = peer.recv(10.0)
        assert reply is not None and (reply.id, reply.fields["code"]) == (77, "relay_failed"), reply
        assert "not reached from this node" in reply.fields["message"]
    finally:
        peer.close()
        node.stop()
        serving.join(5)


def test_a_drop_read_when_a_new_peer_arrives_closes_the_dropped_peers_sessions(tiny_model_dir):
    """A batch from a new peer reads the monitor's drops first (ConnectionWatch.note): those peers'
    sessions are closed after the batch, not left holding their KV budget until the idle timeout
    (the monitor's events are read once)."""
    from nanoswarm.node.server import NodeServer

    handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "a",
                             NodeLimits())
    node = NodeServer(handler, "tcp://127.0.0.1:*")  # driven by hand: no loop reads the monitor between

    def serve_one() -> None:
        assert node.socket.poll(5000)
        node._serve_ready()

    first, second = RawPeer(node.address), None
    try:
        first.send(encode("open", 1, {"max_length": 8}))
        serve_one()
        assert first.recv().type == "opened" and len(handler.sessions.sessions) == 1
        first.close()
        assert node.connections.monitor.poll(10_000)  # the drop waits in the monitor, unread
        second = RawPeer(node.address)
        second.send(encode("info", 1, {}))
        serve_one()
        assert second.recv().type == "info_reply"
        assert not handler.sessions.sessions
    finally:
        if second is not None:
            second.close()
        node.close()


def test_a_node_draining_after_sigterm_refuses_new_sessions(tiny_model_dir):
    """Once a node begins to leave (SIGTERM: NodeServer.leave), its clients are told and, for the
    grace it drains, an `open` is refused `leaving` (and `info` says so), not a session that
    the node's exit will break."""
    from nanoswarm.node.server import NodeServer

    handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "a",
                             NodeLimits())
    node = NodeServer(handler, "tcp://127.0.0.1:*", leave_grace=5.0)
    serving = threading.Thread(target=node.serve_forever, daemon=True)
    serving.start()
    peer = RawPeer(node.address)
    try:
        assert peer.ask("open", max_length=8).type == "opened"
        node.leave()
        assert peer.recv().type == "leaving"
        reply = peer.ask("open", max_length=8)
        assert (reply.type, reply.fields.get("code")) == ("error", "leaving")
        assert peer.ask("info").fields["leaving"] is True
    finally:
        peer.close()
        node.stop()
        serving.join(5)


def test_a_node_with_curve_takes_partials_and_relayed_steps_only_with_their_keys(tiny_model_dir):
    """A node with CURVE knows every sender's key (ZAP) and tells its handler so: a head group's
    partials are then taken only from the member a step names, by its key, and relayed steps
    only as their owner pinned them (tests/test_all_reduce.py, test_relay.py drive those checks);
    without the flags, anyone who knew a session id could add a partial to a group's sums."""
    from nanoswarm.node.server import NodeServer

    public, secret = zmq.curve_keypair()
    handlers = [RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, name)
                for name in ("curve", "plain")]
    nodes = [NodeServer(handlers[0], "tcp://127.0.0.1:*", curve_secret=secret, curve_public=public),
             NodeServer(handlers[1], "tcp://127.0.0.1:*")]
    try:
        assert [(h.groups.checks_keys, h.checks_senders) for h in handlers] == [(True, True), (False, False)]
    finally:
        for node in nodes:
            node.close()


# Review221: mutations of descriptors.py that no test caught.
_DESCRIPTORS_AT_THE_LIMIT = r"""
import errno, os, resource
from nanoswarm import descriptors

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
# The limit raised once; a second time there is nothing to raise
print("raised again:", descriptors.raise_limit() is not None, descriptors.raise_limit())
open_now = descriptors.usage()[0]
# `usage` counts what is open: with the limit that many and one more, one more opens and no other
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 1, hard))
fd = os.open(os.devnull, os.O_RDONLY)
try:
    os.open(os.devnull, os.O_RDONLY)
    print("opened past the limit")
except OSError as e:
    print("then:", errno.errorcode[e.errno])
# Not even one left to list them with: every one is in use
print("usage at the limit:", descriptors.usage() == (open_now + 1, open_now + 1))
print("short at the limit:", descriptors.shortage() is not None)
os.close(fd)
# Within MARGIN of the limit counts as none left; one more, it does not
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + descriptors.MARGIN, hard))
print("short within the margin:", descriptors.shortage() is not None)
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + descriptors.MARGIN + 1, hard))
print("short past the margin:", descriptors.shortage() is not None)
"""


def test_descriptors_are_counted_and_found_short_at_their_bounds():
    """usage() is the count open (at the limit, where none is left to list them, the limit);
    shortage() starts MARGIN from the limit; raise_limit() raises once (it said "raised" again
    from the hard limit to itself)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DESCRIPTORS_AT_THE_LIMIT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["raised again: True None", "then: EMFILE", "usage at the limit: True",
                                       "short at the limit: True", "short within the margin: True",
                                       "short past the margin: False"], out.stdout


def test_an_error_is_explained_by_a_shortage_in_its_chain_and_only_once(monkeypatch):
    """A shortage anywhere in an error's chain (raised `from` it or while handling it) is named
    before the error's line, for either errno that says none is left (the process's EMFILE, the
    system's ENFILE); an OutOfDescriptors, which says so itself, is not told it twice."""
    import errno

    from nanoswarm import descriptors

    monkeypatch.setattr(descriptors, "_noted", -float("inf"))  # no shortage seen lately in this process
    assert descriptors.explain(RuntimeError("no peer serves layers 0:4")) is None
    for number in (errno.EMFILE, errno.ENFILE):
        try:
            try:
                raise OSError(number, os.strerror(number))
            except OSError:
                raise ValueError("embeddings.safetensors: cannot read it")  # noqa: B904 - the implicit chain (__context__)
        except ValueError as e:
            assert descriptors.explain(e) == "this process ran out of file descriptors: raise its limit (ulimit -n)"
        monkeypatch.setattr(descriptors, "_noted", -float("inf"))
        with pytest.raises(descriptors.OutOfDescriptors) as raised:
            descriptors.check(OSError(number, os.strerror(number)))
        assert raised.value.errno == number and descriptors.explain(raised.value) is None
        monkeypatch.setattr(descriptors, "_noted", -float("inf"))
    descriptors.check(OSError(errno.ECONNREFUSED, "refused"))  # not a shortage: nothing raised


# Review226: a mutation of node/handler.py that no test caught before.
def test_a_request_refused_busy_for_memory_before_its_compute_may_be_sent_again(blocks, monkeypatch):
    """Device memory running out while a step's input is copied to the device, or in a stateless
    forward, is refused `busy` by the handler itself (not StepRunner.run): the same frames sent
    again are served, not `duplicate_request`. Kills: _refusal forgetting the id of a `busy`
    refusal only, not of an OutOfMemoryError's."""
    d = make_driver(blocks)
    sid = d.open(8)
    step = d.frames("step", {"session": sid, "pos": 0}, [hidden(2)])
    forward = d.frames("forward", {}, [hidden(1)])

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with monkeypatch.context() as m:
        m.setattr(d.h.steps.checks, "hidden", out_of_memory)
        assert [decode(d.h.handle(b"p", f)).fields["code"] for f in (step, forward)] == ["busy", "busy"]
    assert [decode(d.h.handle(b"p", f)).type for f in (step, forward)] == ["result", "result"]


# Review226: a mutation of node/sessions.py that no test caught before.
def test_a_node_limit_of_true_or_false_is_refused_not_taken_as_one_or_zero():
    """A bool is an int to Python: `max_inflight_per_peer=True` would be a limit of 1 request, set
    by mistake through the Python API. NodeLimits refuses it, naming the limit. Kills: the
    `isinstance(value, bool)` check dropped from NodeLimits.__post_init__."""
    for name in ("max_inflight_per_peer", "max_sessions", "idle_timeout"):
        with pytest.raises(ValueError, match=name):
            NodeLimits(**{name: True})
