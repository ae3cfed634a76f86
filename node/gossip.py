"""Gossip of signed records between nodes (push-pull over the existing `records` request).

Every node owns a RecordTable (keys/table.py) holding the latest verified record of every peer,
its own included.  A round (every `interval` seconds) sends our wires to `fanout` random known
peers, plus the bootstrap nodes while we know few peers (and every tenth round after), in one
`records` request with want=True; the reply carries their table, offered to ours.  Both sides
learn from one exchange, so a record reaches all N nodes in about log(N) rounds.

Links to peers (node/gossip_links.py) are sent on without blocking and read by the server loop:
a dead peer never stalls serving, and one silent past `peer_timeout` is forgotten locally (a newer
record from it brings it back).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nanoswarm.keys.contact import endpoint_of
from nanoswarm.keys.identity import Identity
from nanoswarm.keys.records import DEFAULT_MAX_TTL, record_contact, seq_now, sign_departure, sign_record
from nanoswarm.keys.table import RecordTable
from nanoswarm.protocol.bounds import MIN_GOSSIP_INTERVAL
from nanoswarm.protocol.messages import Message

from .clock_watch import ClockWatch
from .gossip_links import GossipLinks
from .gossip_peers import TablePeers

if TYPE_CHECKING:
    from .handler import RequestHandler
    from .server import NodeServer

log = logging.getLogger(__name__)

MAX_WIRES = 128  # records sent in one message (twice as many are taken from one: offer_all)
OURS_SHARE = 0.75  # of a gossip message, at most this share goes first to our model's records
DEPART_FANOUT = 16  # known peers told directly of our departure; gossip carries it on
WIRE_BUDGET = 48 * 1024  # bytes of records per message, under the 64 KiB header limit
UNREACHABLE_GRACE = 1.0  # seconds a start-up exchange still waits for a contact that refused to connect
OVERTAKEN_WARN_SECONDS = 60.0  # how often a node says again that records of its identity overtake its own
# Rounds a node that knows peers may go with none of them (nor a client) sending it records before
# it warns that its advertised address may not reach it: peers push to ~fanout random others a
# round, so a reachable node goes 30 rounds unreached about never. A wrong --advertise showed
# only in the other nodes' logs (review92).
UNREACHED_ROUNDS = 30


@dataclass
class GossipOptions:
    bootstrap: list[str] = field(default_factory=list)  # contact strings
    ttl: float = 60.0            # lifetime of our record; re-signed every ttl/3
    interval: float = 1.0        # seconds between rounds
    fanout: int = 3              # random known peers per round
    peer_timeout: float = 10.0   # seconds without an answer before a link is dropped
    max_ttl: float = DEFAULT_MAX_TTL

    def check(self) -> None:
        """ValueError naming the option that cannot hold (the node checks before it loads blocks)."""
        if not 0 < self.ttl <= self.max_ttl:
            raise ValueError(f"--ttl must be in (0, {self.max_ttl:.0f}] seconds")
        if not self.interval >= MIN_GOSSIP_INTERVAL:  # each round asks peers for records
            raise ValueError(f"--gossip-interval must be at least {MIN_GOSSIP_INTERVAL:g} s")
        if self.ttl < 3 * self.interval:  # tables came up mostly empty with --ttl 2 --gossip-interval 3
            raise ValueError(f"--ttl {self.ttl:g} is shorter than three --gossip-interval {self.interval:g} "
                             f"({3 * self.interval:g} s): records would expire before they spread")


class Gossip(TablePeers):
    def __init__(self, identity: Identity, handler: RequestHandler, address: str,
                 options: GossipOptions | None = None, insecure: bool = False,
                 allow_keys: set[bytes] | None = None):
        self.identity = identity
        self.handler = handler
        self.address = address  # our endpoint, as announced
        self.options = options or GossipOptions()
        self.options.check()
        self.insecure = insecure
        # A private swarm (--allow-keys) keeps only records of its own members (and ours): the
        # allow list guards the node's socket, and without this a member could still hand it an
        # outsider's record, which it would then gossip with, relay steps to, and name to clients.
        admits = None if allow_keys is None else (
            lambda r: r.peer_id == identity.peer_id or (not r.insecure and r.curve_key in allow_keys))
        self.table = RecordTable(max_ttl=self.options.max_ttl, admits=admits)
        self.table.on_join = self._joined
        self.table.on_refresh = self._renewed
        self.own: dict[str, bytes] | None = None
        self._own_seq = -1  # the seq of self.own
        self._overtaken = float("-inf")  # when a live copy's record last made us sign above it
        self._overtaken_seq = -1  # the highest seq of our identity not ours that we have seen
        self._warned: dict[str, float] = {}  # warning kind -> when last logged
        self.departed = False
        self.rounds = 0
        self._last_tick: tuple[float, float] | None = None  # (monotonic, wall clock) at the last check_stalled
        self._signed_at = -math.inf  # monotonic, when refresh last signed our record
        self._reached = time.monotonic()  # when a peer or client last sent us records: we are reachable
        self._unreached_warned = False
        # callable(contact), set by attach: starts the relay link to a peer that joined with
        # blocks that begin where ours end, before any session pins it (RelayLinks.warm)
        self.on_next_hop: Callable[[str], None] | None = None
        self.links = GossipLinks(address, (identity.curve_public, identity.curve_secret),
                                 self.options.peer_timeout, on_records=self.offer_all, on_silent=self._forget)
        self.clock = ClockWatch(self.options.ttl, self.options.interval)  # ours against our peers'
        self.links.on_clock = self.clock.offsets.add
        self.stats: dict[str, Any] = {}
        self._known: set[tuple[str, bytes | None]] = set()  # (endpoint, CURVE key) of our model's live records
        self._knows: dict[str, bool] = {}  # knows() by contact string, until the table changes
        handler.on_records = self.on_records
        handler.can_relay = self.knows
        handler.extra_info["gossip"] = self.stats  # the same dict, kept current by _update_stats

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def attach(self, server: NodeServer) -> None:
        self.links.attach(server)
        self.on_next_hop = server.relays.warm
        server.add_timer(self.options.interval, self.round)
        server.each_second.append(self.check_stalled)
        self.check_stalled()  # from now: a node stopped before its first second stalled too
        server.add_timer(self.options.ttl / 3, self.refresh)
        server.on_leave.append(self.depart)

    # ----- our record ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Sign a fresh record of what we serve now; it replaces the old one everywhere."""
        if self.departed:
            return
        self._signed_at = time.monotonic()
        blocks, info = self.handler.blocks, self.handler.info()
        # Above any seq held for our identity: wall-clock microseconds grow across restarts only
        # while the clock does (see _check_overtaken).
        held = self.table.held_seq(self.peer_id)
        self._own_seq = seq_now() if held is None else max(seq_now(), held + 1)
        self.own = sign_record(
            self.identity, address=self.address, model_id=self.handler.model_id,
            layers=(blocks.start, blocks.stop), heads=tuple(blocks.heads) if self.handler.head_shard else None,
            throughput=float(self.handler.stats.throughput), load=float(info.get("load") or 0.0),
            seq=self._own_seq, expires=time.time() + self.options.ttl, insecure=self.insecure)
        result = self.table.offer(self.own)
        self.clock.own_taken += result == "accepted"
        if result != "accepted":
            log.warning("our own record was not accepted by our table: %s", result)
        self._update_stats()

    def depart(self) -> None:
        """On SIGTERM: sign a departure (expires now) and push it to up to DEPART_FANOUT random
        peers we know and our bootstraps (the rest hear of it by gossip).

        Not waiting here: the server keeps polling through its leave grace period, during which
        the messages go out and their acknowledgements are read (other nodes may be leaving too,
        and must not wait on each other).
        """
        if self.departed or self.own is None:
            return
        last = self.table.get(self.peer_id)
        if last is None:
            return
        departure = sign_departure(self.identity, last, seq=max(seq_now(), last.seq + 1))
        if self.table.offer(departure) != "departed":  # a table whose tombstones are full refuses it
            self.table.remove(self.peer_id)  # still, we no longer offer our own record to anyone
        self.departed = True
        known = self._known_contacts()
        # A sample, not everyone: the peers told pass the departure on like any record, and a
        # link per peer of a large table would use up the process's sockets.
        sample = random.sample(known, min(DEPART_FANOUT, len(known)))
        targets = list(dict.fromkeys(sample + self.options.bootstrap[:DEPART_FANOUT]))
        for contact in targets:
            self._send(contact, [departure], want=False)
        log.info("announced departure to %d peer%s (bootstraps included)", len(targets),
                 "" if len(targets) == 1 else "s")

    # ----- serving the records request ----------------------------------------------------
    def on_records(self, msg: Message) -> dict:
        """Handler hook: offer the pushed wires to our table; return our table if asked (the
        `records_reply` fields). With `model_id` (a client's request), the live records of that
        model only, in pages by peer id from `after`; `after` in the reply is where the next page
        starts, absent after the last one. Without it (gossip), a sample of every record: a table
        of many peers (or of many throw-away records) would otherwise crowd a client's peers out."""
        self._reached, self._unreached_warned = time.monotonic(), False
        self.offer_all(msg.get("records") or [])
        if not msg.get("want"):
            return {"records": []}
        now = time.time()  # the asker sees how far its clock is from ours (keys/clock.py)
        model_id = msg.get("model_id")
        if model_id is None:
            return {"records": self._wires(), "now": now}
        after = msg.get("after") or ""
        page, size = [], 0
        for record, wire in self.table.live_wires(model_id):
            if record.peer_id <= after:
                continue
            size += len(wire["body"]) + len(wire["sig"]) + 16  # msgpack framing
            if size > WIRE_BUDGET or len(page) == MAX_WIRES:
                return {"records": [w for _, w in page], "after": page[-1][0], "now": now}
            page.append((record.peer_id, wire))
        return {"records": [w for _, w in page], "now": now}

    def offer_all(self, wires: list) -> dict[str, int]:
        results: dict[str, int] = {}
        for wire in wires[: 2 * MAX_WIRES]:
            result = self.table.offer(wire)
            results[result] = results.get(result, 0) + 1
        if results.keys() & {"accepted", "departed"}:
            self._check_overtaken()
        if results:  # a pass over the whole table: not for a request that only asks
            self._update_stats()
        return results

    def _check_overtaken(self) -> None:
        """A record of our identity that we did not sign, with a seq above ours, got into our
        table: signed by this node's earlier run on a clock ahead of ours now (another host, or
        the clock stepped back), whose record or departure would hide us from the swarm until it
        lapses (minutes: a review), or by another node started with a copy of our key file. We
        sign above it at once, except above a live record signed in our past: that is a copy
        signing now, and the two would take turns at every exchange, so then at most once per
        ttl/3 (the timed refresh signs above it anyway). Warned about, naming what overtook us."""
        if self.own is None or self.departed:
            return
        held = self.table.held_seq(self.peer_id)
        if held is None or held <= self._own_seq or held == self._overtaken_seq:
            return
        again = self._overtaken_seq > 0  # overtaken before, since this run signed above the first
        self._overtaken_seq = held
        self.stats["overtaken"] = self.stats.get("overtaken", 0) + 1
        other = self.table.get(self.peer_id)  # None: a departure overtook us
        ahead = (held - seq_now()) / 1e6
        now = time.monotonic()
        copy_now = other is not None and ahead <= 0  # a live record signed in our past
        resign = not copy_now or now - self._overtaken >= self.options.ttl / 3
        if copy_now and resign:
            self._overtaken = now
        what = (f"a departure of this node's identity ({self.peer_id})" if other is None else
                f"a record of this node's identity ({self.peer_id}) at {other.address}, blocks "
                f"{other.layers[0]}:{other.layers[1]},")
        when = f"signed {ahead:.1f} s ahead of this node's clock" if ahead > 0 else "newer than ours"
        if again and copy_now:
            kind, why = "copy", ("another node runs with a copy of this node's key file (give each node its own "
                                 "--key-file): its records keep overtaking ours")
        else:
            kind, why = "earlier", ("this node's earlier run (on a clock ahead of this one's), or another node with "
                                    "a copy of this key file")
        then = ("signing our record above it" if resign else
                f"our next record (within {self.options.ttl / 3:g} s) signs above it")
        if now - self._warned.get(kind, float("-inf")) >= OVERTAKEN_WARN_SECONDS:
            self._warned[kind] = now
            log.warning("%s %s: %s; %s", what, when, why, then)
        if resign:
            self.refresh()

    def _wires(self) -> list:
        """What we gossip: our own record first, then the others of our model, then the rest (a
        random part of each when they would not fit one message; other rounds carry the rest).
        Our model's come before the rest because its nodes need one another's records most (relay
        targets, placement), and a table shared with other models' peers can hold more records
        than one message carries; but at most OURS_SHARE of a message while others' wait, or a
        node of many of our model's peers would never pass the other models' on (review142)."""
        ours, rest = self.table.wires_split(self.handler.model_id)
        own = [w for w in ours if self.own is not None and w["body"] == self.own["body"]]
        ours = [w for w in ours if not own or w["body"] != own[0]["body"]]
        random.shuffle(ours)
        random.shuffle(rest)
        first = int(MAX_WIRES * OURS_SHARE)
        out, size = [], 0
        for wire in own + ours[:first] + rest + ours[first:]:
            size += len(wire["body"]) + len(wire["sig"]) + 16  # msgpack framing
            if size > WIRE_BUDGET or len(out) == MAX_WIRES:
                break
            out.append(wire)
        return out

    def _update_stats(self) -> None:
        known = {(r.address, None if r.insecure else r.curve_key) for r in self.table.records()
                 if r.model_id == self.handler.model_id}
        if known != self._known:
            self._known, self._knows = known, {}
        self.stats.update(records=len(self.table), rounds=self.rounds, accepted=self.table.accepted,
                          departed=self.table.departed, rejected=dict(self.table.rejected),
                          links=len(self.links))

    # ----- rounds -------------------------------------------------------------------------
    def _known_contacts(self) -> list[str]:
        return list(dict.fromkeys(record_contact(r) for r in self.table.records() if r.peer_id != self.peer_id))

    def _round_targets(self, known: list[str]) -> list[str]:
        """Up to `fanout` contacts at distinct endpoints, each endpoint as likely as another: 4,100
        throw-away identities naming one endpoint drew nearly every round to it, and honest
        peers' records lapsed unrefreshed (a review; then `table_full` kept them out)."""
        by_endpoint: dict[str, list[str]] = {}
        for contact in known:
            by_endpoint.setdefault(endpoint_of(contact), []).append(contact)
        endpoints = random.sample(list(by_endpoint), min(self.options.fanout, len(by_endpoint)))
        return [random.choice(by_endpoint[e]) for e in endpoints]

    def round(self) -> None:
        if self.departed:
            return
        self.drain()  # drops links silent for longer than peer_timeout
        self.rounds += 1
        self.table.expire()
        known = self._known_contacts()
        self.clock.check(self.rounds, self.table, self.stats)
        self._check_reached(known)
        targets = self._round_targets(known)
        if len(known) < self.options.fanout or self.rounds % 10 == 1:
            targets += self.options.bootstrap
        wires = self._wires()
        for contact in dict.fromkeys(targets):
            self._send(contact, wires, want=True)
        self._update_stats()

    def check_stalled(self) -> None:
        """Called every second (NodeServer.each_second). A node that did not run for longer than
        `peer_timeout` (stopped, its machine suspended, starved of CPU, or its loop held by long
        work such as a move's load) has been forgotten by the peers that asked it meanwhile, its
        record held as their floor: they took it again only at its next refresh, up to ttl/3
        later, and relayed no step to it until then (review139: a hop stopped for 12 s). It signs
        a fresh record and sends it at once instead, and does not warn that no peer reached it
        for that gap. Both clocks count: a suspended machine's monotonic clock stands still, and a
        wall clock stepped forward costs one record more. Timed by this second's check, not by the
        rounds: a stop shorter than a long --gossip-interval looked like a round's gap (review143).
        Not again where a record was signed since the last check: a move whose load held the loop
        signs and gossips its new blocks itself (review144: it signed twice)."""
        now = (time.monotonic(), time.time())
        last, self._last_tick = self._last_tick, now
        if last is None or self.departed:
            return
        gap = max(now[0] - last[0], now[1] - last[1])
        if gap <= self.options.peer_timeout:
            return
        self._reached = now[0]  # not reached while not running: that says nothing of its address
        if self._signed_at <= last[0]:
            log.info("this node did not run for %.0f s (stopped, suspended, starved of CPU, or its loop held): its "
                     "peers may have forgotten it; signing its record again", gap)
            self.refresh()
            self.round()

    def _check_reached(self, known: list[str]) -> None:
        """Warn once when peers this node knows have not reached it for UNREACHED_ROUNDS rounds
        (the count starts when it first knows one)."""
        now = time.monotonic()
        if not known:
            self._reached = now
        elif not self._unreached_warned and now - self._reached > UNREACHED_ROUNDS * self.options.interval:
            self._unreached_warned = True
            why = self.clock.unreached_why() or ("peers and clients connect to the address a node advertises "
                                                 "(check --advertise, --listen and the firewall)")
            log.warning("no peer has reached this node at %s for %.0f s, though it knows %d: %s",
                        self.address, now - self._reached, len(known), why)

    def exchange_now(self, contacts: list[str], timeout: float = 3.0) -> dict[str, str | None]:
        """Push and pull with `contacts`, waiting up to `timeout` for the answers (start-up, before
        serving: the swarm knows us when `listening` is printed), or until every contact not yet
        answered is known unreachable (after UNREACHABLE_GRACE: a bootstrap started at the same
        moment may come up meanwhile, and ZeroMQ sends the request when it does). Returns, for each
        contact asked (not our own: one list of bootstraps may be given to every node), None if it
        answered, else why not."""
        sent = {contact: self.links.get(contact) for contact in dict.fromkeys(contacts)
                if endpoint_of(contact) != self.address}
        for contact in sent:
            self._send(contact, self._wires(), want=True)
        t0 = time.monotonic()
        deadline, grace = t0 + timeout, t0 + min(timeout, UNREACHABLE_GRACE)
        waiting = lambda: [link for link in sent.values() if link is not None and link.pending]  # noqa: E731
        while time.monotonic() < deadline and (time.monotonic() < grace and waiting()
                                               or any(not link.conn.dropped for link in waiting())):
            self.drain()
            time.sleep(0.01)
        self.drain()
        return {contact: self.links.unanswered(contact, link, timeout) for contact, link in sent.items()}

    def _send(self, contact: str, wires: list, want: bool) -> None:
        # A departure's acknowledgement is awaited too: the server's leave grace reads it
        self.links.send(contact, wires, want, await_answer=want or self.departed)

    def drain(self) -> int:
        """Read the gossip replies that have arrived (GossipLinks.drain); returns replies read."""
        return self.links.drain()

    def close(self) -> None:
        self.links.close()
