"""Which clients' connections dropped, so that a node closes their sessions at once.

A session belongs to the ROUTER identity of the connection that opened it (node/sessions.py),
and libzmq gives a connection that comes again a new identity: once a client's connection drops
(its process killed or crashed, its machine gone), no step can reach its sessions again. They
held a slot and their KV cache until the idle timeout (300 s by default) all the same.

Every message carries the file descriptor of the TCP connection it came over (ZMQ_SRCFD), and
the socket monitor reports each drop with that descriptor. Descriptors are reused, so the order
matters: libzmq reports a drop before it closes the descriptor, hence before a new connection
can get the same number and send anything. The server reads a batch of messages; when one comes
from a peer not seen before, `note` reads the drops reported so far and only then notes the new
peers: every drop it reads belongs to a connection noted earlier, never to one of the batch
(node/server.py `_serve_ready`; drops read at other times, when the monitor wakes the server's
loop, are older still). The cost of the rule: a client that opens a session and drops within one batch
(milliseconds) leaves it to the idle timeout.

A connection that goes silent without closing (a machine asleep or cut off) is dropped by
ZeroMQ's heartbeats (`silence`): libzmq answers them in its own thread, however busy the
client's program is.
"""

from __future__ import annotations

import logging

import zmq
from zmq.utils.monitor import parse_monitor_message

from .sessions import NodeLimits

log = logging.getLogger(__name__)

MIN_SILENCE_SECONDS = 5.0   # a loaded machine must not drop its clients' connections
MAX_SILENCE_SECONDS = 60.0


def silence(limits: NodeLimits) -> float:
    """Seconds a client's connection may stay silent, its heartbeats unanswered, before the node
    drops it and its sessions: a fifth of the idle timeout, from 5 to 60 s. (A connection that
    carries steps is never silent; only a vanished peer fails to answer libzmq's pings.)"""
    return min(MAX_SILENCE_SECONDS, max(MIN_SILENCE_SECONDS, limits.idle_timeout / 5))


class ConnectionWatch:
    """The peers (ROUTER identities) of a socket's connections, and which of them dropped."""

    def __init__(self, socket: zmq.Socket, limits: NodeLimits):
        seconds = silence(limits)
        socket.setsockopt(zmq.HEARTBEAT_IVL, int(seconds * 1000 / 4))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(seconds * 1000))
        self.socket = socket
        # Read by the server's loop whenever it has input (and before every batch), so libzmq's
        # I/O thread never blocks on a full monitor queue (docs/reliability.md).
        self.monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_of: dict[bytes, int] = {}   # peer -> its connection's descriptor
        self._peer_of: dict[int, bytes] = {}  # descriptor -> the peer whose connection has it now

    def note(self, batch: list[tuple[bytes, list]]) -> set[bytes]:
        """Remember the connection of each peer of `batch` not seen before (one lookup a message
        for the rest). Returns the peers whose connections dropped, read first when a peer is new
        (the order above); the caller closes their sessions before it handles the batch."""
        new = [(peer, frames) for peer, frames in batch if peer not in self._fd_of]
        if not new:
            return set()
        gone = self.dropped()
        for peer, frames in new:
            if peer in self._fd_of:  # (twice in the batch)
                continue
            try:
                fd = frames[0].get(zmq.SRCFD)
            except (AttributeError, zmq.ZMQError):  # bytes (in-process callers), or no such property
                continue
            stale = self._peer_of.get(fd)
            if stale is not None:  # (a drop not reported: libzmq always reports it first)
                del self._fd_of[stale]
            self._fd_of[peer] = fd
            self._peer_of[fd] = peer
        return gone

    def dropped(self) -> set[bytes]:
        """The peers whose connections the monitor reported dropped since the last call."""
        gone: set[bytes] = set()
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            peer = self._peer_of.pop(int(event["value"]), None)
            if peer is not None:
                del self._fd_of[peer]
                gone.add(peer)
        return gone

    def close(self) -> None:
        """Stop monitoring (before the socket closes)."""
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
