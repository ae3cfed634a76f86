"""The node's socket loop: one ROUTER socket, polled with a timeout, owned by one thread.

Everything readable is drained before computing, so decode steps of several sessions that
arrive together run as one batch (node/steps.py). Timers (idle-session expiry, gossip) and
other watched sockets (gossip and relay links and their monitors, the connection monitor) are
served between polls, on the same thread, so no socket is ever shared between threads. An idle
node sleeps until its next timer is due or something arrives: on a machine shared with other
nodes, every needless wake-up takes a core from the one that computes (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable

import zmq

from nanoswarm.client.monitors import MonitoredSocket
from nanoswarm.descriptors import ShortageWatch
from nanoswarm.keys.contact import allow_ipv6
from nanoswarm.protocol.errors import ErrorCode
from nanoswarm.protocol.messages import encode

from .connections import ConnectionWatch
from .handler import RequestHandler
from .relay import Relay, RelayLink, RelayLinks
from .sessions import NodeLimits
from .zap import ClientKeys, ZapHandler, sender_key

log = logging.getLogger(__name__)

MAX_SLEEP_MS = 5000  # longest poll; timers, messages, signals and stop() all wake it sooner
MAX_BATCH = 64
# A batch waits for the rest of a burst of decode steps (docs/performance.md) while more
# sessions are active than have sent, as long as messages keep coming less than GATHER_GAP_MS
# apart, and starts no new wait after GATHER_SECONDS or half a forward pass (zmq polls in whole
# milliseconds). A lone session never waits; steps that do not come in bursts cost one gap.
GATHER_SECONDS = 0.003
GATHER_GAP_MS = 1  # sleeping in poll, not spinning: a spin takes the core the sender needs
ZAP_CHECK_SECONDS = 5.0  # how often the node looks whether its ZAP handler still runs
ACTIVE_SECONDS = 1.0  # a session that stepped this recently is expected to step again


def seed_routing_ids() -> None:
    """Make the routing ids libzmq gives connections unguessable. A ROUTER names each connection
    that does not name itself 0x00 plus a counter that starts at libc's rand(), which nothing
    seeds: the same start in every node process. A peer that claims the next ids itself
    (ZMQ_ROUTING_ID) made libzmq assert, and the node abort, when the counter reached them
    (docs/reliability.md). Seeding libc's rand() from os.urandom before the socket is made leaves
    such a peer 64 guesses in 2**32."""
    if os.name == "nt":  # libzmq's rand() is its own C runtime's there: nothing reachable to seed
        return
    try:
        ctypes.CDLL(None).srand(int.from_bytes(os.urandom(4), "little"))
    except (OSError, AttributeError, TypeError) as e:  # no libc symbols to seed: nothing to do
        log.debug("libc srand not reachable: %s", e)


def zmq_max_msgsize(max_message_bytes: int) -> int:
    """ZeroMQ's per-frame limit for a node whose message limit is `max_message_bytes`."""
    return 2 * max_message_bytes


def reply_queue_limit(limits: NodeLimits) -> int:
    """Replies queued for one connection before ZeroMQ drops further ones: a few batches' worth
    of a peer's requests in flight."""
    return max(64, 4 * limits.max_inflight_per_peer)


class NodeServer:
    def __init__(self, handler: RequestHandler, listen: str,
                 curve_secret: bytes | None = None, curve_public: bytes | None = None,
                 allow_keys: set[bytes] | None = None, leave_grace: float = 1.0):
        self.handler = handler
        self.ctx = zmq.Context.instance()
        self._auth = None
        if curve_secret is not None:
            # ZAP: every connection's CURVE key is checked (against --allow-keys, if given) by a
            # handler of our own, in a thread of its own (node/zap.py), bound before our socket
            # exists; every message then carries its sender's key as "User-Id", which is how a
            # session knows that a relayed step comes from the hop its owner pinned
            # (handler._admitted).
            self._auth = ZapHandler(self.ctx, ClientKeys(allow_keys))
            self._auth.start()
        seed_routing_ids()  # before the ROUTER draws its first id
        self.socket = self.ctx.socket(zmq.ROUTER, socket_class=MonitoredSocket)  # (ConnectionWatch's)
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished client must not block us
        # libzmq drops the connection, without a reply, on a frame over MAXMSGSIZE; leave room
        # above our own limit so that most oversized messages get a clear `too_large` reply from
        # decode() (docs/reliability.md).
        self.socket.setsockopt(zmq.MAXMSGSIZE, zmq_max_msgsize(handler.limits.max_message_bytes))
        # Replies a client does not read wait here, in this process's memory: a peer that never
        # reads must not grow it without end (10,000 queued forwards took a node from 244 MiB to
        # ~2 GiB). Past this many, ROUTER drops that peer's replies and the peer times out.
        self.socket.setsockopt(zmq.SNDHWM, reply_queue_limit(handler.limits))
        # Requests queue in libzmq, per connection, until the loop reads them: 10,000 a connection
        # let 200 connections of 22-byte `info` requests take a node to 1.8 GB, never given back
        # (a review). Past this many libzmq stops reading that connection and the sender waits.
        # A node takes max_inflight_per_peer requests of a peer at a time anyway, and a relay
        # link carries at most a step per session the node holds.
        self.socket.setsockopt(zmq.RCVHWM, max(reply_queue_limit(handler.limits), handler.limits.max_sessions))
        if curve_secret is not None:
            self.socket.zap_domain = b"nanoswarm"
            handler.sender_key = sender_key
            handler.groups.checks_keys = True  # a member's partials only with its key (node/all_reduce.py)
            self.socket.curve_secretkey = curve_secret
            self.socket.curve_publickey = curve_public
            self.socket.curve_server = True
        # A client's connection that drops takes its sessions with it (node/connections.py).
        self.connections = ConnectionWatch(self.socket)
        allow_ipv6(self.socket, listen)
        try:
            self.socket.bind(listen)
        except zmq.ZMQError:  # taken, or not ours: nothing of this node may stay (a next one binds ZAP)
            self.connections.close()
            self.socket.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            raise
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.leave_grace = leave_grace
        self._stop = threading.Event()
        self._leave_requested = threading.Event()
        self._timers: list[tuple[float, Callable[[], None], list[float]]] = []
        self._next_timer = float("inf")  # the earliest due of _timers (the loop looks at it every turn)
        self.on_leave: list[Callable[[], None]] = []  # e.g. publish a departure record
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._watched: dict[zmq.Socket, Callable[[], object]] = {}
        # Signals and stop() write a byte here, so a long poll ends at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._signal_wakeups = False
        self.watch(self.connections.monitor, self._drop_connections)
        self.add_timer(min(5.0, max(0.1, handler.limits.idle_timeout / 4)), handler.expire_idle)
        self.failure: str | None = None  # why serve_forever stopped, if the node cannot go on
        if self._auth is not None:
            self.add_timer(ZAP_CHECK_SECONDS, self._check_zap)
        self.relays = RelayLinks(self.ctx, (curve_public, curve_secret) if curve_secret is not None else None,
                                 error=handler.steps.error)
        self.relays.on_open = self._watch_relay
        self.relays.on_close = self._unwatch_relay
        self.each_second: list[Callable[[], object]] = []  # e.g. the gossip's check that the node ran
        self.after_batch: list[Callable[[], object]] = []  # e.g. the torch threads' check (node/threads.py)
        self.add_timer(1.0, self._each_second)
        self.add_timer(5.0, ShortageWatch().check)  # out of file descriptors: said, at most once a minute
        handler.on_relay_to = self.relays.connect
        handler.groups.send = self._send_all  # a member's partials, each as soon as it is computed

    def add_timer(self, every: float, fn: Callable[[], object]) -> None:
        self._timers.append((every, fn, [time.monotonic() + every]))
        self._next_timer = min(self._next_timer, self._timers[-1][2][0])

    def watch(self, sock: zmq.Socket, on_readable: Callable[[], object]) -> None:
        """Call `on_readable` from the loop whenever `sock` (owned by this thread) has input."""
        self._watched[sock] = on_readable
        self._poller.register(sock, zmq.POLLIN)

    def unwatch(self, sock: zmq.Socket) -> None:
        if self._watched.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def _watch_relay(self, link: RelayLink) -> None:
        self.watch(link.socket, lambda: self._send_all(self.relays.bounced(link)))
        self.watch(link.monitor, lambda: (self.relays.events(link), self._send_all([])))
        self.handler.extra_info["relay_links"] = len(self.relays)

    def _unwatch_relay(self, link: RelayLink) -> None:
        self.unwatch(link.socket)
        self.unwatch(link.monitor)
        self.handler.extra_info["relay_links"] = len(self.relays)

    def stop(self) -> None:
        """Stop at once (tests, Ctrl-C)."""
        self._stop.set()
        self._wake()

    @property
    def leaving(self) -> bool:
        return self._leave_requested.is_set()

    def leave(self) -> None:
        """Graceful leave (SIGTERM): refuse new sessions, tell clients, drain, then stop."""
        self._leave_requested.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # a closed terminal too
            signal.signal(signum, lambda *_: self.leave())
        # A signal arriving during poll() runs its handler only when poll returns; the wake-up fd
        # makes it return at once.
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signal_wakeups = True

    def serve_forever(self) -> None:
        deadline = None
        log.info("serving %s on %s", self.handler.peer_id, self.address)
        try:
            while not self._stop.is_set():
                if self._leave_requested.is_set() and deadline is None:
                    deadline = time.monotonic() + self._begin_leaving()
                if deadline is not None and time.monotonic() >= deadline:
                    break
                ready = dict(self._poller.poll(self._sleep_ms(deadline)))
                if self.socket in ready:
                    self._serve_ready()
                for sock in ready:  # (in the order registered: zmq_poll answers so)
                    on_readable = self._watched.get(sock)  # (an earlier callback may have closed it)
                    if on_readable is not None:
                        on_readable()
                if self._wake_r.fileno() in ready:
                    self._drain_wakeups()
                if self.handler.groups.steps:  # all-reduce steps that waited too long for a partial
                    self._send_all(self.handler.groups.expire())
                self._run_timers()
        finally:
            self.close()

    def _sleep_ms(self, deadline: float | None) -> int:
        """Until the next timer (or the end of a leave), in whole ms, rounded up."""
        due = min(self._next_timer, time.monotonic() + MAX_SLEEP_MS / 1000)
        if deadline is not None:
            due = min(due, deadline)
        waiting = self.handler.groups.next_deadline()
        if waiting is not None:
            due = min(due, waiting)
        return max(0, min(MAX_SLEEP_MS, int((due - time.monotonic()) * 1000) + 1))

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # nothing left
            pass

    def _serve_ready(self) -> None:
        batch: list = []
        self._drain(batch)
        self._gather(batch)
        gone = self.connections.note(batch)  # (new peers: drops read first, node/connections.py)
        self._send_all(self.handler.handle_batch(batch))
        if gone:  # after the batch: an `open` a dropped client sent just before would stay open
            self.handler.peers_gone(gone)
        if self.handler.device_failure is not None and self.failure is None:
            # Its clients got `internal` and fail over; without leaving, the node would stay in
            # every peer's table and on new routes, failing every step it is sent.
            self.failure = f"the device failed ({self.handler.device_failure}): this node can compute no more"
            log.error("%s; leaving", self.failure)
            self.leave()
        _call_each(self.after_batch)

    def _drain(self, batch: list) -> None:
        # Asking for EVENTS, not reading until zmq.Again: an exception per batch is slow to raise
        # in a process that wakes with cold caches (docs/performance.md).
        while len(batch) < MAX_BATCH and self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            if len(frames) < 2:  # a ROUTER message is [peer identity, header, ...]
                continue
            batch.append((frames[0].bytes, frames[1:]))

    def _gather(self, batch: list) -> None:
        """Wait briefly for the rest of a burst: the steps of sessions driven together (one client
        stepping several sessions, or a previous stage answering a batch) reach us a little
        apart, and one forward pass for all costs about what one costs for one (decode reads
        every weight either way)."""
        if len(batch) >= len(self.handler.sessions.sessions):  # (a message a session already: no more to come)
            return
        since = time.monotonic() - ACTIVE_SECONDS
        active = sum(1 for s in self.handler.sessions.sessions.values() if s.last_used > since)
        stats = self.handler.stats
        wait = min(GATHER_SECONDS, 0.5 * stats.busy_seconds / stats.steps if stats.steps else 0.0)
        deadline = time.perf_counter() + wait
        while len(batch) < min(active, MAX_BATCH) and time.perf_counter() < deadline:
            if not self.socket.poll(GATHER_GAP_MS):
                break  # the burst is over
            self._drain(batch)

    def _drop_connections(self) -> None:
        gone = self.connections.dropped()
        if gone:
            self.handler.peers_gone(gone)

    def _send_all(self, replies: list) -> None:
        for to, frames in replies:
            if isinstance(to, Relay):  # a relayed step on to its next hop (node/relay.py)
                why = self.relays.send(to, frames)
                if why is not None:
                    self._send(to.owner, self.handler.steps.error(to.reply, ErrorCode.RELAY_FAILED, why))
            else:
                self._send(to, frames)
        for owner, frames in self.relays.take_failed():  # steps lost with a link closed meanwhile
            self._send(owner, frames)

    def _send(self, peer: bytes, frames: list) -> None:
        try:
            self.socket.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as e:  # peer gone: its loss, not ours
            log.debug("reply to a vanished peer dropped: %s", e)

    def _check_zap(self) -> None:
        """A node whose ZAP handler ended takes no new connection, ever (each waits for an
        answer): it leaves (telling its clients and peers) and stops with the reason, rather than
        serve on unreachable."""
        if not self._auth.alive and self.failure is None:
            self.failure = (f"the ZAP handler thread ended ({self._auth.why_ended}): this node can take no "
                            "new connection")
            self.leave()  # its clients and peers are told, as on SIGTERM

    def _each_second(self) -> None:
        """The node's one-second chores, each on its own: one that fails (logged) stops no other,
        the gossip's check that the node ran among them (review144)."""
        # (_send_all of nothing: the steps of relay links that expire closed, answered relay_failed)
        _call_each((self.relays.expire, functools.partial(self._send_all, []), self.handler.groups.forget_stale,
                    *self.each_second))

    def _run_timers(self) -> None:
        now = time.monotonic()
        if now < self._next_timer:  # (most turns: a step's, before any timer is due)
            return
        for every, fn, due in self._timers:
            if now >= due[0]:
                due[0] = now + every
                try:
                    fn()
                except Exception:
                    log.exception("timer %s failed", getattr(fn, "__name__", fn))
        self._next_timer = min(d[0] for _, _, d in self._timers)

    def _begin_leaving(self) -> float:
        """Tell every client with an open session that we are going; returns the grace time."""
        self.handler.leaving = True
        peers: dict[bytes, list[str]] = {}
        for session in self.handler.sessions.sessions.values():
            peers.setdefault(session.peer, []).append(session.id)
        for peer, sessions in peers.items():
            self._send(peer, encode("leaving", 0, {"sessions": sessions}))
        log.info("leaving: told %d clients, draining for %.1fs", len(peers), self.leave_grace)
        for hook in self.on_leave:
            hook()
        return self.leave_grace if peers else min(self.leave_grace, 0.2)

    def close(self) -> None:
        if self._signal_wakeups:
            signal.set_wakeup_fd(-1)  # before its socket closes
        self._wake_r.close()
        self._wake_w.close()
        self.relays.close()
        self.connections.close()
        self.socket.close(linger=200)
        if self._auth is not None:
            self._auth.stop()


def _call_each(fns: Iterable[Callable[[], object]]) -> None:
    """Call each of `fns` on its own: one that fails (logged) stops no other."""
    for fn in fns:
        try:
            fn()
        except Exception:
            log.exception("%s failed", getattr(fn, "__name__", fn))
