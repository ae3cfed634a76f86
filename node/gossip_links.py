"""Gossip's links: one DEALER connection per contact, sent on without blocking, read by the
server loop.

Everything here runs on the server thread (server timers and watches), so the sockets are never
shared between threads.  Requests are sent without blocking and replies are read when the server
loop sees them arrive (each link's socket is watched, and its connection's events): a dead peer
never stalls serving; after `peer_timeout` without an answer its link is closed and its records
forgotten (`on_silent`; a newer record from it brings it back). A link that drops with nothing
waiting is closed only: the next round to it links again.

Links are keyed by contact (endpoint and CURVE key), not by endpoint: a record that claims another
node's endpoint with a key of its own gets a link of its own, whose failure forgets only that
record. At most MAX_LINKS stay open (the least recently used one closes), so a large table cannot
use up the process's sockets.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from nanoswarm.client.peer_errors import PeerError
from nanoswarm.client.transport import PeerConnection
from nanoswarm.keys.clock import reply_offset
from nanoswarm.keys.contact import endpoint_of
from nanoswarm.protocol.errors import ProtocolError, shown
from nanoswarm.protocol.messages import MAX_HEADER_BYTES, decode

from .relay import MAX_READS  # the same bound for every link the server thread reads

if TYPE_CHECKING:
    from .server import NodeServer

log = logging.getLogger(__name__)

MAX_LINKS = 64   # gossip links kept open (a round uses `fanout` of them)
MAX_UNREACHABLE = 4096  # contacts ZeroMQ refused, remembered so that each is warned about once
LINK_MAX_FRAME = 2 * MAX_HEADER_BYTES  # gossip messages are one header frame: nothing larger is read
# A link to a peer that went retries its connection at most this far apart (libzmq backs off from
# 0.1 s), not RECONNECT_MAX_MS: the requests queued meanwhile reach a process restarted at its
# address within a second of its listening, and are answered before their timeout forgets it.
# At 10 s, a swarm's first node (no --bootstrap: it tells no one of its new record) restarted
# 8-10 s after it went was forgotten by its peers for 1-3 s (review133). A link that went holds
# requests for at most peer_timeout, and the server loop reads its retries' events.
RECONNECT_MS = 1000


@dataclass
class GossipLink:
    conn: PeerConnection
    pending: dict[int, float] = field(default_factory=dict)  # request id -> time sent
    answers: int = 0


class GossipLinks:
    """The open gossip links of one node, by contact, least recently used first."""

    def __init__(self, address: str, client_keys: tuple[bytes, bytes], peer_timeout: float,
                 on_records: Callable[[list], object], on_silent: Callable[[str], None]):
        self.address = address  # ours: never linked to
        self.client_keys = client_keys
        self.peer_timeout = peer_timeout
        self.on_records = on_records  # the records of a `records_reply`
        self.on_silent = on_silent    # a contact left a request unanswered past peer_timeout
        self.on_clock: Callable[[str, float], None] | None = None  # a contact's clock minus ours
        self.open: OrderedDict[str, GossipLink] = OrderedDict()
        self._server: NodeServer | None = None  # watches the links' sockets once attached
        self._unreachable: OrderedDict[str, None] = OrderedDict()  # contacts ZeroMQ refused, warned about once

    def __len__(self) -> int:
        return len(self.open)

    def attach(self, server: NodeServer) -> None:
        self._server = server
        for link in self.open.values():
            self._watch(link)

    def get(self, contact: str) -> GossipLink | None:
        """The link to `contact`, opened if need be; None for our own endpoint or a contact
        ZeroMQ cannot connect to."""
        if endpoint_of(contact) == self.address:
            return None
        link = self.open.get(contact)
        if link is not None:
            self.open.move_to_end(contact)
            return link
        try:
            conn = PeerConnection(contact, timeout=self.peer_timeout, client_keys=self.client_keys,
                                  max_frame=LINK_MAX_FRAME, reconnect_max_ms=RECONNECT_MS, node_side=True)
        except (ValueError, zmq.ZMQError) as e:  # a contact ZeroMQ cannot connect to: skip only it
            # Said once a contact (a record names it every round while it lives), not every round.
            if contact not in self._unreachable:
                log.warning("cannot gossip with %s: %s", contact[:120], e)
            self._unreachable[contact] = None
            self._unreachable.move_to_end(contact)
            while len(self._unreachable) > MAX_UNREACHABLE:
                self._unreachable.popitem(last=False)
            return None
        link = self.open[contact] = GossipLink(conn)
        self._watch(link)
        while len(self.open) > MAX_LINKS:
            self.close_link(*next(iter(self.open.items())))
        return link

    def send(self, contact: str, wires: list, want: bool, await_answer: bool) -> None:
        """A `records` request to `contact`, never blocking; `await_answer`: the contact is
        forgotten if it leaves the request unanswered past peer_timeout."""
        link = self.get(contact)
        if link is None:
            return
        try:
            # timeout=0: never block the server thread on a send
            req_id = link.conn.send("records", {"records": wires, "want": want}, timeout=0)
        except (zmq.ZMQError, PeerError) as e:
            # The queue is full (the peer is not reading), or ZeroMQ dropped the connection for
            # good after a refused handshake: the next round starts a fresh one.
            log.debug("gossip to %s not sent: %s", contact, e)
            self.close_link(contact, link)
            return
        if await_answer:
            link.pending[req_id] = time.monotonic()

    def unanswered(self, contact: str, link: GossipLink | None, timeout: float) -> str | None:
        """Why `contact` did not answer a request sent on `link` (None if it did)."""
        if link is None:
            return "not a contact to link to"
        if link.answers:
            return None
        if self.open.get(contact) is not link and not link.pending:  # send() gave up on it at once
            return "no connection to send the request on"
        return link.conn.drop_reason or f"timeout: no answer within {timeout:g}s"

    def _watch(self, link: GossipLink) -> None:
        """The server loop reads a link's replies and its monitor's events as they come: a link
        to a departed peer retries its connection, and unread retry events end up blocking ZeroMQ's
        I/O thread, and with it the whole node (client/transport.py RECONNECT_MAX_MS)."""
        if self._server is not None:
            self._server.watch(link.conn.socket, self.drain)
            self._server.watch(link.conn.monitor, self.drain)

    def _unwatch(self, link: GossipLink) -> None:
        if self._server is not None:
            self._server.unwatch(link.conn.socket)
            self._server.unwatch(link.conn.monitor)

    def drain(self) -> int:
        """Read the replies that have arrived, at most MAX_READS a link (the server loop comes back
        for the rest after serving its own socket: a peer flooding its link must not hold the
        node's loop); drop links silent for too long.  Returns replies read."""
        got = 0
        now = time.monotonic()
        for contact, link in list(self.open.items()):
            for _ in range(MAX_READS):
                # A record read here (from this link or an earlier one) may close a link: renewed.
                # Polled closed, its socket raised ENOTSUP, which ended the node (review134: 3 of
                # 4 nodes died while a peer was killed and restarted at its address 6 times).
                if self.open.get(contact) is not link or not link.conn.socket.poll(0):
                    break
                frames = link.conn.socket.recv_multipart(copy=False)
                try:
                    msg = decode(frames)
                except ProtocolError as e:
                    log.debug("bad gossip reply from %s: %s", contact, e.message)
                    continue
                sent = link.pending.get(msg.id)
                if sent is None:
                    continue  # a notice, or a reply to a link we gave up on
                # Replies come in order on a link: requests sent before this one and still waiting
                # were lost (the peer restarted at the same address, say). Left pending, they timed
                # the answering peer out and forgot its new record (a churn review).
                for req_id in list(link.pending):  # in the order sent
                    del link.pending[req_id]
                    if req_id == msg.id:
                        break
                got += 1
                link.answers += 1
                if msg.type == "records_reply":
                    offset = reply_offset(msg.fields.get("now"), sent, time.monotonic())
                    if offset is not None and self.on_clock is not None:
                        self.on_clock(contact, offset)
                    self.on_records(msg.fields["records"])
                elif msg.type == "error":
                    log.debug("gossip to %s refused: %s", contact, shown(msg.fields.get("message")))
            if self.open.get(contact) is not link:
                continue  # closed this pass (renewed): nothing of it is left to read or time out
            link.conn.drain_events()
            # A dropped connection alone forgets nothing (the peer may reconnect and answer); a
            # peer that leaves an exchange unanswered past the timeout is forgotten (drop).
            if link.conn.dropped and not link.pending:  # gone, or never there: a later round links again
                self.close_link(contact, link)
            elif link.pending and now - min(link.pending.values()) > self.peer_timeout:
                self.drop(contact, link)
        return got

    def renewed(self, contact: str) -> None:
        """A newer record of `contact` came (signed after its process was last heard from, or by a
        new process at its address): a link whose connection has dropped (it may have reconnected
        since), with requests still waiting, is closed, forgetting nothing; the next round links
        afresh, at once. Those requests went to an earlier process, or wait on a reconnect that
        libzmq has backed off (to RECONNECT_MS; to 10 s before), and their timeout forgot the peer
        just renewed: a node restarted within `peer_timeout` was forgotten as it listened, its new
        record held as the tombstone's floor, and was not known again until its next refresh (~20
        s; review131, the forty-sixth session's repro). Called for a refresh of a record held live,
        not a join (Gossip._renewed). A link to the dead process is often a fresh one that
        never connected (the old one closed when it dropped with nothing waiting), so "dropped"
        includes never connected. A peer that signs records but cannot be reached from here is
        therefore forgotten only between refreshes, as before, and with a --ttl under 3 x
        peer_timeout not at all (review133): it is alive, and others may reach it; relayed steps
        to it fail `relay_failed` as before.

        Called from drain() (a record in a reply): drain passes over a link closed here."""
        link = self.open.get(contact)
        if link is None or not link.pending:
            return
        link.conn.drain_events()
        if link.conn.dropped:
            self.close_link(contact, link)

    def joined(self, contact: str) -> None:
        """A peer joined, or came back (its record new here): the requests to it still waiting
        (sent to an earlier process at its address, or while it was away, and queued on a link
        whose reconnects had backed off) are timed from now. Review131: a node restarted at the
        same address was forgotten again a second after it joined, by those requests' timeout,
        and stayed so for 14-39 s, its peers refusing to relay or all-reduce with it."""
        link = self.open.get(contact)
        if link is not None:
            now = time.monotonic()
            link.pending = dict.fromkeys(link.pending, now)

    def close_link(self, contact: str, link: GossipLink) -> None:
        self._unwatch(link)
        link.conn.close()
        del self.open[contact]

    def drop(self, contact: str, link: GossipLink) -> None:
        """Close the link to a contact that stopped answering, and have its records forgotten."""
        self.close_link(contact, link)
        self.on_silent(contact)

    def close(self) -> None:
        for link in self.open.values():
            self._unwatch(link)
            link.conn.close()
        self.open.clear()
