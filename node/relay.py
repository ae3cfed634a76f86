"""Relaying: a node passes its output for a step straight to the next node of the client's route
(a ring instead of a star), so a token crosses one link per stage boundary instead of two.

The client names the chain in its step (`next`: [[contact, session], ...], `reply`: its id);
each node runs its blocks and sends the step on to the next hop with its output added to the
outputs of the hops before it; the last node sends the client `result` with all of them (the
client keeps every stage's input for failover replay). Replies and errors of a relayed step go
to the session's owner (the client that opened it), never to the node that relayed it. With
CURVE a session takes relayed steps only as its owner pinned them (`admit`: from the hop before,
on to the hop after; node/handler.py).

A node relays only to peers in its own table of signed records (node/gossip.py): a client
cannot make it connect anywhere else. The links are DEALER sockets owned by the server thread,
with the node's own CURVE keys (so private swarms, whose allow lists hold node keys, work).
Whatever a next hop sends back on a link is an error it could not route to the owner (an
unknown session, a malformed message): it reaches the client as `relay_failed`. So do the steps
that may wait on a link that closes: one whose handshake the next hop refused (its
`--allow-keys` lacks this node's key: read from the link's socket monitor), one whose queue is
full, one closed for links to other hops. ZeroMQ drops those steps without a word, and the
client would otherwise wait its whole timeout (for each session's first relayed step, where a
next hop refuses this node).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from nanoswarm.client.monitors import MonitoredSocket, monitor_socket
from nanoswarm.client.transport import RECONNECT_MAX_MS
from nanoswarm.keys.contact import allow_ipv6, split_contact
from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import MAX_HEADER_BYTES, decode, error_frames

log = logging.getLogger(__name__)

MAX_LINKS = 64        # links kept open; the least recently used one closes beyond that
WARM_LINKS = MAX_LINKS // 2  # links started ahead of any session (warm) only while fewer are open
LINK_QUEUE = 64       # relayed steps queued on one link before sends fail
MAX_READS = 64       # messages read from one link (relay or gossip) per turn of the server loop
MAX_REMEMBERED = 4096  # relayed steps whose bounced errors can still be routed to their owner
# A link whose connection dropped keeps, of its steps sent since its last handshake, those sent
# this long before the drop was read: they may have been on their way, or queued after the drop
# while the server thread computed; earlier ones went out (review92c: a link made anew answered
# relay_failed for every step since its handshake, long-answered ones too).
DROP_WINDOW = 1.0
REFUSED_WARN_SECONDS = 3600.0  # how often a node names again a next hop that refuses its handshake
# A link on which a step has waited this long with no handshake ever succeeding: the next hop is
# unreachable from here at that address (a record's address behind NAT, a
# firewall), while the client reaches it. ZeroMQ waits for it without a word, and each session's
# client waited two step timeouts (RELAY_STALLS) before going stage by stage (review114). Its
# steps are answered relay_failed, and further steps to it at once, until a handshake succeeds.
UNREACHED_SECONDS = 5.0
# A link whose hop went (its connection dropped, no handshake since) or that never reached its hop,
# with nothing sent on it since, closes after this long: its hop may never come back, and libzmq
# retries it for as long as it is open. A node that took the hop's address with another key
# answers each retry's TCP connect and fails its handshake, after which libzmq retries in 100 ms:
# review137 saw each such link handshake 7-10 times a second, for good (a node of 12 stale links
# gave a node new at that address 72 failed handshakes a second). A next step to the hop makes a
# fresh link, as it does for a down link anyway (_link).
STALE_SECONDS = 10.0
# A refusal: libzmq does not try that connection again. (EVENT_HANDSHAKE_FAILED_NO_DETAIL is
# a connection that dropped mid-handshake, a restart say: ZeroMQ reconnects and sends what is
# queued, so it is no refusal; a review saw a step so delivered answered relay_failed.)
HANDSHAKE_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


@dataclass(slots=True)
class Relay:
    """Where a step goes next: the destination of a reply that is not for a ROUTER peer. (Made for
    every relayed step and partial: not frozen, whose __init__ costs several times a plain one's.)"""

    contact: str
    owner: bytes      # ROUTER identity of the session's client
    reply: int        # the id the client's replies for this chain carry
    hop_id: int       # the id of the relayed message on the link
    session: str = ""  # this node's session that relayed it: its next relayed step ends this one's wait


@dataclass(eq=False)
class RelayLink:
    """A DEALER to one next hop, and its socket monitor."""

    contact: str
    socket: zmq.Socket
    monitor: zmq.Socket
    # (_sent key, when sent) of the steps sent since the link's last handshake was read to
    # succeed (since DROP_WINDOW before a drop was read), the latest 2 x LINK_QUEUE: those that
    # may still wait on the link (and some that went out; of a session, only its latest step
    # stays in RelayLinks._sent, so only that one may be answered).
    # When the link fails they are answered relay_failed; a late answer to a step that was
    # delivered is dropped by its client, and one that was not no longer costs its timeout.
    recent: deque = field(default_factory=lambda: deque(maxlen=2 * LINK_QUEUE))
    down: bool = False  # its connection dropped, and no handshake has succeeded since
    down_since: float = 0.0  # when it was read to drop, the first time since its last handshake (monotonic)
    reached: bool = False  # a handshake has succeeded
    started: float = field(default_factory=time.monotonic)  # when the link was made


_hop_ids = itertools.count(random.randrange(1, 2**31))


def next_hop_id() -> int:
    return next(_hop_ids)


class RelayLinks:
    """The server thread's DEALER links to next hops. `send` never blocks."""

    def __init__(self, ctx: zmq.Context, curve_keys: tuple[bytes, bytes] | None,
                 error: Callable[[int, ErrorCode, str], list] = error_frames):
        self.ctx = ctx
        self.curve_keys = curve_keys  # (public, secret) of this node, or None when --insecure
        self.error = error  # makes an error reply (the node counts it in `info`)
        self._links: OrderedDict[str, RelayLink] = OrderedDict()
        self._sent: OrderedDict[tuple[str, int], Relay] = OrderedDict()
        # Each session's latest relayed step (its _sent key). A session's next step reaches this
        # node only after its client had the last one's result, so that one is answered: it is
        # not answered relay_failed when its link drops (review112 saw 16 such answers after a
        # kill, for one step lost).
        self._latest: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._warned: dict[str, float] = {}  # refusing contact -> when last named in the log
        self._unreached: set[str] = set()  # contacts whose links never reached them (UNREACHED_SECONDS)
        self._failed: list[tuple[bytes, list]] = []  # relay_failed for owners, until take_failed
        self.on_open = None   # callable(RelayLink), set by the server to watch a new link
        self.on_close = None  # callable(RelayLink)

    def send(self, relay: Relay, frames: list) -> str | None:
        """Queue `frames` for the next hop; returns why it could not be, or None."""
        try:
            link = self._link(relay.contact)
            if relay.contact in self._unreached and not link.reached:
                return self._unreached_why(relay.contact)  # not queued: the link goes on trying
            link.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except (zmq.ZMQError, ValueError) as e:  # queue full, or a link that cannot be made
            why = f"cannot reach the next hop {relay.contact[:80]}: {e}"
            if isinstance(e, zmq.Again):
                # Full (the next hop is not reading), or dropped for good by ZeroMQ after a refused
                # handshake: the next step to this hop gets a fresh link.
                self._close(relay.contact, self._links.pop(relay.contact), lost=why)
            return why
        key = (relay.contact, relay.hop_id)
        self._sent[key] = relay
        link.recent.append((key, time.monotonic()))
        if relay.session:
            before = self._latest.pop(relay.session, None)
            if before is not None:
                self._sent.pop(before, None)
            self._latest[relay.session] = key
            while len(self._latest) > MAX_REMEMBERED:
                self._latest.popitem(last=False)
        while len(self._sent) > MAX_REMEMBERED:
            self._sent.popitem(last=False)
        return None

    def connect(self, contact: str) -> None:
        """Start the link to `contact` (a pinned next hop) before its first step."""
        try:
            self._link(contact)
        except (zmq.ZMQError, ValueError) as e:  # the step that goes there says why
            log.debug("no link to the next hop %s: %s", contact[:80], e)

    def warm(self, contact: str) -> None:
        """Start the link to a likely next hop (a peer whose blocks begin where ours end) before
        any session pins it: its handshake, a few round trips, is then done before the first
        relayed step of a fresh route (review92: the first token through fresh nodes trailed
        stage by stage by ~0.9 s at a 300 ms round trip). Only while links are few: a warm link
        never closes another to make room."""
        link = self._links.get(contact)
        if (link is None or link.down) and sum(not k.down for k in self._links.values()) < WARM_LINKS:
            self.connect(contact)  # (links to hops that went do not count: they would stop warming for good)

    def __len__(self) -> int:
        return len(self._links)

    def expire(self, now: float | None = None) -> None:
        """Close the links that have held steps for UNREACHED_SECONDS without a handshake: their
        steps are answered relay_failed (take_failed), and so are further steps to that hop at
        once (`send`), while the link the next of them makes tries it, until one succeeds. Close
        the stale links too (STALE_SECONDS). Called on a timer."""
        now = time.monotonic() if now is None else now
        self._close_stale(now)
        for contact, link in list(self._links.items()):
            if link.reached or not link.recent or now - link.recent[0][1] <= UNREACHED_SECONDS:
                continue  # (recent[0]: its oldest waiting step)
            self.events(link)  # a handshake not read yet (the loop computed meanwhile) counts
            if self._links.get(contact) is link and not link.reached:
                del self._links[contact]
                self._close(contact, link, lost=self._unreached_why(contact))
                if len(self._unreached) >= MAX_LINKS:
                    self._unreached.clear()
                self._unreached.add(contact)
                log.info("the next hop %s is not reached from here: relayed steps to it fail until it is",
                         contact[:120])

    def _close_stale(self, now: float) -> None:
        """Close the links down for STALE_SECONDS with no step sent since the drop, and those never
        reached and sent nothing within STALE_SECONDS of their start (warm links to a hop that
        is gone). A down link's steps from just before its drop are answered relay_failed."""
        for contact, link in list(self._links.items()):
            if link.reached and not link.down or not link.reached and link.recent:
                continue  # (a step waiting for a first handshake: the loop below answers it)
            # (no step goes on a down link: the next step to its hop makes a fresh one, _link)
            since = link.down_since if link.down else link.started
            if now - since <= STALE_SECONDS:
                continue
            self.events(link)  # a handshake not read yet (the loop computed meanwhile) counts
            if self._links.get(contact) is link and (link.down or not link.reached):
                del self._links[contact]
                self._close(contact, link, lost=f"the link to the next hop {contact[:80]} dropped")
                log.debug("closed the link to %s: %s for %.0f s", contact[:120],
                          "down" if link.down else "never reached", now - since)

    @staticmethod
    def _unreached_why(contact: str) -> str:
        return (f"the next hop {contact[:80]} is not reached from this node (no handshake in "
                f"{UNREACHED_SECONDS:g} s): is its address reachable from here?")

    def _link(self, contact: str) -> RelayLink:
        link = self._links.get(contact)
        if link is not None and link.down:
            # The next hop went (or restarted): libzmq's reconnects to it back off to
            # RECONNECT_MAX_MS, and a step queued now waited up to that long for a node that had
            # come back (review92b: the first token after a restart, ~7 s). A fresh link connects
            # at once; the steps that may have been lost with the drop are answered relay_failed.
            del self._links[contact]
            self._close(contact, link, lost=f"the link to the next hop {contact[:80]} dropped")
        elif link is not None and not link.reached and not link.recent and time.monotonic() - link.started > 1.0:
            # Never reached, nothing waiting: a link started ahead (warm, admit) while the hop was
            # down, whose retries have backed off as above; a fresh one connects at once
            # (review116: such a link held the first step until UNREACHED_SECONDS failed it).
            del self._links[contact]
            self._close(contact, link)
        elif link is not None:
            self._links.move_to_end(contact)
            return link
        endpoint, server_key = split_contact(contact)
        link = self.ctx.socket(zmq.DEALER, socket_class=MonitoredSocket)
        link.setsockopt(zmq.LINGER, 0)
        link.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)  # a next hop that went is retried rarely
        # A next hop that does not read (anyone can sign a record for such an endpoint) must not
        # make steps pile up here: past this, sends fail and the client hears `relay_failed`.
        link.setsockopt(zmq.SNDHWM, LINK_QUEUE)
        # What comes back on a link is only a bounced error (one header frame): nothing larger is read.
        link.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_HEADER_BYTES)
        if server_key is not None:
            public, secret = self.curve_keys or zmq.curve_keypair()
            link.curve_serverkey, link.curve_publickey, link.curve_secretkey = server_key, public, secret
        allow_ipv6(link, endpoint)
        monitor = monitor_socket(link, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_REFUSED)
        link.connect(endpoint)
        link = self._links[contact] = RelayLink(contact, link, monitor)
        if self.on_open:
            self.on_open(link)
        while len(self._links) > MAX_LINKS:
            old, evicted = self._links.popitem(last=False)
            self._close(old, evicted, lost=f"the link to the next hop {old[:80]} was closed for links to others")
        return link

    def bounced(self, link: RelayLink) -> list[tuple[bytes, list]]:
        """Errors a next hop sent back on `link`, turned into `relay_failed` for their owners; at
        most MAX_READS a call (the server loop comes back for the rest after serving its own
        socket: a next hop flooding the link must not hold the node's loop)."""
        contact = link.contact
        out = []
        for _ in range(MAX_READS):
            if not link.socket.get(zmq.EVENTS) & zmq.POLLIN:
                break
            frames = link.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                msg = decode(frames)
            except ProtocolError:
                continue
            relay = self._sent.pop((contact, msg.id), None)
            if relay is None or msg.type != "error":
                continue
            why = f"the next hop {contact[:80]} refused the step: {msg.get('code')}: {msg.get('message')}"
            out.append((relay.owner, self.error(relay.reply, ErrorCode.RELAY_FAILED, why[:500])))
        return out

    def events(self, link: RelayLink) -> None:
        """Read `link`'s monitor (at most MAX_READS events a call). A refused handshake ends the
        link, its steps answered `relay_failed` (take_failed), and the next step to that hop gets
        a fresh link (the refusal may have been a restart's moment)."""
        for _ in range(MAX_READS):
            if not link.monitor.get(zmq.EVENTS) & zmq.POLLIN:
                return
            event = parse_monitor_message(link.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.recent.clear()  # what was queued went out
                link.down, link.reached = False, True
                self._unreached.discard(link.contact)
            elif event == zmq.EVENT_DISCONNECTED:
                if not link.reached:
                    # Nothing went out on it: its steps wait for a handshake (a hop that closes
                    # each connection before one succeeds, a wrong key say, drops it every ~100
                    # ms; taken for a drop, the steps were forgotten a second later and never
                    # answered: review116). expire answers them.
                    continue
                if not link.down:
                    link.down, link.down_since = True, time.monotonic()
                since = time.monotonic() - DROP_WINDOW
                link.recent = deque(((k, t) for k, t in link.recent if t >= since), maxlen=link.recent.maxlen)
            elif event & HANDSHAKE_REFUSED:
                self._refused(link)
                return

    def take_failed(self) -> list[tuple[bytes, list]]:
        """The `relay_failed` answers for steps lost with links closed since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def _refused(self, link: RelayLink) -> None:
        contact = link.contact
        if self._links.get(contact) is link:
            del self._links[contact]
        self._close(contact, link, lost=f"the next hop {contact[:80]} refused this node's handshake")
        now = time.monotonic()
        if now - self._warned.get(contact, float("-inf")) >= REFUSED_WARN_SECONDS:
            if len(self._warned) >= MAX_LINKS:
                self._warned.clear()
            self._warned[contact] = now
            log.warning("the next hop %s refused this node's handshake (is this node's key on its --allow-keys?): "
                        "relayed steps to it fail, and their clients send them stage by stage", contact[:120])

    def _close(self, contact: str, link: RelayLink, lost: str | None = None) -> None:
        """Close a link; with `lost` (why), answer the steps that may wait on it `relay_failed`:
        ZeroMQ drops them with the link, and their clients would wait their whole timeout."""
        for key, _ in link.recent if lost is not None else ():
            relay = self._sent.pop(key, None)
            if relay is not None:
                self._failed.append((relay.owner, self.error(relay.reply, ErrorCode.RELAY_FAILED, lost[:500])))
        if self.on_close:
            self.on_close(link)
        link.socket.close(linger=0)  # (its monitor stopped first: client/monitors.py)

    def close(self) -> None:
        while self._links:
            self._close(*self._links.popitem())
