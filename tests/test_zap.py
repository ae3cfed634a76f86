"""The node's ZAP handler (node/zap.py): which CURVE clients connect, the key their messages
carry, answers to malformed requests, a stop that never blocks (pyzmq's ThreadAuthenticator hung
a node on SIGTERM in its stop), and a node that leaves with the reason when its handler has
ended. Real CURVE sockets in this process."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import zmq

from nanoswarm.node import server as server_module
from nanoswarm.node.zap import ZapHandler
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks

ALLOWED_PUBLIC, ALLOWED_SECRET = zmq.curve_keypair()
REFUSED_PUBLIC, REFUSED_SECRET = zmq.curve_keypair()


def curve_server(ctx: zmq.Context) -> tuple[zmq.Socket, str, bytes]:
    public, secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.ROUTER)
    sock.zap_domain, sock.curve_secretkey, sock.curve_publickey, sock.curve_server = b"nanoswarm", secret, public, True
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT), public


def say_hello(ctx: zmq.Context, endpoint: str, server_key: bytes, public: bytes, secret: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
    sock.linger = 0
    sock.connect(endpoint)
    sock.send(b"hello")
    return sock


def test_only_allowed_keys_connect_and_their_messages_carry_their_key():
    ctx = zmq.Context()
    zap = ZapHandler(ctx, lambda key: key == ALLOWED_PUBLIC)
    zap.start()
    server, endpoint, server_key = curve_server(ctx)
    clients = zmq.Context()
    try:
        refused = say_hello(clients, endpoint, server_key, REFUSED_PUBLIC, REFUSED_SECRET)
        for _ in range(50):  # many handshakes in a row, each answered
            allowed = say_hello(clients, endpoint, server_key, ALLOWED_PUBLIC, ALLOWED_SECRET)
            assert server.poll(5000), "an allowed client's message did not arrive"
            frames = server.recv_multipart(copy=False)
            assert frames[1].bytes == b"hello" and frames[1].get("User-Id") == ALLOWED_PUBLIC.decode()
            allowed.close()
        assert not server.poll(300)  # the refused client's hello never came
        refused.close()
        assert zap.alive
    finally:
        server.close()
        zap.stop()
        clients.destroy(linger=0)  # its sockets too: term() waited for them after a failed assertion
        ctx.term()
    assert not zap.alive


def test_every_request_gets_an_answer_with_its_id():
    key = bytes(range(32))
    checked: list[bytes] = []

    def allowed(z85_key: bytes) -> bool:
        checked.append(z85_key)
        if len(checked) == 3:
            raise ValueError("a bug in the check")
        return len(checked) == 1

    zap = ZapHandler(zmq.Context.instance(), allowed)
    ok = [b"1.0", b"7", b"nanoswarm", b"127.0.0.1", b"", b"CURVE", key]
    assert zap.answer(ok) == [b"1.0", b"7", b"200", b"OK", zmq.utils.z85.encode(key), b""]
    assert zap.answer(ok)[2:4] == [b"400", b"Unknown key"]
    assert zap.answer(ok)[2] == b"500"  # the check raised: answered, not lost
    for bad in ([b"1.0", b"8", b"d", b"a", b"", b"PLAIN", b"user", b"password"], [b"2.0", *ok[1:]],
                [*ok[:6], key[:31]], [*ok, b"more"], [b"1.0", b"9"],
                [*ok[:5], b"NULL", key]):  # another mechanism, of CURVE's shape (review206)
        reply = zap.answer(bad)
        assert reply[1] == bad[1] and reply[2] == b"400" and reply[4] == b""
    assert zap.answer([b"1.0"])[1:3] == [b"", b"400"]
    assert len(checked) == 3  # malformed requests never reach the check


def test_stop_returns_when_the_thread_has_ended_on_its_own():
    """pyzmq's authenticator stopped by a blocking send on its pipe: with the thread gone, SIGTERM
    left the node hanging there."""
    ctx = zmq.Context()
    zap = ZapHandler(ctx, lambda key: True)
    zap.start()
    zap._pipe.send(b"stop")  # the thread ends, behind stop()'s back
    deadline = time.monotonic() + 5
    while zap.alive and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not zap.alive
    t0 = time.monotonic()
    zap.stop()
    zap.stop()  # twice: nothing left to do
    assert time.monotonic() - t0 < 1.0
    ctx.term()


def test_a_node_whose_zap_handler_ended_stops_with_the_reason(tiny_model_dir, monkeypatch):
    from nanoswarm.node.handler import RequestHandler
    from nanoswarm.node.sessions import NodeLimits

    monkeypatch.setattr(server_module, "ZAP_CHECK_SECONDS", 0.1)
    handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "a",
                             NodeLimits())
    public, secret = zmq.curve_keypair()
    node = server_module.NodeServer(handler, "tcp://127.0.0.1:*", curve_secret=secret, curve_public=public)
    serving = threading.Thread(target=node.serve_forever, daemon=True)
    serving.start()
    try:
        time.sleep(0.3)
        assert serving.is_alive() and node.failure is None  # a live handler: nothing to report
        node._auth.stop()  # as if its thread had ended
        serving.join(5)
        assert not serving.is_alive()
        assert node.failure is not None and "ZAP" in node.failure
    finally:
        node.stop()
        serving.join(5)


@pytest.mark.parametrize("taken", [True, False])
def test_a_second_handler_in_one_context_fails_to_start(taken):
    ctx = zmq.Context()
    first = ZapHandler(ctx, lambda key: True)
    if taken:
        first.start()
    second = ZapHandler(ctx, lambda key: True)
    try:
        if taken:
            with pytest.raises(RuntimeError, match="ZAP handler"):
                second.start()
        else:
            second.start()
            assert second.alive
    finally:
        first.stop()
        second.stop()
        ctx.term()


def test_handlers_started_one_after_another_in_one_context():
    """libzmq frees an inproc endpoint when it reaps the socket, after close() returns: a handler
    started right after another one stopped found the endpoint taken (a review: 39 of 6,000)."""
    ctx = zmq.Context()
    try:
        for _ in range(500):
            zap = ZapHandler(ctx, lambda key: True)
            zap.start()
            zap.stop()
    finally:
        ctx.term()


def test_a_node_that_cannot_bind_leaves_no_zap_handler_behind(tiny_model_dir):
    """Its ZAP handler starts before its socket binds: a bind that fails (the port is taken) must
    stop it, or the next node of the process finds ZAP's endpoint taken (a review)."""
    import socket

    from nanoswarm.node.handler import RequestHandler
    from nanoswarm.node.sessions import NodeLimits

    handler = RequestHandler(load_blocks(tiny_model_dir, 0, 4), read_manifest(tiny_model_dir).model_id, "a",
                             NodeLimits())
    public, secret = zmq.curve_keypair()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(zmq.ZMQError):
            server_module.NodeServer(handler, f"tcp://127.0.0.1:{taken.getsockname()[1]}", curve_secret=secret,
                                     curve_public=public)
    node = server_module.NodeServer(handler, "tcp://127.0.0.1:*", curve_secret=secret, curve_public=public)
    node.close()


def test_refused_keys_are_named_once_an_hour_and_at_most_64(caplog):
    """How an operator finds a mistyped or missing key; clients without --key-file bring a fresh
    key per link, so the names are capped (and forgotten after an hour)."""
    from nanoswarm.node.zap import ClientKeys

    keys = [zmq.curve_keypair()[0] for _ in range(70)]
    check = ClientKeys({keys[0]})
    with caplog.at_level(logging.WARNING, logger="nanoswarm.node.zap"):
        assert check(keys[0])
        assert not any(check(k) for k in keys[1:] + keys[1:3])  # 69 strangers, two of them again
    named = [r.getMessage() for r in caplog.records if "refused CURVE key" in r.getMessage()]
    assert len(named) == 64 and "that makes 64" in named[-1] and "that makes" not in named[0]
    caplog.clear()
    check.refused = {k: t - 3601 for k, t in check.refused.items()}  # an hour later
    with caplog.at_level(logging.WARNING, logger="nanoswarm.node.zap"):
        assert not check(keys[1])
    assert len(caplog.records) == 1


def test_an_empty_allow_list_admits_no_one():
    """`ClientKeys(set())` is a list that names no one, not "no list" (None, which admits any
    key): review206's mutation `not self.keys` passed the tests before."""
    from nanoswarm.node.zap import ClientKeys

    key = zmq.curve_keypair()[0]
    assert not ClientKeys(set())(key)
    assert ClientKeys(None)(key) and ClientKeys({key})(key)


def test_a_handler_whose_thread_fails_to_set_up_fails_to_start_and_does_not_hang():
    """Review206: only a ZMQError in the thread's set-up was caught; any other exception ended
    the thread before it said it was ready, and start() waited for good."""

    class Failing(zmq.Context):
        made = 0

        def socket(self, *args, **kwargs):
            Failing.made += 1
            if Failing.made == 2:  # the thread's first socket (the first is start()'s pipe)
                raise MemoryError("no memory for a socket")
            return super().socket(*args, **kwargs)

    ctx = Failing()
    zap = ZapHandler(ctx, lambda key: True)
    outcome: list = []

    def start() -> None:
        try:
            zap.start()
            outcome.append("started")
        except RuntimeError as e:
            outcome.append(str(e))

    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    starting.join(10)
    try:
        assert outcome == ["ZAP handler: no memory for a socket"]
        assert not zap.alive
    finally:
        zap.stop()
        ctx.term()


# Review228: mutations of node/zap.py that passed the tests above.


def test_a_flood_of_refused_keys_keeps_at_most_64_names_and_says_so_once(caplog):
    """Fresh keys past the cap are neither kept nor named (`refused` stays at MAX_LOGGED: the
    lead of review228, dropping the check after the trim, let it grow with each key), a key
    refused again within the hour is not named again, and only the 64th name says the cap was
    reached (mutation: `len(...) >= MAX_LOGGED - 1` said it twice)."""
    from nanoswarm.node.zap import ClientKeys

    check = ClientKeys(set())
    keys = [zmq.curve_keypair()[0] for _ in range(3 * ClientKeys.MAX_LOGGED)]
    with caplog.at_level(logging.WARNING, logger="nanoswarm.node.zap"):
        assert not any(check(k) for k in keys)
        assert len(check.refused) == ClientKeys.MAX_LOGGED
        caplog.clear()
        assert not any(check(k) for k in keys[:3] + keys[-3:])  # named already; past the cap
    assert not caplog.records and len(check.refused) == ClientKeys.MAX_LOGGED
    assert set(check.refused) == set(keys[:ClientKeys.MAX_LOGGED])
    with caplog.at_level(logging.WARNING, logger="nanoswarm.node.zap"):
        check = ClientKeys(set())
        for k in keys[:ClientKeys.MAX_LOGGED]:
            check(k)
    assert [i for i, r in enumerate(caplog.records) if "that makes" in r.getMessage()] == [ClientKeys.MAX_LOGGED - 1]


def test_a_check_that_raises_any_exception_is_answered_500():
    """Not only ValueError (the test above): a KeyError in the check is answered too (mutation:
    `except ValueError`)."""
    zap = ZapHandler(zmq.Context.instance(), lambda key: {}[key])
    request = [b"1.0", b"3", b"nanoswarm", b"127.0.0.1", b"", b"CURVE", bytes(32)]
    assert zap.answer(request)[1:4] == [b"3", b"500", b"internal error"]


def test_a_handler_thread_that_fails_says_why_it_ended(monkeypatch):
    """Any exception in the answering loop is kept for the node to report (NodeServer's ZAP
    check names `why_ended`); mutation: `except zmq.ZMQError` let it out of the thread, and the
    handler said it had merely "stopped"."""
    ctx, clients = zmq.Context(), zmq.Context()
    zap = ZapHandler(ctx, lambda key: True)

    def broken(request):
        raise RuntimeError("a broken answer")

    monkeypatch.setattr(zap, "answer", broken)
    zap.start()
    server, endpoint, server_key = curve_server(ctx)
    try:
        hello = say_hello(clients, endpoint, server_key, ALLOWED_PUBLIC, ALLOWED_SECRET)  # a handshake to answer
        deadline = time.monotonic() + 5
        while zap.alive and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not zap.alive and zap.why_ended == "RuntimeError: a broken answer"
        hello.close()
    finally:
        server.close()
        zap.stop()
        clients.destroy(linger=0)
        ctx.term()


def test_a_handler_that_fails_to_start_leaves_no_socket_behind():
    """A start that fails closes the handler's pipe itself: when ZAP's endpoint is taken (the
    thread fails; mutation: start() without its stop()) and when the pipe's own endpoint is
    (mutation: the bind's failure without close()). The context then terminates without a
    stop() of the failed handler."""
    ctx = zmq.Context()
    first = ZapHandler(ctx, lambda key: True)
    first.start()
    second, third = ZapHandler(ctx, lambda key: True), ZapHandler(ctx, lambda key: True)
    third._pipe_endpoint = first._pipe_endpoint
    try:
        for failing in (second, third):
            with pytest.raises(RuntimeError, match="ZAP handler"):
                failing.start()
            assert failing._pipe is None and not failing.alive
    finally:
        first.stop()
        for failing in (second, third):
            if failing._pipe is not None:  # a mutation's: else term() waits for it
                failing._pipe.close()
        ctx.term()
