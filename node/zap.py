"""ZAP (ZeroMQ RFC 27) for a node's CURVE socket: which client keys may connect, and the
"User-Id" every message of a connection then carries (its sender's CURVE key, z85: `sender_key`),
which is how a session knows that a relayed step comes from the hop its owner pinned
(node/handler.py). `ClientKeys` is the allow list (--allow-keys) a handler asks.

libzmq asks the handler bound at inproc://zeromq.zap.01 of the socket's context about every CURVE
handshake, and the connection waits until it answers. The handler here is the ZeroMQ guide's
pattern: one thread that makes, uses and closes its own REP socket, blocked in a poll that a pipe
wakes when the node stops. (pyzmq's ThreadAuthenticator, used before, runs an asyncio loop around
a socket made in another thread, and its stop() sends with a blocking send: a node whose ZeroMQ
I/O thread had blocked on an unread socket monitor then hung on SIGTERM; docs/reliability.md.)
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

import zmq
from zmq.utils import z85

from nanoswarm.keys.identity import curve_key_hex

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
_pipes = itertools.count()  # each handler's stop pipe gets a name of its own


def _reply(request_id: bytes, status: bytes, text: bytes, user_id: bytes = b"") -> list[bytes]:
    return [ZAP_VERSION, request_id, status, text, user_id, b""]


class ZapHandler:
    """Answers the ZAP requests of a context's CURVE sockets in a thread of its own: a client
    whose key `allowed(z85 key)` accepts connects, with that key as its messages' User-Id."""

    def __init__(self, ctx: zmq.Context, allowed: Callable[[bytes], bool]):
        self.ctx, self.allowed = ctx, allowed
        self._pipe_endpoint = f"inproc://nanoswarm-zap-{next(_pipes)}"
        self._pipe: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    def start(self) -> None:
        """Bind the handler (before any CURVE socket of the context takes connections)."""
        self._pipe = self.ctx.socket(zmq.PAIR)
        self._pipe.linger = 0
        try:
            self._pipe.bind(self._pipe_endpoint)
        except zmq.ZMQError as e:
            self._pipe.close()
            self._pipe = None
            raise RuntimeError(f"ZAP handler: {e}") from None
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            self.stop()
            raise RuntimeError(f"ZAP handler: {self._failed}")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def why_ended(self) -> str:
        return "stopped" if self._failed is None else f"{type(self._failed).__name__}: {self._failed}"

    def stop(self, timeout: float = 2.0) -> None:
        """End the thread; never blocks past `timeout` (a thread that ended already does not read
        the pipe)."""
        if self._pipe is None:
            return
        try:
            self._pipe.send(b"stop", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        self._pipe.close()
        self._pipe = None

    def _run(self) -> None:
        zap = pipe = None
        try:
            zap = self.ctx.socket(zmq.REP)
            pipe = self.ctx.socket(zmq.PAIR)
            zap.linger = pipe.linger = 0
            zap.bind(ZAP_ENDPOINT)
            pipe.connect(self._pipe_endpoint)
        except BaseException as e:  # the endpoint taken in this context, no sockets left, or any other
            # failure: start() waits for `_ready`, so every failure must set it (else start() hangs)
            self._failed = e
            for sock in (zap, pipe):
                if sock is not None:
                    sock.close()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(pipe, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if pipe in events:
                    return
                if zap in events:
                    zap.send_multipart(self.answer(zap.recv_multipart()))
        except zmq.ContextTerminated:
            return
        except BaseException as e:  # the node sees the thread gone (NodeServer._check_zap) and says why
            self._failed = e
            log.exception("the ZAP handler failed")
        finally:
            try:  # an inproc endpoint goes with its socket only when libzmq reaps it: now, for a next handler
                zap.unbind(ZAP_ENDPOINT)
            except zmq.ZMQError:
                pass
            zap.close()
            pipe.close()

    def answer(self, request: list[bytes]) -> list[bytes]:
        """RFC 27: [version, request id, domain, address, routing id, mechanism, credentials...]
        -> [version, request id, status code, status text, user id, metadata]. Every request gets
        an answer (a REP socket that skips one answers no later request)."""
        request_id = request[1] if len(request) > 1 else b""
        if len(request) != 7 or request[0] != ZAP_VERSION or request[5] != b"CURVE" or len(request[6]) != 32:
            return _reply(request_id, b"400", b"not a CURVE request")
        key = z85.encode(request[6])
        try:
            allowed = self.allowed(key)
        except Exception:  # a bug in the check must not end the thread: every later handshake would wait
            log.exception("checking a client key failed")
            return _reply(request_id, b"500", b"internal error")
        if not allowed:
            return _reply(request_id, b"400", b"Unknown key")
        return _reply(request_id, b"200", b"OK", key)


def sender_key(frames: list) -> str | None:
    """The CURVE key (z85) a message came with, as ZAP gave it (None without ZAP, or for frames
    that are not ZeroMQ's)."""
    try:
        return frames[0].get("User-Id")
    except (AttributeError, zmq.ZMQError):  # bytes (in-process callers), or no such property
        return None


class ClientKeys:
    """Which clients ZAP lets connect: exactly the listed CURVE public keys (z85), or any key
    when there is no list (then ZAP only names each connection's key)."""

    MAX_LOGGED = 64  # refused keys named in the log an hour: a flood of fresh keys must not flood it
    FORGET_SECONDS = 3600.0

    def __init__(self, keys: set[bytes] | None):
        self.keys = None if keys is None else set(keys)
        self.refused: dict[bytes, float] = {}  # key -> when it was logged

    def __call__(self, key: bytes) -> bool:
        ok = self.keys is None or key in self.keys
        if not ok:
            self._log_refusal(key)
        return ok

    def _log_refusal(self, key: bytes) -> None:
        """Once per key an hour (a refused peer retries every few seconds), named as lists write
        it: how an operator finds the typo, or the member missing from the list. Clients without
        --key-file bring a fresh key per link, so the names are capped, and forgotten in time."""
        now = time.monotonic()
        if key in self.refused and now - self.refused[key] < self.FORGET_SECONDS:
            return
        if len(self.refused) >= self.MAX_LOGGED:
            self.refused = {k: t for k, t in self.refused.items() if now - t < self.FORGET_SECONDS}
            if len(self.refused) >= self.MAX_LOGGED:
                return
        self.refused[key] = now
        log.warning("refused CURVE key %s: not in --allow-keys (its refusals this hour are not logged again%s)",
                    curve_key_hex(key), f"; nor other keys': that makes {self.MAX_LOGGED}"
                    if len(self.refused) == self.MAX_LOGGED else "")
