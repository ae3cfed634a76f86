"""The client's view of the swarm: its peer table (client/peer_table.py: who serves what, who is
banned, the route to take), and the links to those peers, with the sessions open over them."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq

from nanoswarm import descriptors
from nanoswarm.keys.contact import endpoint_of, split_contact
from nanoswarm.keys.records import check_endpoint

from .background import BackgroundFetch
from .head_group import HeadGroupStage
from .options import SwarmOptions as SwarmOptions  # applications import it from here
from .peer_errors import PeerError
from .peer_table import PeerTable
from .route import RouteError, StagePlan
from .stages import RemoteLayerStage, Stage, open_fields
from .transport import RECONNECT_MAX_MS, PeerConnection
from .verify import FanOutRecord, SpotChecker

log = logging.getLogger(__name__)

# Drops of links closed while down and holding nothing, kept for the next link to the same peer
# (Swarm.drain_events), at most this many: the oldest go first.
MAX_DROPS_KEPT = 1024
# The link closed would have been back this long after its peer, at most (libzmq's reconnects
# back off to RECONNECT_MAX_MS), and its drop then forgiven (PeerConnection.forgive_if_back): a
# drop kept longer is passed on as one that lost nothing, reported only if the peer is not back
# by the next link's first request (review140: a peer restarted since was struck and banned).
DROP_FRESH_SECONDS = RECONNECT_MAX_MS / 1000
DRAIN_SECONDS = 5.0  # the most time between two reads of every connection's events (Swarm.drain_events)
EARLY_SETTLE_SECONDS = 2.0  # the most a failed route's open waits for its unclaimed early opens' answers
INTRODUCE_SECONDS = 5.0  # the least time between two introductions asked for by hops that knew no next (introduce_soon)
FAN_OUT_SECONDS = 120.0  # how long head-group members whose all-reduce failed with no one at fault fan out


@dataclass
class Swarm(PeerTable):
    """A client's peer table and its links to those peers: one PeerConnection a peer, made on
    first use, closed when the peer is banned or forgotten, or when it dropped and holds nothing
    (drain_events)."""
    _conns: dict[str, PeerConnection] = field(default_factory=dict)
    # drops of links closed while down and holding nothing, for the next link to each peer (drain_events)
    _drops: dict[str, tuple[tuple[tuple[str, str], bool], float]] = field(default_factory=dict)  # (drop, when)
    _drained: float = -DRAIN_SECONDS
    checker: SpotChecker | None = None  # set by SwarmModel.connect when options.verify > 0
    _abandoned: deque[list[Stage]] = field(default_factory=deque)  # stages of sessions dropped unclosed
    # head-group members (their addresses) whose all-reduce failed with no one at fault: until when
    # their groups fan out (make_stage)
    _fan_out_until: dict[frozenset[str], float] = field(default_factory=dict)

    def held(self, address: str) -> int:
        conn = self._conns.get(address)
        return len(conn.sessions) if conn is not None else 0

    def _link_in_use(self, address: str) -> bool:
        conn = self._conns.get(address)
        return conn is not None and conn.in_use

    def _close_link(self, address: str) -> None:
        """Close the link to `address` and the sessions still open over it: other sessions on
        the peer (of other InferenceSessions sharing the swarm) lose their link with it, and a
        live peer would hold their KV caches until its idle timeout (a stalled one reads the
        closes when it resumes). The socket lingers for those closes and for any queued before
        (Failover._replace closes the failed stage first)."""
        self._drops.pop(address, None)
        conn = self._conns.pop(address, None)
        if conn is not None:
            conn.close_sessions()
            conn.close(linger_ms=200 if conn.closes_queued else 0)

    # ----- connections and stages ---------------------------------------------------------
    def connection(self, address: str) -> PeerConnection:
        """The link to `address` (a contact string, endpoint#key): CURVE with the peer's key from
        its signed record or its contact; a peer without a key only with options.insecure."""
        if self.closed:  # a link made now would outlive close(), with whatever it opened
            raise RuntimeError("this SwarmModel is closed")
        conn = self._conns.get(address)
        if conn is None:
            info = self.peers.get(address)
            try:
                check_endpoint(endpoint_of(address))
                key = info.curve_key if info is not None and info.curve_key is not None else split_contact(address)[1]
            except ValueError as e:
                raise PeerError(address, "bad_contact", str(e)) from None
            if key is None and not self.options.insecure:
                raise PeerError(address, "insecure", "no CURVE key for this peer: give its contact "
                                "(ADDRESS#KEY, printed by the node) or allow unencrypted links with --insecure")
            try:
                conn = PeerConnection(address, self.options.timeout, server_key=key,
                                      client_keys=self.options.client_keys, heartbeat=self.options.silence,
                                      forgive_idle_drops=True)
            except (ValueError, zmq.ZMQError) as e:  # an endpoint ZeroMQ cannot connect to
                descriptors.check(e)  # or none left here for a socket: no fault of the peer's (review141)
                raise PeerError(address, "bad_contact", f"cannot connect: {e}") from None
            if (kept := self._drops.pop(address, None)) is not None:
                (why, harmless), when = kept
                conn.take_over_drop((why, harmless or time.monotonic() - when > DROP_FRESH_SECONDS))
            self._conns[address] = conn
        return conn

    def abandon(self, *stages: list[Stage]) -> None:
        """The stage lists of a session dropped without `close` (InferenceSession's finalizer: its
        route, and a failover's replacements not on it yet): closed
        at the next step or session of this swarm (drain_events), on the thread that holds its
        sockets then; a finalizer may run on any thread, even in the middle of another step. Left
        open, each held a session slot and its KV cache on its node until the idle timeout."""
        self._abandoned.extend(stages)

    @property
    def has_abandoned(self) -> bool:
        """Whether sessions dropped unclosed wait for `drain_events` to close them."""
        return bool(self._abandoned)

    def drain_events(self) -> None:
        """Close what sessions dropped unclosed left open (`abandon`). Read every connection's
        monitor events (PeerConnection.drain_events), at most every DRAIN_SECONDS (each session
        step asks): a connection to a peer that is on no route is read by nothing else, and a dead
        peer's unread reconnect events would end up blocking ZeroMQ's I/O thread, and with it every
        link of this client. Connections that dropped and hold nothing are closed."""
        while self._abandoned:
            for stage in self._abandoned.popleft():
                stage.close()
        now = time.monotonic()
        if now - self._drained < DRAIN_SECONDS:
            return
        self._drained = now
        for address, conn in list(self._conns.items()):
            conn.drain_events()
            if conn.down and not conn.in_use:
                # libzmq retries it for as long as it is open, every 10 s at most, and every 100 ms
                # where a node with another key took the address (review137). A fresh link, if it
                # is asked again, connects at once, and reports this one's drop in its place.
                drop = conn.unreported_drop()
                self._close_link(address)
                if drop is not None:
                    self._drops[address] = (drop, time.monotonic())
                    while len(self._drops) > MAX_DROPS_KEPT:
                        del self._drops[next(iter(self._drops))]

    def connect_ahead(self, addresses: Iterable[str]) -> None:
        """Start the link to each of `addresses` now: their handshakes (a few round trips each)
        run together, not one after another as the stages open (review92: 1.85 s a stage at a
        300 ms round trip, for peers learnt from a bootstrap's records). A link that cannot be
        made is left to its first request to report."""
        for address in addresses:
            try:
                self.connection(address)
            except PeerError:
                pass

    def connect_route_ahead(self) -> None:
        """Start the links of the route a session would take now, as soon as the peers are
        known: their handshakes then run while the client loads its own weights (the head:
        ~1.7 s for GPT-2 small), not when the first session opens. A route that cannot be built
        yet is left to the first session, which refreshes and says what is missing."""
        try:
            plans = self._plan(0, None, None, {})
        except RouteError:
            return
        self.connect_ahead(p.address for plan in plans for p in plan.peers)

    def open_ahead(self, plans: list[StagePlan], max_length: int) -> None:
        """Queue the `open` of every peer of `plans` now (PeerConnection.open_early): each stage's
        open then finds its answer on the way, and a route of n stages opens in about one round
        trip, not n (1.2 s for 3 stages at a 300 ms round trip). Opens queued before for plans
        not among these are left to be closed as their answers come. One that cannot be queued
        is left to the stage's own open."""
        wanted: dict[str, list[dict]] = {}
        for plan in plans:
            for p, heads in zip(plan.peers, plan.peer_heads(self.n_head)):
                wanted.setdefault(p.address, []).append(open_fields(self.model_id, max_length, plan.start, plan.stop,
                                                                    heads))
        for address in [*wanted, *(a for a in self._conns if a not in wanted)]:
            try:
                conn = self.connection(address)
            except PeerError:
                continue
            try:
                conn.open_early(wanted.get(address, []))
            except PeerError as e:
                conn.put_back(e)  # a drop is the sessions' over this link to read (review106)

    def settle_early(self, wait: bool = True) -> None:
        """Close the sessions of opens sent ahead that no stage took (open_ahead: a plan that
        changed, a route that failed). Nothing else reads their answers: each held a session
        and its KV reservation on its node until the link closed or the idle timeout (review95).
        With `wait`, answers not yet come are awaited up to EARLY_SETTLE_SECONDS in all; without
        (Ctrl-C), or past that, they are left to be closed when read."""
        deadline = time.monotonic() + (EARLY_SETTLE_SECONDS if wait else 0.0)
        for conn in list(self._conns.values()):
            conn.settle_early(deadline)

    def make_stage(self, plan: StagePlan) -> Stage:
        if plan.is_head_group:
            members = [(self.connection(p.address), h) for p, h in zip(plan.peers, plan.peer_heads(self.n_head))]
            together = frozenset(p.address for p in plan.peers)
            group = HeadGroupStage(members, plan.start, plan.stop, self.model_id,
                                   self.options.wire, self.options.timeout,
                                   names={p.address: p.relay_name or p.address for p in plan.peers},
                                   all_reduce=self.options.all_reduce and not self._fans_out(together))
            group.on_fan_out = lambda why: self._fan_out(together, why)
            if self.checker is not None:  # spot checks need each member's partials (client/verify.py)
                group.record = FanOutRecord()
            return group
        peer = plan.peers[0]
        return RemoteLayerStage(self.connection(peer.address), plan.start, plan.stop, self.model_id,
                                self.options.wire, self.options.timeout, peer.relay_name,
                                heads=plan.peer_heads(self.n_head)[0])

    def _fans_out(self, members: frozenset[str]) -> bool:
        """Whether these members' all-reduce failed with no one at fault in the last
        FAN_OUT_SECONDS: their groups are met by the client meanwhile (review129: a member that
        could not send to another cost every new session a failed step and a reopen)."""
        return self._fan_out_until.get(members, 0.0) > time.monotonic()

    def _fan_out(self, members: frozenset[str], why: str) -> None:
        now = time.monotonic()
        if len(self._fan_out_until) >= 256:
            self._fan_out_until = {k: t for k, t in self._fan_out_until.items() if t > now}
        self._fan_out_until[members] = now + FAN_OUT_SECONDS
        if why == "not_served":  # a member that does not know another: tell the contacts of each other
            self.introduce_soon()

    def introduce_soon(self) -> bool:
        """A hop refused to relay to the next (`not_served`): it does not know it. A node that
        restarted without a bootstrap knows no one, and was told of the others only at the
        contacts' next background read, up to TABLE_SECONDS on; the sessions opened meanwhile went
        stage by stage at that hop. The read starts now (client/background.py), telling the
        `--peers` contacts of each other (client/introduce.py), at most once every
        INTRODUCE_SECONDS for a swarm and its siblings (SharedReads); its `info` replies are taken in
        at a later open, as refresh_stale's. False where it did not start: nothing to introduce,
        too soon, or a read under way (this table's own, or a sibling's that serves it, then
        adopted), which introduces as well."""
        now = time.monotonic()
        if not self.introduces or not self.contacts or self.closed:
            return False
        with self._reads.lock:  # one introduction for a swarm and its siblings (SharedReads)
            latest = self._serving_read()
            if latest is not None and not latest.done.is_set():  # a read under way introduces too
                if self._fetching is None:
                    self._fetching = latest
                return False
            own = self._fetching
            if own is not None and not own.done.is_set() or now - self._reads.introduced < INTRODUCE_SECONDS:
                return False
            self._reads.introduced = now
            self._fetching = self._reads.latest = BackgroundFetch(self, min(5.0, self.options.timeout))
        log.info("a hop did not know the next: telling the %d contacts of each other again", len(self.contacts))
        return True

    def sibling(self) -> Swarm:
        """A swarm of the same peers, contacts, bans, bootstraps, round trips and spot checker,
        with links of its own: for another thread (ZeroMQ sockets are one thread's at a time), as
        SwarmModel.generate_batch runs one generation a thread. What it learns of peers stays its
        own until `take_learned`. (The contacts too: a `--peers` swarm asks them again when no route
        is left, review174.) As old as this one's table: a sibling of a table read an hour ago
        reads it again at its first open, as this one would (refresh_stale), not a minute on,
        or takes in this one's read under way."""
        other = Swarm(self.model_id, self.n_layer, self.n_head, self.options)
        other.peers.update(self.peers)
        other._learned.update(self._learned)
        other.contacts.update(self.contacts)
        other.rejected.update(self.rejected)
        other.bans.update({a: dataclasses.replace(b) for a, b in self.bans.items()})
        other.bootstraps, other.checker = list(self.bootstraps), self.checker
        other.timed.update(self.timed)
        other.timed_at.update(self.timed_at)
        other._asked, other._refreshed, other._read_began = self._asked, self._refreshed, self._read_began
        # This table's read under way is the sibling's too, taken in at its first open after it
        # came: a read of its own would be one more of the same, one a sibling (review182: a
        # stale batch of 8 read the bootstraps' tables 9 times), and one marked fresh instead
        # ran the whole batch on the stale table (review183). The read is not changed by taking it in.
        other._fetching, other._reads = self._fetching, self._reads  # and the reads it starts later
        return other

    def take_learned(self, other: Swarm) -> None:
        """What `other` (a sibling) learned, learned here too: the bans it made or lengthened, and
        the peers it found that this table lacks (review192: a batcher's workers learned the peers
        that joined, the model's table never did, and once its bootstraps were gone every
        `generate` and every new worker planned over dead peers). Not one this table dropped (it
        went, or was forgotten: `dropped`) after the sibling last learned of it (review193: a
        sibling's read since, of a peer back at its address, is taken), nor one banned here now,
        nor another table's version of a peer known here (which is newer is not known: `reread`
        settles it)."""
        for address, ban in other.bans.items():
            mine = self.bans.get(address)
            if mine is None or ban.until > mine.until:
                self.bans[address] = dataclasses.replace(ban)
        now = time.monotonic()
        for address, peer in other.peers.items():
            learned = other._learned.get(address, -math.inf)
            if (address in self.peers or address in self._dropped and self._dropped[address] >= learned
                    or address in self.bans and self.bans[address].until > now):
                continue
            self.peers[address] = peer
            self._learned[address] = learned if learned > -math.inf else now
            self.rejected.pop(address, None)
            if address in other.timed:
                self.timed[address] = other.timed[address]
                if address in other.timed_at:
                    self.timed_at[address] = other.timed_at[address]

    def close(self) -> None:
        self.closed = True
        self.close_links()

    def close_links(self) -> None:
        """Close every link, and the sessions still open over them (their nodes free the KV
        caches now); links are made again on first use."""
        self._abandoned.clear()  # their sessions are among those closed here
        for address in list(self._conns):
            self._close_link(address)
        self._drops.clear()  # (fresh links: `load` resets so between runs)
