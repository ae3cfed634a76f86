"""A client's link to one peer: a DEALER socket, request ids, explicit timeouts with poll."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import Any

import torch
import zmq

from nanoswarm.keys.contact import allow_ipv6, split_contact
from nanoswarm.protocol.errors import ProtocolError
from nanoswarm.protocol.messages import REPLY_TYPES, Message, decode, encode

from .frames import recv_whole, send_whole
from .link_drops import LinkDrops
from .link_sessions import LinkSessions, next_request_id
from .monitors import MonitoredSocket, monitor_socket
from .peer_errors import (
    HANDSHAKE_FAILURES,
    LinkClosed,
    PeerError,
    PeerTimeout,
)

log = logging.getLogger(__name__)

_link_serials = itertools.count()
DEFAULT_TIMEOUT = 30.0
# The largest frame a peer may send us; libzmq drops the connection on a bigger one, before it is
# buffered. Twice a node's default message limit (64 MiB), as nodes set for what they receive.
MAX_FRAME_BYTES = 128 * 1024 * 1024
# A connection to an address where nothing listens is retried, and every retry is an event on its
# monitor. Events wait in the monitor's queue until read: when it had a bound (libzmq's 1,000),
# libzmq's I/O thread blocked on it, and every socket of the context stalled: a node with a
# gossip link to a departed peer stopped answering anyone after a few minutes
# (docs/reliability.md). The queue has no bound now (client/monitors.py); retries back off to
# this interval (not those whose handshake fails: ~40 events a second), and whoever holds idle
# connections reads their events (drain_events).
RECONNECT_MAX_MS = 10_000
# A peer that stops without closing its connection (a frozen process, a machine that left the
# network) says nothing; a request to it would wait its whole timeout. With heartbeats, ZeroMQ's
# I/O thread pings the peer (the peer's own I/O thread answers, even in the
# middle of a forward pass) and drops the connection when nothing at all has come back for the
# heartbeat, as a closed one: the monitor reports it at once. Nothing counts while one frame is
# still arriving (libzmq cancels the wait per whole frame), so tensors travel in frames of at most
# 256 KiB (protocol/messages.py PART_BYTES): 2 s at 1 Mbit/s, well within the default heartbeat
# of 5 s or more (SwarmOptions.silence; a heartbeat set shorter by hand is the user's choice).
# Pings go every quarter heartbeat: a peer that stops is noticed within 1-1.25 heartbeats.
# The most messages one take() reads: a peer that sends without end (late replies, notices)
# kept its reader in take() past any deadline of its caller (review103).
MAX_TAKE_READS = 1024


@functools.cache
def shared_context() -> zmq.Context:
    """The process's ZeroMQ context, allowed as many sockets as libzmq can hold. Its default of
    1,023 stopped `load --sessions 200` on 3 nodes with "Too many open files" whatever the
    descriptor limit (a link is a socket and its monitor). Takes effect only before the context's
    first socket, so it is set on first use."""
    ctx = zmq.Context.instance()
    try:
        ctx.set(zmq.MAX_SOCKETS, ctx.get(zmq.SOCKET_LIMIT))
    except zmq.ZMQError:  # an old libzmq without the options: its default stays
        pass
    return ctx


class PeerConnection(LinkSessions, LinkDrops):
    """Requests to one peer. Not thread-safe: one connection per thread, as ZeroMQ wants. What
    its monitor says of drops is `LinkDrops`' (client/link_drops.py); the sessions opened over it
    are `LinkSessions`' (client/link_sessions.py)."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT,
                 server_key: bytes | None = None, client_keys: tuple[bytes, bytes] | None = None,
                 ctx: zmq.Context | None = None, max_frame: int = MAX_FRAME_BYTES,
                 heartbeat: float | None = None, forgive_idle_drops: bool = False,
                 reconnect_max_ms: int = RECONNECT_MAX_MS, node_side: bool = False):
        self.address = address
        self.node_side = node_side  # a node's own link (gossip): its refused key is a node's
        self.timeout = timeout
        # `address` may be a contact string (endpoint#key, keys/contact.py): it carries the key.
        endpoint, contact_key = split_contact(address)
        server_key = server_key if server_key is not None else contact_key
        self.server_key = server_key  # z85, or None: no CURVE on this link
        self.socket = (ctx or shared_context()).socket(zmq.DEALER, socket_class=MonitoredSocket)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_frame)  # per frame: libzmq bounds nothing else
        if server_key is not None:  # CURVE: only the holder of the node's secret can answer
            public, secret = client_keys or zmq.curve_keypair()
            self.socket.curve_serverkey = server_key
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
        # A peer that dies closes its TCP connection: the monitor reports that at once, so a
        # killed peer costs milliseconds, not the whole timeout. So does an address where nothing
        # listens (a record of a peer that died or moved): its connect is refused and retried.
        self.monitor = monitor_socket(self.socket, zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED
                                      | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILURES)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_max_ms)
        if heartbeat is not None:
            self.socket.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat * 1000 / 4))
            self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat * 1000))
            # Heartbeats start after the handshake: a peer frozen before it (its kernel still
            # takes the TCP connection) gets as long to finish the handshake, not 30 s; and a
            # connect that nothing answers (an address that drops packets: a wrong --advertise)
            # as long, not the kernel's ~2 minutes of SYN retries, which cost every client that
            # picked such a record its whole timeout (review92).
            self.socket.setsockopt(zmq.HANDSHAKE_IVL, int(heartbeat * 1000))
            self.socket.setsockopt(zmq.CONNECT_TIMEOUT, int(heartbeat * 1000))
        self._init_drops(heartbeat, forgive_idle_drops)
        self.serial = next(_link_serials)  # this link among every one made (peer_process)
        self._poller = zmq.Poller()
        self.register(self._poller)
        allow_ipv6(self.socket, endpoint)
        self.socket.connect(endpoint)
        self._endpoint = endpoint
        self.leaving = False  # set when the peer announced it is going away
        self.bytes_sent = 0
        self.bytes_received = 0
        self.busy_seconds = 0.0  # compute the peer reported in its replies (busy_us)
        # Sessions opened over this connection and not closed (client/stages.py): only this
        # connection can close them (a node takes `close` from a session's own client), so a
        # ban that drops it closes them first (Swarm.ban).
        self.sessions: set[str] = set()
        # Opens given up on (interrupted, timed out) by request id: the session each may have
        # opened on the node is closed when its late `opened` is read (take, open_session).
        self._orphans: dict[int, None] = {}
        self._early: dict[tuple, tuple[int, float]] = {}  # opens sent ahead (client/link_sessions.py)
        self._unwanted: list[int] = []  # request ids of opens sent ahead for a plan that changed since
        self.open_sent = 0.0  # when the open of the last session opened went out (idle_clock)
        self._unread: list | None = None  # a reply whose reading Ctrl-C cut short (_read)
        # The last `opened` read, (request id, session): one read and then cut short (Ctrl-C) on
        # its way back to open_session is closed there (review164: it stayed open on the node).
        self.last_opened: tuple[int, str] | None = None
        # The last request whose answer take() read (an error reply too): an open refused is no
        # orphan, nothing will come for it (review204: one refused `busy` kept its link in use).
        self.answered: int | None = None
        self.closes_queued = False  # a `close` was sent: closing the socket must let it leave
        self.strays = 0  # messages take() read that were not the reply it looked for

    def register(self, poller: zmq.Poller) -> None:
        """Have `poller` wake for this connection's replies and for its drop."""
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)

    def send(self, msg_type: str, fields: dict[str, Any] | None = None,
             tensors: list[torch.Tensor] | tuple = (), wire: str = "float32", req_id: int | None = None,
             timeout: float | None = None) -> int:
        """Queue a request; returns its id. Waits at most `timeout` (default: the connection's) for
        room to queue it, then raises PeerTimeout: a DEALER has nowhere to queue once ZeroMQ has
        dropped a connection whose handshake the peer refused (a key not on its allow list, a
        wrong server key), and a plain send would then block forever."""
        self._check_open()
        self._drops_before_send()
        req_id = next_request_id() if req_id is None else req_id
        frames = encode(msg_type, req_id, fields, tensors, wire)
        if not self._queue(frames):
            self._wait_to_queue(frames, self.timeout if timeout is None else timeout)
        self.bytes_sent += sum(len(f) for f in frames)
        return req_id

    def _wait_to_queue(self, frames: list, wait: float) -> None:
        """Queue `frames` within `wait` seconds, or raise why not: the drop the monitor read (a
        refused handshake, once its retries have dropped the connection: a client whose send
        came after it was told only "no connection to queue the request on", a CI run), else
        PeerTimeout. The monitor is read every 0.1 s meanwhile."""
        deadline = time.monotonic() + wait
        while True:
            self.drain_events(awaiting=True)
            if self._dropped is not None:
                raise self._report_drop()
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(self.address, wait, "no connection to queue the request on")
            if self.socket.poll(max(1, int(min(left, 0.1) * 1000)), zmq.POLLOUT) and self._queue(frames):
                return

    def _queue(self, frames: list) -> bool:
        """Hand `frames` to ZeroMQ without blocking; False when it has no room for them."""
        try:
            send_whole(self.socket, frames)
        except zmq.Again:
            return False
        return True

    def recv(self, req_id: int, expect: str, timeout: float | None = None) -> Message:
        """The reply to `req_id`, of type `expect`; raises PeerError for an error reply or one of
        another type, PeerTimeout after timeout."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            # take() first: a drop that send() read has no event left to wake the poll (a review)
            msg = self.take(req_id, expect)
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(self.address, timeout)
            self._poller.poll(max(1, int(self.poll_limit(left) * 1000)))

    def take(self, req_id: int, expect: str) -> Message | None:
        """The reply to `req_id` if it has come (an error reply, or one that is not of type
        `expect`, raises PeerError), without waiting;
        other messages read meanwhile are notices or late replies, and are dropped. A drop of the
        connection raises PeerError("disconnected") once (the socket reconnects by itself), after
        the replies that came before it. None, too, after MAX_TAKE_READS messages that were not
        it: the caller's deadline decides whether to look again."""
        self._check_open()
        for _ in range(MAX_TAKE_READS):
            if self._unread is not None or self.socket.get(zmq.EVENTS) & zmq.POLLIN:
                msg = self._read()
                if msg is not None and msg.id == req_id:  # else a late reply to a request we gave up on
                    self.answered = req_id
                    if msg.type == "error":
                        raise PeerError(self.address, msg.fields["code"], msg.fields["message"])
                    if msg.type != expect:  # its fields are not the ones the caller reads (a review)
                        raise PeerError(self.address, "bad_reply", f"answered {msg.type!r} where {expect!r} was due")
                    return msg
                if msg is not None and msg.id in self._orphans:
                    self._orphan_answered(msg)
                self.strays += 1
                continue
            self.drain_events(awaiting=True)
            if self.socket.get(zmq.EVENTS) & zmq.POLLIN:  # replies that came first still count
                continue
            if (drop := self._due_drop()) is not None:
                raise drop
            return None
        return None  # a flood: the caller's deadline comes first

    def timed_request(self, msg_type: str, fields: dict[str, Any] | None = None,
                      timeout: float | None = None) -> tuple[Message, float]:
        """`request`, and its round trip in seconds, timed once the connection's handshake is
        done: the first request on a fresh connection also waits for the TCP connect and CURVE's
        handshake, 0.7-9 ms on loopback against 0.35 ms after it, which put like peers outside
        the time that routes tie within (review99). One `timeout` for both waits."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.wait_handshake(timeout)
        t0 = time.perf_counter()
        try:
            reply = self.request(msg_type, fields, timeout=max(0.0, deadline - time.monotonic()))
        except PeerTimeout:
            raise PeerTimeout(self.address, timeout) from None  # the whole wait, not what was left of it
        return reply, time.perf_counter() - t0

    def _check_open(self) -> None:
        """A connection closed here (its peer was banned, by another session of the same swarm
        perhaps) fails like a dropped one, so the session that still uses it fails over."""
        if self.socket.closed:
            raise LinkClosed(self.address)

    def _read(self) -> Message | None:
        frames, self._unread = self._unread or recv_whole(self.socket), None
        try:
            msg = decode(frames, finite=True)  # peers are untrusted: no NaN or Inf gets past here
        except ProtocolError as e:
            raise PeerError(self.address, "bad_reply", e.message) from None
        except BaseException:  # Ctrl-C while decoding: the reply is read again (a late `opened`)
            self._unread = frames
            raise
        self.bytes_received += sum(len(f) for f in frames)
        if msg.type == "opened" and isinstance(session := msg.fields.get("session"), str):
            self.last_opened = (msg.id, session)
        if msg.type == "leaving":
            listed = msg.fields.get("sessions")
            # A notice naming only sessions closed since is stale: read after a reconnect, it
            # came from the process before, and banned the one that now listens (a review).
            if listed is None or any(isinstance(s, str) and s in self.sessions for s in listed):
                self.leaving = True
                log.info("%s announced it is leaving", self.address)
            return None
        busy = msg.fields.get("busy")  # a relayed step's result: every hop's busy_us
        if isinstance(busy, list):
            self.busy_seconds += sum(b for b in busy if type(b) is int) / 1e6
        elif type(busy := msg.fields.get("busy_us")) is int:
            self.busy_seconds += busy / 1e6
        return msg

    def request(self, msg_type: str, fields: dict[str, Any] | None = None,
                tensors: list[torch.Tensor] | tuple = (), wire: str = "float32",
                timeout: float | None = None, req_id: int | None = None) -> Message:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout  # one timeout for queueing and answering together
        req_id = self.send(msg_type, fields, tensors, wire, req_id, timeout=timeout)
        try:
            return self.recv(req_id, REPLY_TYPES[msg_type], max(0.0, deadline - time.monotonic()))
        except PeerTimeout:
            raise PeerTimeout(self.address, timeout) from None

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; with `linger_ms`, messages still queued get that long to leave."""
        if self.socket.closed:
            return
        self.socket.close(linger=linger_ms)  # (its monitor stopped first: client/monitors.py)

