"""The node's socket loop: one ROUTER socket, polled with a timeout, owned by one thread.

Everything readable is drained before computing, so decode steps of several sessions that
arrive together run as one batch (node/handler.py). Timers (idle-session expiry, gossip) run
between polls, on the same thread, so no socket is ever shared between threads.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import zmq

from nanoswarm.protocol.messages import encode

from .handler import RequestHandler

log = logging.getLogger(__name__)

POLL_MS = 50
MAX_BATCH = 64
# A batch waits for the rest of a burst of decode steps (docs/performance.md) while more
# sessions are active than have sent, as long as messages keep coming less than GATHER_GAP_MS
# apart, and starts no new wait after GATHER_SECONDS or half a forward pass (zmq polls in whole
# milliseconds). A lone session never waits; steps that do not come in bursts cost one gap.
GATHER_SECONDS = 0.003
GATHER_GAP_MS = 1  # sleeping in poll, not spinning: a spin takes the core the sender needs
ACTIVE_SECONDS = 1.0  # a session that stepped this recently is expected to step again


def zmq_max_msgsize(max_message_bytes: int) -> int:
    """ZeroMQ's per-frame limit for a node whose message limit is `max_message_bytes`."""
    return 2 * max_message_bytes


class NodeServer:
    def __init__(self, handler: RequestHandler, listen: str,
                 curve_secret: bytes | None = None, curve_public: bytes | None = None,
                 allow_keys: set[bytes] | None = None, leave_grace: float = 1.0):
        self.handler = handler
        self.ctx = zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished client must not block us
        # libzmq drops the connection, without a reply, on a frame over MAXMSGSIZE; leave room
        # above our own limit so that most oversized messages get a clear `too_large` reply from
        # decode() (docs/reliability.md).
        self.socket.setsockopt(zmq.MAXMSGSIZE, zmq_max_msgsize(handler.limits.max_message_bytes))
        self.socket.setsockopt(zmq.SNDHWM, 10000)
        self.socket.setsockopt(zmq.RCVHWM, 10000)
        self._auth = None
        if curve_secret is not None:
            if allow_keys is not None:
                from zmq.auth.thread import ThreadAuthenticator
                self._auth = ThreadAuthenticator(self.ctx)
                self._auth.start()
                # The callback alone decides (configure_curve_callback turns allow-any off); it is
                # registered for the exact domain our socket asks ZAP about.
                self._auth.configure_curve_callback(domain="nanoswarm", credentials_provider=_AllowList(allow_keys))
                self.socket.zap_domain = b"nanoswarm"
            self.socket.curve_secretkey = curve_secret
            self.socket.curve_publickey = curve_public
            self.socket.curve_server = True
        self.socket.bind(listen)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.leave_grace = leave_grace
        self._stop = threading.Event()
        self._leave_requested = threading.Event()
        self._timers: list[tuple[float, Callable[[], None], list[float]]] = []
        self.on_leave: list[Callable[[], None]] = []  # e.g. publish a departure record
        self.add_timer(1.0, handler.expire_idle)

    def add_timer(self, every: float, fn: Callable[[], object]) -> None:
        self._timers.append((every, fn, [time.monotonic() + every]))

    def stop(self) -> None:
        """Stop at once (tests, Ctrl-C)."""
        self._stop.set()

    def leave(self) -> None:
        """Graceful leave (SIGTERM): refuse new sessions, tell clients, drain, then stop."""
        self._leave_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.leave())
        signal.signal(signal.SIGINT, lambda *_: self.leave())

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        deadline = None
        log.info("serving %s on %s", self.handler.peer_id, self.address)
        try:
            while not self._stop.is_set():
                if self._leave_requested.is_set() and deadline is None:
                    deadline = time.monotonic() + self._begin_leaving()
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if poller.poll(POLL_MS):
                    self._serve_ready()
                self._run_timers()
        finally:
            self.close()

    def _serve_ready(self) -> None:
        batch: list = []
        self._drain(batch)
        self._gather(batch)
        for peer, reply in self.handler.handle_batch(batch):
            self._send(peer, reply)

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
        since = time.monotonic() - ACTIVE_SECONDS
        active = sum(1 for s in self.handler.sessions.sessions.values() if s.last_used > since)
        stats = self.handler.stats
        wait = min(GATHER_SECONDS, 0.5 * stats.busy_seconds / stats.steps if stats.steps else 0.0)
        deadline = time.perf_counter() + wait
        while len(batch) < min(active, MAX_BATCH) and time.perf_counter() < deadline:
            if not self.socket.poll(GATHER_GAP_MS):
                break  # the burst is over
            self._drain(batch)

    def _send(self, peer: bytes, frames: list) -> None:
        try:
            self.socket.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as e:  # peer gone: its loss, not ours
            log.debug("reply to a vanished peer dropped: %s", e)

    def _run_timers(self) -> None:
        now = time.monotonic()
        for every, fn, due in self._timers:
            if now >= due[0]:
                due[0] = now + every
                try:
                    fn()
                except Exception:
                    log.exception("timer %s failed", getattr(fn, "__name__", fn))

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
        self.socket.close(linger=200)
        if self._auth is not None:
            self._auth.stop()


class _AllowList:
    """ZAP credentials callback: accept exactly the listed CURVE public keys (z85)."""

    def __init__(self, keys: set[bytes]):
        self.keys = set(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys  # pyzmq's authenticator hands over the client key in z85
        if not ok:
            log.warning("refused a client key not in --allow-keys")
        return ok
