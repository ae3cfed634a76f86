"""The swarm table: the verified, latest record of every known peer, ready to gossip onward.

Rules (per peer_id):
* A record is accepted only if it verifies (see records.verify_record) and its seq is higher than
  any seq held for that peer, whether from a live record or from a departure ("stale_seq"
  otherwise).  So replaying an old record can neither roll a peer back nor resurrect one that left.
* A verified departure with a newer seq removes the peer and leaves a tombstone holding that seq.
  The tombstone is kept until every record the peer signed before leaving must have expired
  (its last record's expiry, and at least max_ttl after the departure), after which an old record
  would be rejected as "expired" anyway.
* A rejected offer never changes the table.  Expired entries are invisible to readers and dropped
  by `expire()`.
* The table holds at most `max_peers` peers and as many tombstones: anyone can sign records with
  keys of their own, so without a bound a flood of them would grow memory and every gossip
  exchange without end.  When full, a record of a peer not held is refused ("table_full") until
  entries expire or are forgotten (gossip forgets peers that do not answer); peers already held
  keep updating. With the tombstones full a departure is refused too: the peer's record stays
  until it expires, and no tombstone is pushed out for it (else throw-away departures could
  bring back a peer that left).

Not thread-safe: each socket loop owns its own table.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .records import DEFAULT_MAX_TTL, Record, RecordRejected, verify_wire

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
DEPARTED = "departed"
STALE_SEQ = "stale_seq"
TABLE_FULL = "table_full"
NOT_ALLOWED = "not_allowed"
DEFAULT_MAX_PEERS = 4096


@dataclass(frozen=True)
class _Entry:
    record: Record
    wire: dict[str, bytes]  # the exact signed form, re-sent as is


@dataclass(frozen=True)
class _Tombstone:
    seq: int
    until: float  # drop after this; older records are expired by then
    departure: _Entry | None  # the signed departure, gossiped while receivers still accept it


class RecordTable:
    """Latest verified record per peer.  `offer` is the only way in from the network."""

    def __init__(self, max_ttl: float = DEFAULT_MAX_TTL, clock: Callable[[], float] = time.time,
                 max_peers: int = DEFAULT_MAX_PEERS, admits: Callable[[Record], bool] | None = None) -> None:
        self.max_ttl = max_ttl
        self.max_peers = max_peers
        self.admits = admits  # a private swarm's rule (--allow-keys): verified records it refuses stay out
        self.clock = clock
        self.accepted = 0
        self.departed = 0
        self.rejected: Counter[str] = Counter()
        self._entries: dict[str, _Entry] = {}
        self._signed: dict[bytes, bytes] = {}  # body -> signature of every entry (see offer)
        self._tombstones: dict[str, _Tombstone] = {}
        self._full_since = float("-inf")  # when a full table last dropped its expired entries
        # Called with each record whose peer the table did not hold live: a join, or a return
        # after expiry or departure (a node logs it; a refresh of a live record is not one).
        self.on_join: Callable[[Record], None] | None = None
        # Called with each newer record of a peer the table held live (a refresh, not a join): the
        # peer signed it after what the table held (gossip takes it as a sign of life:
        # GossipLinks.renewed).
        self.on_refresh: Callable[[Record, Record], None] | None = None  # (the new record, the old)

    # -- intake ---------------------------------------------------------------------------------

    def offer(self, wire: object) -> str:
        """Verify and apply a wire record.  Returns "accepted", "departed" or a rejection reason."""
        now = self.clock()
        body = wire.get("body") if isinstance(wire, dict) else None
        if isinstance(body, bytes) and body in self._signed and self._signed[body] == wire.get("sig"):
            # Gossip mostly re-offers what we hold: the very bytes we verified, no seq above ours.
            # Counted, not logged: it is the normal case (-vv logged it ~12 times a second on an
            # idle node, a review).
            self.rejected[STALE_SEQ] += 1
            return STALE_SEQ
        try:
            # verify_wire hands back its own copy of the wire, so a caller mutating its dict
            # later cannot change what we gossip.
            verified = verify_wire(wire, now=now, max_ttl=self.max_ttl)
        except RecordRejected as e:
            return self._reject(e.reason, e.detail)
        record = verified.record
        if self.admits is not None and not self.admits(record):
            return self._reject(NOT_ALLOWED, f"{record.peer_id} is not on the allow list")
        held = self._held_seq(record.peer_id, now)
        if held is not None and record.seq <= held:
            return self._reject(STALE_SEQ, f"{record.peer_id} seq {record.seq} <= {held}")
        entry = _Entry(record, verified.wire)
        if not self._has_room(record, now):
            return self._reject(TABLE_FULL, f"{len(self._entries)} peers, {len(self._tombstones)} tombstones")
        if record.departing:
            return self._depart(entry, now)
        old = self._pop(record.peer_id)
        self._entries[record.peer_id] = entry
        self._signed[entry.wire["body"]] = entry.wire["sig"]
        stone = self._tombstones.get(record.peer_id)
        if stone is not None:
            # The peer is back: stop gossiping its departure, but keep the seq floor until the
            # tombstone would have lapsed anyway.
            self._tombstones[record.peer_id] = _Tombstone(stone.seq, stone.until, None)
        self.accepted += 1
        if old is None or old.record.is_expired(now):
            if self.on_join is not None:
                self.on_join(record)
            return ACCEPTED
        if old.record.model_id != record.model_id:
            # The same identity restarted with another model: its joins are logged, and so is this
            # (review135: peers said nothing of it).
            log.info("peer %s at %s now serves model %s (was %s)", record.peer_id, record.address,
                     record.model_id[:16], old.record.model_id[:16])
        if self.on_refresh is not None:
            self.on_refresh(record, old.record)
        return ACCEPTED

    def _has_room(self, record: Record, now: float) -> bool:
        """Whether a verified, newer record may go in without passing the bounds."""
        peer_id = record.peer_id
        if not record.departing:
            return peer_id in self._entries or self._free(self._entries, now)
        # Full, the departure is refused: the peer's record stays until it expires (at most its
        # ttl). Pushing out another tombstone instead let anyone with 4,096 throw-away keys
        # (a record and a departure each) bring an honest departed peer back (a review's repro).
        return peer_id in self._tombstones or self._free(self._tombstones, now)

    def _free(self, pool: dict, now: float) -> bool:
        """Whether `pool` has room; when full, expired entries are dropped first (at most once a
        second: a flood of offers must not cost a pass over the table each)."""
        if len(pool) >= self.max_peers and now >= self._full_since + 1.0:
            self._full_since = now
            self.expire()
        return len(pool) < self.max_peers

    def _reject(self, reason: str, detail: str = "") -> str:
        self.rejected[reason] += 1
        log.debug("rejected record: %s %s", reason, detail)
        return reason

    def _depart(self, departure: _Entry, now: float) -> str:
        record = departure.record
        old = self._pop(record.peer_id)
        # Honest records live at most max_ttl past signing, and were signed before the departure.
        until = max(now, record.expires) + self.max_ttl
        if old is not None:
            until = max(until, old.record.expires)
        self._tombstones[record.peer_id] = _Tombstone(record.seq, until, departure)
        self.departed += 1
        # Logged for a peer the table held: a new node takes in every departure its peers still
        # gossip, of peers it never knew, other models' too (review134).
        log.log(logging.INFO if old is not None else logging.DEBUG, "peer %s departed (seq %d)",
                record.peer_id, record.seq)
        return DEPARTED

    def held_seq(self, peer_id: str) -> int | None:
        """The highest seq this table holds for `peer_id` (a live record or a departure's
        tombstone): a record of that peer needs a higher one to get in."""
        return self._held_seq(peer_id, self.clock())

    def _held_seq(self, peer_id: str, now: float) -> int | None:
        """Highest seq that still blocks older records for this peer, or None."""
        seqs = []
        entry = self._entries.get(peer_id)
        if entry is not None and not entry.record.is_expired(now):
            seqs.append(entry.record.seq)
        stone = self._tombstones.get(peer_id)
        if stone is not None and stone.until > now:
            seqs.append(stone.seq)
        return max(seqs) if seqs else None

    # -- reading --------------------------------------------------------------------------------

    def _live(self, now: float, ordered: bool = True) -> list[_Entry]:
        live = [e for e in self._entries.values() if not e.record.is_expired(now)]
        return sorted(live, key=lambda e: e.record.peer_id) if ordered else live

    def records(self, model_id: str | None = None) -> list[Record]:
        """Non-expired records, sorted by peer_id, optionally only those serving model_id."""
        live = (e.record for e in self._live(self.clock()))
        return [r for r in live if model_id is None or r.model_id == model_id]

    def live_wires(self, model_id: str) -> list[tuple[Record, dict[str, bytes]]]:
        """Non-expired records of `model_id` with their signed wire forms, sorted by peer_id."""
        return [(e.record, dict(e.wire)) for e in self._live(self.clock()) if e.record.model_id == model_id]

    def wires(self) -> list[dict[str, bytes]]:
        """Signed wire forms to gossip: every live record, plus departures still verifiable.

        Departures are included so that a leave spreads through the swarm like a join does;
        receivers handle both through `offer`.
        """
        ours, rest = self.wires_split(None)
        return ours + rest

    def wires_split(self, model_id: str | None) -> tuple[list[dict[str, bytes]], list[dict[str, bytes]]]:
        """`wires()` in two parts: those of `model_id` (records and departures), and the rest;
        each in no order (gossip shuffles them)."""
        now = self.clock()
        ours: list[dict[str, bytes]] = []
        rest: list[dict[str, bytes]] = []
        for e in self._live(now, ordered=False):
            (ours if e.record.model_id == model_id else rest).append(dict(e.wire))
        for stone in self._tombstones.values():
            # Same window verify_wire applies to departures, so we never gossip one peers reject.
            if stone.departure is not None and stone.departure.record.expires > now - self.max_ttl:
                (ours if stone.departure.record.model_id == model_id else rest).append(dict(stone.departure.wire))
        return ours, rest

    def get(self, peer_id: str) -> Record | None:
        entry = self._entries.get(peer_id)
        if entry is None or entry.record.is_expired(self.clock()):
            return None
        return entry.record

    def __len__(self) -> int:
        return len(self._live(self.clock()))

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, str) and self.get(peer_id) is not None

    # -- housekeeping ---------------------------------------------------------------------------

    def expire(self) -> int:
        """Drop expired entries and tombstones that no longer protect anything; returns how many."""
        now = self.clock()
        dead = [p for p, e in self._entries.items() if e.record.is_expired(now)]
        for peer_id in dead:
            self._pop(peer_id)
        gone = [p for p, t in self._tombstones.items() if t.until <= now]
        for peer_id in gone:
            del self._tombstones[peer_id]
        return len(dead) + len(gone)

    def _pop(self, peer_id: str) -> _Entry | None:
        entry = self._entries.pop(peer_id, None)
        if entry is not None:
            self._signed.pop(entry.wire["body"], None)
        return entry

    def remove(self, peer_id: str) -> bool:
        """Forget a peer locally (e.g. it stopped answering).  Returns whether it was present.

        Its current record is remembered as a tombstone until it expires, so the same record
        gossiped back by others does not re-add it; a newer announcement from the peer does.
        With no room for another tombstone it is forgotten only, and taken again if offered.
        """
        entry = self._pop(peer_id)
        if entry is None:
            return False
        stone = self._tombstones.get(peer_id)
        if stone is None and not self._free(self._tombstones, self.clock()):
            return True  # no room to remember it: forgotten, and taken again if offered again
        if stone is None or stone.seq < entry.record.seq:
            self._tombstones[peer_id] = _Tombstone(entry.record.seq, entry.record.expires, None)
        return True
