"""A client's link to one peer: a DEALER socket, request ids, explicit timeouts with poll."""

from __future__ import annotations

import itertools
import logging
import random
import time
from typing import Any

import torch
import zmq

from nanoswarm.keys.contact import split_contact
from nanoswarm.protocol.errors import ProtocolError
from nanoswarm.protocol.messages import Message, decode, encode

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class PeerError(Exception):
    """A peer answered with an error, answered nonsense, or did not answer."""

    def __init__(self, address: str, code: str, message: str):
        super().__init__(f"{address}: {code}: {message}")
        self.address, self.code, self.message = address, code, message


class PeerTimeout(PeerError):
    def __init__(self, address: str, seconds: float):
        super().__init__(address, "timeout", f"no answer within {seconds:.1f}s")


class PeerConnection:
    """Requests to one peer. Not thread-safe: one connection per thread, as ZeroMQ wants."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT,
                 server_key: bytes | None = None, client_keys: tuple[bytes, bytes] | None = None,
                 ctx: zmq.Context | None = None):
        self.address = address
        self.timeout = timeout
        # `address` may be a contact string (endpoint#key, keys/contact.py): it carries the key.
        endpoint, contact_key = split_contact(address)
        server_key = server_key if server_key is not None else contact_key
        self.socket = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if server_key is not None:  # CURVE: only the holder of the node's secret can answer
            public, secret = client_keys or zmq.curve_keypair()
            self.socket.curve_serverkey = server_key
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
        # A peer that dies closes its TCP connection: the monitor reports that at once, so a
        # killed peer costs milliseconds, not the whole timeout.
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.socket.connect(endpoint)
        self._ids = itertools.count(random.randrange(1, 2**31))
        self.leaving = False  # set when the peer announced it is going away
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, msg_type: str, fields: dict[str, Any] | None = None,
             tensors: list[torch.Tensor] | tuple = (), wire: str = "float32") -> int:
        req_id = next(self._ids)
        frames = encode(msg_type, req_id, fields, tensors, wire)
        self.bytes_sent += sum(len(f) for f in frames)
        self.socket.send_multipart(frames, copy=False)
        return req_id

    def recv(self, req_id: int, timeout: float | None = None) -> Message:
        """The reply to `req_id`; raises PeerError for an error reply, PeerTimeout after timeout."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = dict(self._poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
            if self._monitor in ready:
                self._monitor.recv_multipart()
                if not self.socket.poll(0):  # replies that arrived before the drop still count
                    raise PeerError(self.address, "disconnected", "connection closed by the peer")
            if not ready:
                raise PeerTimeout(self.address, timeout)
            if self.socket not in ready and not self.socket.poll(0):
                continue
            frames = self.socket.recv_multipart(copy=False)
            self.bytes_received += sum(len(f) for f in frames)
            try:
                msg = decode(frames, finite=True)  # peers are untrusted: no NaN or Inf gets past here
            except ProtocolError as e:
                raise PeerError(self.address, "bad_reply", e.message) from None
            if msg.type == "leaving":
                self.leaving = True
                log.info("%s announced it is leaving", self.address)
                continue
            if msg.id != req_id:  # a late reply to a request we gave up on
                continue
            if msg.type == "error":
                raise PeerError(self.address, msg.fields["code"], msg.fields["message"])
            return msg

    def request(self, msg_type: str, fields: dict[str, Any] | None = None,
                tensors: list[torch.Tensor] | tuple = (), wire: str = "float32",
                timeout: float | None = None) -> Message:
        return self.recv(self.send(msg_type, fields, tensors, wire), timeout)

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)
