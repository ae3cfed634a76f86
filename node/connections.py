"""Which clients' connections dropped, so that a node closes their sessions at once.

A session belongs to the ROUTER identity of the connection that opened it (node/sessions.py),
and libzmq gives a connection that comes again a new identity: once a client's connection closes
(its process killed or crashed), no step can reach its sessions again. They held a slot and their
KV cache until the idle timeout (300 s by default) all the same.

Every message carries the file descriptor of the TCP connection it came over (ZMQ_SRCFD), and
the socket monitor reports each drop with that descriptor. Descriptors are reused, so the order
matters: libzmq reports a drop before it closes the descriptor, hence before a new connection
can get the same number and send anything. The server reads a batch of messages; when one comes
from a peer not seen before, `note` reads the drops reported so far and only then notes the new
peers: a drop it reads belongs to a connection noted earlier, never to a connection whose first
message comes after it (node/server.py `_serve_ready`). A message can still be read after its
connection's drop (a batch takes at most 64 messages; the rest wait): its peer, new to us, then
claims a descriptor that a later connection may hold. The last peer to claim a descriptor holds it, and the other is
forgotten, not closed: which of the two is gone cannot be known for sure (libzmq numbers the
connections it names in order, but a peer may name itself), so one of them keeps its sessions
until the idle timeout, as every client did before. A session is never closed on a guess.

A connection that goes silent without closing (a machine asleep or cut off, a process stopped)
is not dropped here: no heartbeats from the node. A client paused past them would have lost its
whole generation, and banned honest nodes for it, where before its sessions waited for it up to
the idle timeout (a review). Such sessions still end at the idle timeout.

The monitor's queue has no bound: a flood of bare TCP connects during a long batch filled
libzmq's default of 1,000 events, and then libzmq's I/O thread, which writes them, blocked: no
connection of the node was served until the batch ended, and a node told to stop then hung in
`close` (a review). Each event is ~100 bytes, and the server reads them after every batch.
"""

from __future__ import annotations

import zmq
from zmq.utils.monitor import parse_monitor_message

from nanoswarm.client.monitors import monitor_socket, stop_monitor


class ConnectionWatch:
    """The peers (ROUTER identities) of a socket's connections, and which of them dropped."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self.monitor = monitor_socket(socket, zmq.EVENT_DISCONNECTED)  # unbounded: the I/O thread never waits on us
        self._fd_of: dict[bytes, int] = {}   # peer -> its connection's descriptor
        self._peer_of: dict[int, bytes] = {}  # descriptor -> the peer whose connection has it now

    def note(self, batch: list[tuple[bytes, list]]) -> set[bytes]:
        """Remember the connection of each peer of `batch` not seen before (one lookup a message
        for the rest). Returns the peers whose connections dropped, read first when a peer is new
        (the order above); the caller closes their sessions once it has handled the batch."""
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
            held = self._peer_of.get(fd)
            if held is not None:  # one of the two is gone (a late message): forgotten, not closed
                del self._fd_of[held]
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
        """Stop monitoring (before the socket closes): the monitor first, then its reader. The
        other order let a drop in between block libzmq's I/O thread on a send nobody would read,
        and `disable_monitor` then waited for it for ever (a review): client/monitors.py."""
        stop_monitor(self.socket, self.monitor)
