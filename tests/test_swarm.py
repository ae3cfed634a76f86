"""The foundation end to end: real node processes, real ZeroMQ sockets, exact logits."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from conftest import SwarmWithALiar, sessions_on

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.route import RouteError
from nanoswarm.node.cluster import NodeSpec, even_split, swarm_specs
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_model

PROMPT_LEN, DECODE_STEPS = 12, 32


def reference_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """The whole sequence through the single-process model, no KV cache: [T, vocab]."""
    with torch.inference_mode():
        return load_model(model_dir)(ids[None])[0]


def swarm_logits(model: SwarmModel, ids: torch.Tensor) -> torch.Tensor:
    """Prefill of the first PROMPT_LEN ids, then one decode step per further id, through the
    swarm's KV caches; returns the logits of every position from the prompt's last on."""
    session = model.session(len(ids))
    try:
        out = [model.client.logits(session.step(model.client.embed(ids[:PROMPT_LEN].tolist(), 0)))]
        for t in range(PROMPT_LEN, len(ids)):
            out.append(model.client.logits(session.step(model.client.embed([int(ids[t])], t))))
    finally:
        session.close()
    return torch.stack(out)


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_nodes", [1, 2, 3, 4])
def test_logits_match_single_process(tiny_model_dir, cluster_factory, n_nodes):
    n_layer = read_manifest(tiny_model_dir).config.n_layer
    swarm = cluster_factory(tiny_model_dir, [NodeSpec(r) for r in even_split(n_layer, n_nodes)])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        assert len(model.swarm.plan()) == n_nodes
        ids = random_ids(PROMPT_LEN + DECODE_STEPS)
        got = swarm_logits(model, ids)
        want = reference_logits(tiny_model_dir, ids)[PROMPT_LEN - 1:]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5
    finally:
        model.close()


@pytest.mark.slow
def test_gpt2_small_shape_through_four_nodes(gpt2_small_model_dir, cluster_factory):
    swarm = cluster_factory(gpt2_small_model_dir, [NodeSpec(r) for r in even_split(12, 4)])
    model = SwarmModel.connect(gpt2_small_model_dir, peers=swarm.addresses)
    try:
        ids = random_ids(PROMPT_LEN + DECODE_STEPS, seed=3)
        diff = (swarm_logits(model, ids) - reference_logits(gpt2_small_model_dir, ids)[PROMPT_LEN - 1:])
        assert diff.abs().max().item() <= 1e-4
    finally:
        model.close()


def test_greedy_and_seeded_generation(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4))])
    local = SwarmModel.local(tiny_model_dir)
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        greedy = SamplingParams(temperature=0)
        want = local.generate("The swarm", 24, greedy).ids
        assert model.generate("The swarm", 24, greedy).ids == want
        seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7)
        first = model.generate("The swarm", 24, seeded).ids
        assert model.generate("The swarm", 24, seeded).ids == first
        assert local.generate("The swarm", 24, seeded).ids == first
        other = model.generate("The swarm", 24, SamplingParams(temperature=1.0, seed=8)).ids
        assert other != first  # the seed matters: the check above can fail
    finally:
        model.close()


def test_routes_take_the_peer_that_computes_faster(tiny_model_dir, cluster_factory):
    """Two peers serve every block; one is an honest peer on a slow machine (50 ms a forward pass,
    tests/dishonest_node.py --slow), started first and the bootstrap. Whether the client learns
    the peers from that bootstrap (records) or asks each (`--peers`, in either order), its route
    goes through the fast one, and the tokens are the local ones."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--dishonest", "--slow", "0.05"]),
                                             NodeSpec((0, 4))], cluster=SwarmWithALiar)
    slow, fast = swarm.addresses
    want = SwarmModel.local(tiny_model_dir).generate("The swarm", 6, SamplingParams(temperature=0)).ids
    for how in ({"bootstrap": [slow]}, {"peers": [slow, fast]}, {"peers": [fast, slow]}):
        model = SwarmModel.connect(tiny_model_dir, **how)
        try:
            result = model.generate("The swarm", 6, SamplingParams(temperature=0))
            assert result.ids == want
            assert [s["peers"] for s in result.route] == [[fast]], how
        finally:
            model.close()


@pytest.mark.parametrize("heads", [None, [(0, 2), (2, 4)]], ids=["layers", "head-groups"])
def test_a_programs_sessions_spread_over_like_peers(tiny_model_dir, cluster_factory, heads):
    """The sessions of one program (one SwarmModel), opened one after another, spread over two
    peers that serve the same blocks as fast as each other (or two head groups' like members). A
    peer states its load a minute late, so all of them took the same peer. Each session's output
    is the local one."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), h) for h in heads or [None]] * 2)
    model, local = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses), SwarmModel.local(tiny_model_dir)
    try:
        for address, peer in model.swarm.peers.items():  # like peers: no measuring noise decides
            model.swarm.peers[address] = dataclasses.replace(peer, rtt=0.001, throughput=1000.0, load=0.0)
        sessions = [model.session(8) for _ in range(4)]
        assert [sessions_on(a) for a in swarm.addresses] == [2] * len(swarm.addresses)
        for i, s in enumerate(sessions):
            x = model.client.embed([1 + i, 2, 3], 0)
            assert (s.step(x) - local.session(8).step(x)).abs().max() <= 1e-5
        assert [p.load for p in model.swarm.available()] == pytest.approx([0.2] * len(swarm.addresses))
        for s in sessions:
            s.close()
        assert [p.load for p in model.swarm.available()] == [0.0] * len(swarm.addresses)  # closed: not counted
    finally:
        model.close()


def test_a_peers_round_trip_is_timed_after_its_handshake(tiny_model_dir, cluster_factory):
    """The round trip a client keeps for a peer is its link's, not its link's set-up: the first
    `info` on a fresh connection also waited for the TCP connect and CURVE's handshake (0.7-9 ms
    on loopback against 0.35 ms after it, review99), and like peers fell outside the time that
    routes tie within, so sessions did not spread. Here the node's handshake takes 1 s."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--dishonest", "--slow-handshake", "1.0"])],
                            cluster=SwarmWithALiar)
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        assert model.swarm.peers[swarm.addresses[0]].rtt < 0.5
        want = SwarmModel.local(tiny_model_dir).generate("Shake", 3, SamplingParams(temperature=0)).ids
        assert model.generate("Shake", 3, SamplingParams(temperature=0)).ids == want
    finally:
        model.close()


def test_missing_layers_named(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((3, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        with pytest.raises(RouteError, match=r"layers 1:3"):
            model.generate("x", 2)
    finally:
        model.close()


def test_peer_of_another_model_is_ignored(tiny_model_dir, small12_model_dir, cluster_factory):
    other = cluster_factory(small12_model_dir, [NodeSpec((0, 12))])
    ours = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=other.addresses + ours.addresses)
    try:
        assert list(model.swarm.peers) == ours.addresses
        assert other.addresses[0] in model.swarm.rejected
    finally:
        model.close()


def test_a_routes_opens_cross_the_network_together(tiny_model_dir, cluster_factory, monkeypatch):
    """Each stage's open waited for the one before: a route of n stages took n round trips to
    open (1.2 s for 3 stages at a 300 ms round trip, of which 0.6 s waited for the first two).
    Every stage's open, a head group member's too, is queued before the first answer is awaited;
    each stage claims its own, and no other is sent; a stage's idle time counts from when its
    open went out. The text is the local model's, and every session is closed after."""
    from nanoswarm.client.link_sessions import idle_clock
    from nanoswarm.client.transport import PeerConnection

    events: list[tuple[str, int, float]] = []
    send, recv = PeerConnection.send, PeerConnection.recv

    def noting_send(conn, msg_type, *args, **kwargs):
        req_id = send(conn, msg_type, *args, **kwargs)
        if msg_type == "open":
            events.append(("sent", req_id, idle_clock()))
        return req_id

    def noting_recv(conn, req_id, expect, *args, **kwargs):
        msg = recv(conn, req_id, expect, *args, **kwargs)
        if expect == "opened":
            events.append(("opened", req_id, idle_clock()))
        return msg

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3), (0, 2)), NodeSpec((1, 3), (2, 4)),
                                             NodeSpec((3, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    monkeypatch.setattr(PeerConnection, "send", noting_send)
    monkeypatch.setattr(PeerConnection, "recv", noting_recv)
    try:
        session = model.session(8)
        assert [kind for kind, _, _ in events] == ["sent"] * 4 + ["opened"] * 4
        assert {i for kind, i, _ in events if kind == "sent"} == {i for kind, i, _ in events if kind == "opened"}
        first_read = events[4][2]
        assert all(stage.sent_at <= first_read for stage in session.stages)
        session.close()
        greedy = SamplingParams(temperature=0)
        assert model.generate("Together", 4, greedy).ids == SwarmModel.local(tiny_model_dir).generate(
            "Together", 4, greedy).ids
        assert _sessions_become(swarm.addresses, 0)
    finally:
        monkeypatch.undo()
        model.close()


def test_a_route_that_fails_to_open_leaves_no_session_opened_ahead(tiny_model_dir, cluster_factory):
    """Opens are sent to every stage ahead of the first answer; when the route then failed (its
    first node full), the later stages' sessions were left open, unread, one more per try, each
    holding its node's slot and KV reservation until the client's link closed (review95). They
    are closed as the open fails, and an old answer is never taken for a later open's."""
    from nanoswarm.client.peer_errors import PeerError

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2), args=["--max-sessions", "1"]), NodeSpec((2, 4))])
    holder = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    other = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        held = holder.session(8)
        for max_length in (10, 11, 12, 10):
            with pytest.raises((PeerError, RouteError)):
                other.session(max_length)
        assert _sessions_become([swarm.addresses[1]], 1)  # the holder's alone
        held.close()
        greedy = SamplingParams(temperature=0)
        assert other.generate("Ahead", 3, greedy).ids == SwarmModel.local(tiny_model_dir).generate(
            "Ahead", 3, greedy).ids
        assert _sessions_become(swarm.addresses, 0)
    finally:
        holder.close()
        other.close()


def test_opens_sent_ahead_for_a_plan_that_changed_are_closed(tiny_model_dir, cluster_factory):
    """A route's opens go out ahead (Swarm.open_ahead); when the plan changes before they are
    claimed (a refusal re-plans the route), the opens to peers no longer on it were left to be
    closed whenever their link was next read: a node off the route held a session for the whole
    generation (review96). `settle_early`, after the route opened, reads and closes them."""
    from nanoswarm.client.route import StagePlan

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4)), NodeSpec((2, 4))])
    first, dropped, taken = swarm.addresses
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        peers = model.swarm.peers
        model.swarm.open_ahead([StagePlan(0, 2, [peers[first]]), StagePlan(2, 4, [peers[dropped]])], 16)
        plans = [StagePlan(0, 2, [peers[first]]), StagePlan(2, 4, [peers[taken]])]
        model.swarm.open_ahead(plans, 16)
        stages = [model.swarm.make_stage(plan) for plan in plans]
        for stage in stages:
            stage.open(16)
        model.swarm.settle_early()
        assert _sessions_become([dropped], 0) and _sessions_become([first, taken], 1)
        for stage in stages:
            stage.close()
        assert _sessions_become(swarm.addresses, 0)
    finally:
        model.close()


def test_threads_share_one_model_and_close_frees_the_nodes_sessions(tiny_model_dir, cluster_factory):
    """Sessions share the swarm's sockets: several threads' generations take turns a step each
    (a review: two threads on one model failed, banned a healthy peer and left sessions open).
    `close` during a generation closes its sessions on the nodes at once and ends it."""
    import threading

    from nanoswarm.client.transport import PeerConnection

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=7)
    expected = SwarmModel.local(tiny_model_dir).generate("To be", 16, seeded).ids
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(model.generate("To be", 16, seeded)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.ids for r in results] == [expected] * 3 and not any(r.failovers for r in results)
    assert not model.swarm.bans

    stream = model.stream("To be", 16, seeded)
    next(stream)
    probe = PeerConnection(swarm.addresses[0], timeout=10)
    try:
        assert probe.request("info").fields["sessions"] == 1
        model.close()
        with pytest.raises(RuntimeError, match="closed during the generation"):
            list(stream)
        for _ in range(50):  # the close is queued as the socket closes: read by the node at once
            if probe.request("info").fields["sessions"] == 0:
                break
        assert probe.request("info").fields["sessions"] == 0
    finally:
        probe.close()


def test_a_stream_collected_inside_another_step_touches_no_socket(tiny_model_dir, cluster_factory):
    """An unfinished stream caught in a reference cycle is closed by the garbage collector on
    whichever thread allocates, even inside another thread's step, which holds the model's lock
    and may be between the frames of its request. Its cleanup sent `close` there: the node got a
    torn request, refused it bad_tensor and was banned (a review, with real threads). Now such a
    stream is closed on its nodes at the model's next step; one the caller closes, at once."""
    import gc

    from nanoswarm.client.transport import PeerConnection

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    greedy = SamplingParams(temperature=0)
    expected = SwarmModel.local(tiny_model_dir).generate("To be", 8, greedy).ids
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    probe = PeerConnection(swarm.addresses[0], timeout=10)
    try:
        stream = model.stream("To be", 8, greedy)
        next(stream)
        cycle: list = [stream]
        cycle.append(cycle)
        del stream
        with model._lock:  # as this thread's own step holds it
            del cycle
            gc.collect()  # the stream's cleanup runs here, on this thread
            time.sleep(0.3)
            assert probe.request("info").fields["sessions"] == 1  # nothing sent on the step's sockets
        assert model.generate("To be", 8, greedy).ids == expected  # whose first step closes it
        assert _sessions_become(swarm.addresses, 0) and not model.swarm.bans

        # The same while another thread's step holds the lock: the cleanup may not wait for it.
        stream = model.stream("To be", 8, greedy)
        next(stream)
        cycle = [stream]
        cycle.append(cycle)
        del stream
        held, release = threading.Event(), threading.Event()

        def step_of_another_thread() -> None:
            with model._lock:
                held.set()
                release.wait(10)  # (a cleanup that waited for the lock would wait this long)

        other = threading.Thread(target=step_of_another_thread, daemon=True)
        other.start()
        assert held.wait(10)
        try:
            del cycle
            gc.collect()  # on this thread, which does not hold the lock
            time.sleep(0.3)
            assert probe.request("info").fields["sessions"] == 1
        finally:
            release.set()
            other.join(10)
        assert model.generate("To be", 8, greedy).ids == expected
        assert _sessions_become(swarm.addresses, 0) and not model.swarm.bans

        stream = model.stream("To be", 8, greedy)
        next(stream)
        stream.close()  # by the caller, the lock free: closed on the node at once
        assert _sessions_become(swarm.addresses, 0)
    finally:
        probe.close()
        model.close()


def test_a_stream_dropped_inside_another_step_is_closed_while_the_model_sits_idle(tiny_model_dir, cluster_factory,
                                                                                  monkeypatch):
    """A stream collected inside another thread's step is closed on its nodes later (the test
    above): at the model's next step, session or close, and so it held its nodes' sessions and
    KV caches for as long as the model then sat idle. The model's own thread now closes it once
    the lock is free, with no call to the model (client/idle_reads.py)."""
    import gc

    from nanoswarm.client import idle_reads
    from nanoswarm.client.transport import PeerConnection

    monkeypatch.setattr(idle_reads, "IDLE_READ_SECONDS", 0.1)
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    probe = PeerConnection(swarm.addresses[0], timeout=10)
    try:
        stream = model.stream("To be", 8, SamplingParams(temperature=0))
        next(stream)
        cycle: list = [stream]
        cycle.append(cycle)
        del stream
        with model._lock:  # as another thread's step holds it
            del cycle
            gc.collect()  # the stream's cleanup runs here, and leaves its session to be closed
            time.sleep(0.5)
            assert probe.request("info").fields["sessions"] == 1  # (the model's thread waits for no lock)
        assert _sessions_become(swarm.addresses, 0) and not model.swarm.bans
    finally:
        probe.close()
        model.close()


def test_a_stream_stopped_while_the_idle_read_holds_the_lock_is_closed_at_once(tiny_model_dir, cluster_factory,
                                                                                monkeypatch):
    """A stream stopped by its caller while the model's idle-read thread holds the lock cannot
    take it, and leaves its session to be closed later (review205): the thread closes it at once
    when its read ends, not a whole IDLE_READ_SECONDS later (its nodes' sessions and KV caches
    held meanwhile)."""
    import threading

    from nanoswarm.client import idle_reads
    from nanoswarm.client.transport import PeerConnection

    monkeypatch.setattr(idle_reads, "IDLE_READ_SECONDS", 5.0)
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    probe = PeerConnection(swarm.addresses[0], timeout=10)
    armed, in_read, stopped = [1], threading.Event(), threading.Event()
    drain = model.swarm.drain_events

    def drain_then_wait() -> None:
        drain()
        if armed and threading.current_thread() is model._idle_reads.thread:
            armed.clear()
            in_read.set()  # the idle thread holds the lock: the stream is stopped now
            stopped.wait(10)

    monkeypatch.setattr(model.swarm, "drain_events", drain_then_wait)
    try:
        stream = model.stream("To be", 8, SamplingParams(temperature=0))
        next(stream)
        assert in_read.wait(15)
        stream.close()  # the lock is the idle thread's: its session is abandoned, not closed
        assert model.swarm.has_abandoned
        stopped.set()
        deadline = time.monotonic() + 3.5  # (the idle thread's next read: 5 s)
        while probe.request("info").fields["sessions"] != 0:
            assert time.monotonic() < deadline, "the stopped stream's session is still open"
            time.sleep(0.05)
        assert not model.swarm.bans
    finally:
        stopped.set()
        probe.close()
        model.close()


def test_an_interrupt_between_a_requests_frames_tears_no_later_request(tiny_model_dir, cluster_factory, monkeypatch):
    """pyzmq sends a message's frames one call each, so Ctrl-C (or the CLI's SIGTERM) can land
    between them, and the frames sent wait on the socket for the rest. The next request went out
    as their tail: a stream's cleanup lost its `close` (the session held its node's cache until
    the idle timeout), and a hand-stepped step sent again waited out its timeout and got a
    healthy node banned (a review). The cut message is now ended by itself; pyzmq's send is
    made to raise where a signal handler would."""
    import zmq

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    greedy = SamplingParams(temperature=0)
    expected = SwarmModel.local(tiny_model_dir).generate("To be", 8, greedy).ids
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    send, armed = zmq.Socket.send, []

    def send_or_interrupt(socket: zmq.Socket, *args, **kwargs):
        if socket in armed and len(args) > 1 and args[1] & zmq.SNDMORE == 0:  # the step's last frame
            armed.remove(socket)
            raise KeyboardInterrupt
        return send(socket, *args, **kwargs)

    monkeypatch.setattr(zmq.Socket, "send", send_or_interrupt)
    try:
        (conn,) = model.swarm._conns.values()
        stream = model.stream("To be", 8, greedy)
        next(stream)
        armed.append(conn.socket)
        with pytest.raises(KeyboardInterrupt):
            next(stream)  # its cleanup sends `close` on the same socket
        assert _sessions_become(swarm.addresses, 0)

        session = model.session(4)
        hidden = torch.randn(1, 2, model.config.n_embd)
        armed.append(conn.socket)
        with pytest.raises(KeyboardInterrupt):
            session.step(hidden)
        reference = SwarmModel.local(tiny_model_dir).session(4).step(hidden)
        assert (session.step(hidden) - reference).abs().max() < 1e-5  # sent again: no failover
        session.close()
        assert model.generate("To be", 8, greedy).ids == expected
        assert not model.swarm.bans and session.failovers == 0
    finally:
        monkeypatch.undo()
        model.close()


def _interrupt_at(monkeypatch, msg_type: str, after: bool, nth: int = 1) -> None:
    """Ctrl-C where a signal handler would raise it: in pyzmq's send of the `nth` request of
    `msg_type`, before or `after` it is handed to ZeroMQ (once)."""
    import msgpack
    import zmq

    send, seen = zmq.Socket.send, []

    def send_or_interrupt(socket: zmq.Socket, data, *args, **kwargs):
        header = bytes(data.buffer if hasattr(data, "buffer") else data)
        ours = header[:1] and len(seen) < nth and msgpack.unpackb(header).get("type") == msg_type
        if ours:
            seen.append(1)
        if ours and len(seen) == nth and not after:
            raise KeyboardInterrupt
        sent = send(socket, data, *args, **kwargs)
        if ours and len(seen) == nth and after:
            raise KeyboardInterrupt
        return sent

    monkeypatch.setattr(zmq.Socket, "send", send_or_interrupt)


def _sessions_become(contacts: list[str], want: int) -> bool:
    """Whether every node's `info` says `want` sessions within ~2.5 s (a close on the model's link
    may be read after the probe's info)."""
    from nanoswarm.client.transport import PeerConnection

    probes = [PeerConnection(c, timeout=10) for c in contacts]
    try:
        return any(all(p.request("info").fields["sessions"] == want for p in probes) or time.sleep(0.05)
                   for _ in range(50))
    finally:
        for p in probes:
            p.close()


@pytest.mark.parametrize("where", ["open sent", "opened read", "opened taken", "opened recorded",
                                   "second member's open", "close"])
def test_ctrl_c_while_sessions_open_or_close_leaves_none_open(tiny_model_dir, cluster_factory, monkeypatch, where):
    """A notebook user's Ctrl-C at any moment, then the same model used on (a review fuzzed real
    signals: 9 of 197 interrupted generations left a session open on a node until its 300 s idle
    timeout, or until the model was closed):
    - after an `open` went out: the node opened a session whose id the client never learnt;
      it is closed when its late `opened` is read;
    - while its `opened` was decoded: it is read again;
    - once its `opened` was read, on its way back to the open (review164: left open): closed;
    - at the first call after the reply (where a signal that came meanwhile is raised): closed;
    - between a head group's members' opens: the members opened so far are closed;
    - in a session's `close`, at its first stage: the rest are closed at the model's next step."""
    greedy = SamplingParams(temperature=0)
    expected = SwarmModel.local(tiny_model_dir).generate("To be", 6, greedy).ids
    specs = ([NodeSpec((0, 4), (0, 2)), NodeSpec((0, 4), (2, 4))] if where == "second member's open"
             else [NodeSpec((0, 2)), NodeSpec((2, 4))])
    swarm = cluster_factory(tiny_model_dir, specs)
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        if where == "opened read":
            from nanoswarm.client import transport

            decode, done = transport.decode, []

            def interrupted(frames: list, *args, **kwargs):
                msg = decode(frames, *args, **kwargs)
                if msg.type == "opened" and not done:
                    done.append(1)
                    raise KeyboardInterrupt
                return msg

            monkeypatch.setattr(transport, "decode", interrupted)
            with pytest.raises(KeyboardInterrupt):
                model.generate("To be", 6, greedy)
        elif where == "opened taken":
            from nanoswarm.client.transport import PeerConnection

            take, done = PeerConnection.take, []

            def taken_then_interrupted(conn: PeerConnection, *args, **kwargs):
                msg = take(conn, *args, **kwargs)
                if msg is not None and msg.type == "opened" and not done:
                    done.append(1)
                    raise KeyboardInterrupt
                return msg

            monkeypatch.setattr(PeerConnection, "take", taken_then_interrupted)
            with pytest.raises(KeyboardInterrupt):
                model.generate("To be", 6, greedy)
        elif where == "opened recorded":
            class Interrupting(set):
                armed = True

                def add(self, session: str) -> None:
                    super().add(session)
                    if self.armed:
                        self.armed = False
                        raise KeyboardInterrupt

            model.swarm.connection(swarm.addresses[0]).sessions = Interrupting()
            with pytest.raises(KeyboardInterrupt):
                model.generate("To be", 6, greedy)
        elif where == "close":
            session = model.session(4)
            session.step(torch.randn(1, 2, model.config.n_embd))
            _interrupt_at(monkeypatch, "close", after=False)
            with pytest.raises(KeyboardInterrupt):
                session.close()
        else:
            _interrupt_at(monkeypatch, "open", after=where == "open sent", nth=1 if where == "open sent" else 2)
            with pytest.raises(KeyboardInterrupt):
                model.generate("To be", 6, greedy)
        monkeypatch.undo()
        assert model.generate("To be", 6, greedy).ids == expected  # the model's next step
        assert _sessions_become(swarm.addresses, 0) and not model.swarm.bans
    finally:
        monkeypatch.undo()
        model.close()


def test_ctrl_c_between_a_replys_frames_leaves_no_frame_for_the_next_read(tiny_model_dir, cluster_factory,
                                                                           monkeypatch):
    """The receiving side of the same: Ctrl-C inside pyzmq's recv_multipart, after a reply's
    first frame. Its other frames stayed on the socket and were read as the next reply, which made
    no sense: a healthy node struck for bad_reply. The rest of a message cut short is skipped."""
    import zmq

    greedy = SamplingParams(temperature=0)
    expected = SwarmModel.local(tiny_model_dir).generate("To be", 6, greedy).ids
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    recv, armed = zmq.Socket.recv, [1]

    def recv_or_interrupt(socket: zmq.Socket, *args, **kwargs):
        frame = recv(socket, *args, **kwargs)
        if armed and socket.getsockopt(zmq.RCVMORE) and socket.type == zmq.DEALER:
            armed.clear()
            raise KeyboardInterrupt
        return frame

    monkeypatch.setattr(zmq.Socket, "recv", recv_or_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate("To be", 6, greedy)  # in its first step's reply, a header and a tensor
        assert not armed
        monkeypatch.undo()
        assert model.generate("To be", 6, greedy).ids == expected
        assert not model.swarm.bans and _sessions_become(swarm.addresses, 0)
    finally:
        monkeypatch.undo()
        model.close()


def test_a_read_cut_short_skips_every_frame_left_of_its_message(monkeypatch):
    """recv_whole: Ctrl-C after the first frame of a message of four (a reply with a header and
    several tensors) skips all three that are left, not one: the next read is the next message,
    never the tail of the one cut short (read as a reply, nonsense: a ban of a healthy node)."""
    import zmq

    from nanoswarm.client.frames import recv_whole

    ctx = zmq.Context.instance()
    sender, reader = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        port = reader.bind_to_random_port("tcp://127.0.0.1")
        sender.connect(f"tcp://127.0.0.1:{port}")
        sender.send_multipart([b"header", b"t1", b"t2", b"t3"])
        sender.send_multipart([b"next"])
        assert reader.poll(5000)
        recv, armed = zmq.Socket.recv, [1]

        def recv_or_interrupt(socket: zmq.Socket, *args, **kwargs):
            frame = recv(socket, *args, **kwargs)
            if armed and socket is reader:
                armed.clear()
                raise KeyboardInterrupt
            return frame

        monkeypatch.setattr(zmq.Socket, "recv", recv_or_interrupt)
        with pytest.raises(KeyboardInterrupt):
            recv_whole(reader, copy=True)
        assert not armed
        monkeypatch.undo()
        assert reader.poll(5000)
        assert recv_whole(reader, copy=True) == [b"next"]
    finally:
        sender.close(linger=0)
        reader.close(linger=0)


def test_a_client_process_may_hold_more_than_a_thousand_sockets():
    """libzmq's default of 1,023 sockets a context stopped `load --sessions 200` on 3 nodes with
    "Too many open files" (a review): client links come from a context allowed libzmq's limit."""
    import subprocess
    import sys

    code = """
import resource, zmq
from nanoswarm.client.transport import shared_context
from nanoswarm.descriptors import raise_limit
raise_limit()
ctx = shared_context()
assert ctx.get(zmq.MAX_SOCKETS) == ctx.get(zmq.SOCKET_LIMIT) > 1023
if resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1300:  # a descriptor each (their mailboxes)
    sockets = [ctx.socket(zmq.DEALER) for _ in range(1100)]
    for s in sockets:
        s.close()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_harness_swarms_split_blocks_then_heads():
    """`cluster`, `demo` and `load`: NODES spans of blocks, each one node or a head group."""
    assert swarm_specs(4, 4, 2) == [NodeSpec((0, 2)), NodeSpec((2, 4))]
    assert swarm_specs(4, 3, 2, 2) == [NodeSpec((0, 2), (0, 2)), NodeSpec((0, 2), (2, 3)),
                                       NodeSpec((2, 4), (0, 2)), NodeSpec((2, 4), (2, 3))]
    for args, why in (((4, 4, 5), "--nodes 5: the model has 4 blocks, so from 1 to 4"),
                      ((4, 4, 0), "--nodes 0"), ((4, 4, 1, 5), "--head-groups 5: the model has 4 heads"),
                      ((4, 4, 1, 0), "--head-groups 0")):
        with pytest.raises(ValueError, match=why):
            swarm_specs(*args)


def test_closing_more_sessions_at_once_than_a_peer_may_have_in_flight_frees_them_all(tiny_model_dir,
                                                                                     cluster_factory):
    """A client's closes go out together, their replies unread: past --max-inflight the rest
    were refused `busy`, and their slots and KV budget held until the idle timeout (a review:
    24 of 40 left open). Closes do not count toward the limit."""
    import time

    from nanoswarm.client.transport import PeerConnection

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--max-inflight", "4"])])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    probe = PeerConnection(swarm.addresses[0], timeout=10)
    try:
        n_embd = read_manifest(tiny_model_dir).config.n_embd
        sessions = [model.session(16) for _ in range(12)]
        for s in sessions:
            s.step(torch.randn(1, 2, n_embd))
        assert probe.request("info").fields["sessions"] == 12
        model.close()
        deadline = time.monotonic() + 10
        while probe.request("info").fields["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        info = probe.request("info").fields
        assert info["sessions"] == 0 and "busy" not in info["errors"], info["errors"]
    finally:
        probe.close()


@pytest.mark.parametrize("specs", [[NodeSpec((0, 2)), NodeSpec((2, 4))],
                                   [NodeSpec((0, 4), (0, 2)), NodeSpec((0, 4), (2, 4))]],
                         ids=["layer stages", "a head group"])
def test_a_session_dropped_without_close_is_closed_on_its_nodes(tiny_model_dir, cluster_factory, specs):
    """A hand-stepped session that its caller forgets (no `close`) held a session slot and its KV
    cache on every node until the idle timeout (300 s by default), and its ids in the client until
    the model closed (a soak review). Its stages are closed at the swarm's next step or session."""
    import gc
    import time

    from conftest import sessions_on

    nodes = cluster_factory(tiny_model_dir, specs)

    def sessions_on_nodes() -> list[int]:
        return [sessions_on(address) for address in nodes.addresses]

    model = SwarmModel.connect(tiny_model_dir, peers=nodes.addresses)
    try:
        forgotten = model.session(16)
        forgotten.step(model.client.embed([1, 2, 3], 0))
        assert sessions_on_nodes() == [1, 1]
        del forgotten
        gc.collect()
        model.generate("x", 2, SamplingParams(temperature=0))  # closes its own session too
        deadline = time.monotonic() + 5
        while sessions_on_nodes() != [0, 0] and time.monotonic() < deadline:
            time.sleep(0.1)  # a close is a message: the node reads it soon after
        assert sessions_on_nodes() == [0, 0]
        assert not any(conn.sessions for conn in model.swarm._conns.values())
    finally:
        model.close()


# Mutation review213: gossip, its links, the harness, the daemon's start-up and options.
def test_harness_splits_refuse_more_parts_than_units_and_take_one_head_each():
    """even_split refuses more parts than blocks (bench calls it directly); a head group may split to
    one head a node; a trailing --threads without its value is left to click."""
    from nanoswarm.node.cluster import threads_of

    with pytest.raises(ValueError, match="cannot split 4 blocks over 5 nodes"):
        even_split(4, 5)
    assert swarm_specs(4, 4, 1, 4) == [NodeSpec((0, 4), (h, h + 1)) for h in range(4)]
    assert threads_of(["nanoswarm", "node", "m", "--threads", "2", "--threads"]) == 2  # click says the value is missing


# Review227: a float16 reply comes back in the caller's dtype; a head group that fails to open leaves none open.


@pytest.mark.parametrize("relay", [False, True], ids=["stage by stage", "relayed"])
def test_hidden_states_sent_in_float16_come_back_in_the_callers_dtype(tiny_model_dir, cluster_factory, relay):
    """Over the float16 wire a step's output is the caller's dtype (float32 here), on its device,
    close to the single-process model's: the wire narrows what crosses it, not what the caller
    gets. (Returning the reply's float16 tensor as it was read, a review227 mutation of
    stages.reply_tensors, passed the suite.)"""
    from conftest import TINY

    from nanoswarm.client.swarm import SwarmOptions

    nodes = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    ids = random_ids(6, seed=4)
    options = SwarmOptions(wire="float16", relay=relay)
    with SwarmModel.connect(tiny_model_dir, peers=nodes.addresses, options=options) as model:
        with model.session(6) as session:
            hidden = session.step(model.client.embed(ids.tolist(), 0))
            assert hidden.dtype == torch.float32 and hidden.shape == (1, 6, TINY.n_embd)
            assert session.history[1].tensor().dtype == torch.float32
            want = reference_logits(tiny_model_dir, ids)[-1]
            assert (model.client.logits(hidden) - want).abs().max().item() < 0.05


def test_a_head_group_that_fails_to_open_leaves_no_member_session_open(tiny_model_dir, cluster_factory):
    """A head group's member that is full refuses the open after the other member took it: the
    route fails (no one else serves those heads), and the member that took it holds no session
    for it after (the session closes the stage that failed to open: HeadGroupStage.open closes
    nothing itself). (Not closing it, a review227 mutation of InferenceSession._open_route, passed
    the suite: the member held the slot and KV reservation until its idle timeout.)"""
    from nanoswarm.client.peer_errors import PeerError

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4), (0, 2)),
                                             NodeSpec((2, 4), (2, 4), args=["--max-sessions", "1"])])
    holder = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    other = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        held = holder.session(8)
        with pytest.raises((PeerError, RouteError)):
            other.session(8)
        assert _sessions_become(swarm.addresses, 1)  # the holder's alone
        held.close()
    finally:
        holder.close()
        other.close()
