"""Who serves what, as a client knows it: the peers of its model, from `--peers` contacts (asked
for `info`) or from the signed records of bootstrap peers' tables, asked again as the swarm
changes; who is banned (client/bans.py) or was not taken, and why; the cheapest route over them
(`plan`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from nanoswarm.keys.contact import split_contact
from nanoswarm.protocol.errors import ErrorCode, ProtocolError, shown
from nanoswarm.protocol.messages import finite_float, parse_range

from .background import BackgroundFetch, SharedReads
from .bans import GONE_CODES, Ban, Bans
from .introduce import ask_info
from .options import SwarmOptions
from .peer_errors import PeerError
from .round_trips import PROBE_SECONDS, measure_round_trips
from .route import PeerInfo, RouteError, StagePlan, build_route, own_contact
from .table_reads import REFRESH_SECONDS, TableReads

if TYPE_CHECKING:
    from .transport import PeerConnection

log = logging.getLogger(__name__)

# A session this client holds on a peer counts as this much of the peer's load when a route is
# built (PeerTable.available): a peer states its load a minute late, so a program's sessions, opened
# one after another, all took the same peer among like ones. A tenth: they spread over like
# peers, and a peer that others keep busy still loses to an idle one for a few of them.
SESSION_LOAD = 0.1
REREAD_SECONDS = 5.0  # the least time between two `reread`s of a peer
MOVED_CODES = ("not_served", "wrong_model")  # an open's refusals that a peer which changed what it serves gives
DROPPED_KEPT, DROPPED_SECONDS = 1024, 3600.0  # peers that left a table, remembered for Swarm.take_learned


def takes(peer: PeerInfo, max_length: int) -> bool:
    """Whether `peer` opens sessions of `max_length` positions, as far as its `info` said (a
    peer known only from its signed record did not say: it is asked)."""
    limit = peer.extra.get("max_length")
    return not (type(limit) is int and limit < max_length)


def claimed_span(info: dict, n_layer: int, n_head: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The blocks and heads (None: all) a peer's `info` says it serves, checked against the
    model; ProtocolError if they make no sense."""
    heads = info.get("heads")
    return (parse_range(info.get("layers"), n_layer, "layers"),
            parse_range(heads, n_head, "heads") if heads else None)


@dataclass
class PeerTable(Bans, TableReads):
    """The peer table of a `Swarm` (client/swarm.py), its base class: the links it asks over,
    and the sessions held on them, are the Swarm's (`connection`, `_close_link`, `held`)."""
    model_id: str
    n_layer: int
    n_head: int
    options: SwarmOptions = field(default_factory=SwarmOptions)
    peers: dict[str, PeerInfo] = field(default_factory=dict)     # by address
    bans: dict[str, Ban] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)       # address -> why it was not used
    bootstraps: list[str] = field(default_factory=list)          # asked again when no route is found
    contacts: dict[str, None] = field(default_factory=dict)      # every address asked for its info, in order
    # Round trips measured after the handshake, by address (None: no answer in time), kept over
    # refreshes: add_addresses, round_trips.measure_round_trips, a background read (rtt_of).
    timed: dict[str, float | None] = field(default_factory=dict)
    timed_at: dict[str, float] = field(default_factory=dict)  # when timed (monotonic): again after TIMING_LIFE
    _refreshed: float = -REFRESH_SECONDS
    _asked: float = field(default_factory=time.monotonic)  # when a peer's info (taken or not) or record was last read
    _read_began: float = field(default_factory=time.monotonic)  # when the last read taken in was begun
    _fetching: BackgroundFetch | None = None  # the bootstraps' tables, read for refresh_stale
    _reads: SharedReads = field(default_factory=SharedReads)  # its siblings' reads too (refresh_stale)
    _reread: dict[str, float] = field(default_factory=dict)  # address -> when `reread` last asked it
    # address -> when its info or record was last taken in (monotonic), and when it left the
    # table (it went, or was forgotten): a sibling's older knowledge of a peer this table dropped
    # is not taken back (Swarm.take_learned)
    _learned: dict[str, float] = field(default_factory=dict)
    _dropped: dict[str, float] = field(default_factory=dict)
    closed: bool = False  # by close(): no new link, so no session may step on (SwarmModel.close)
    # Said where no route is left on the contacts given (`nanoswarm load`, which has no
    # --bootstrap, says its own: review185).
    peers_only_hint = " (--peers uses only the contacts given; --bootstrap learns the rest from their tables)"
    all_gone_hint = ("; every peer this client knows of went, its bootstraps too: it learns of others only "
                     "through them (one back at its address, or a connect again with a bootstrap that serves now)")

    # The Swarm's: links and the sessions held over them.
    def connection(self, address: str) -> PeerConnection:
        raise NotImplementedError

    def _close_link(self, address: str) -> None:
        raise NotImplementedError

    def held(self, address: str) -> int:
        """Sessions this client holds on the peer at `address`."""
        raise NotImplementedError

    def drain_events(self) -> None:
        raise NotImplementedError

    def _link_in_use(self, address: str) -> bool:
        """Whether the link to `address` holds what only it can close (LinkSessions.in_use)."""
        raise NotImplementedError

    # ----- discovery ----------------------------------------------------------------------
    def add_addresses(self, addresses: list[str], timeout: float = 5.0) -> None:
        """Ask each address for `info`, all at once within one `timeout` (in turn, each frozen
        contact cost a connect its own wait), and keep those serving our model; time those not
        timed before (round_trips.measure_round_trips: one `info` alone was 2-5x the round trip
        on a fresh link). Each is remembered (`contacts`): one that does not answer now is asked
        again by a refresh, and by a background read (refresh_stale)."""
        conns: dict[str, PeerConnection] = {}
        for address in dict.fromkeys(addresses):
            self.contacts[address] = None
            try:
                conns[address] = self.connection(address)
            except PeerError as e:
                self._not_taken(address, e)
        took: dict[str, float] = {}
        # Contacts that do not know each other are told of each other too, or no step is relayed
        # between them (client/introduce.py).
        replies = ask_info(conns, timeout, took, self.model_id if self.introduces else None)
        for address in conns:  # in the order given (the route's last tie-break), not of the replies
            if isinstance(reply := replies[address], PeerError):
                self._not_taken(address, reply)
            else:
                self.add_info(address, reply.fields, self.rtt_of(address, took[address]),
                              curve_key=split_contact(address)[1])
                self._answered(address, reply.fields)
        measure_round_trips(self, [a for a in conns if a in self.peers], min(timeout, PROBE_SECONDS))

    def moved(self, error: PeerError) -> bool:
        """Whether `error`, an answer to an `open`, says only that its peer serves something other
        than the table said: other blocks or heads (`not_served`), or another model (`wrong_model`:
        restarted at its address with another checkpoint, review134; struck, it was banned again
        each time its ban ran out), and its `info` now says so (reread; another model's peer is
        forgotten by it). No fault of the peer's."""
        return error.code in MOVED_CODES and self.reread(error.address)

    def reread(self, address: str) -> bool:
        """`address` refused an open `not_served` or `wrong_model`: it may serve other blocks,
        heads or model than the table says (restarted with others). Its `info` is asked now,
        within a second, and taken in. True if it answered with another span or model (the
        refusal is explained: no fault, and a ban of it is lifted; a peer of another model is
        forgotten, its ban kept); False if it did not answer, claims the same span, or was asked less
        than REREAD_SECONDS ago: its `info` and its `open` disagree, a fault (review121: with no
        strike, a peer refusing every open cost each session a round trip and this wait)."""
        now = time.monotonic()
        if now - self._reread.get(address, -REREAD_SECONDS) < REREAD_SECONDS:
            return False
        self._reread[address] = now
        answered = self._ask_now([address]).get(address)
        if answered is None:
            return False
        old = self.peers.get(address)
        info, took = answered
        self.add_info(address, info, self.rtt_of(address, took), curve_key=split_contact(address)[1])
        new = self.peers.get(address)
        if old is not None and new is not None and (old.layers, old.heads) == (new.layers, new.heads):
            return False
        if new is not None:  # it serves us other blocks or heads now: its ban is lifted
            self.bans.pop(address, None)
        # (Forgotten, another model's peer keeps its ban and strikes: review135 saw that a peer
        # banned for faults could erase them by naming another model once.)
        log.info("peer %s serves %s now, not what the table said", address,
                 "another model" if new is None else f"layers {new.layers[0]}:{new.layers[1]}"
                 + (f" heads {new.heads[0]}:{new.heads[1]}" if new.heads else ""))
        return True

    @property
    def introduces(self) -> bool:
        """Whether contacts are told of each other (client/introduce.py): only where steps may be
        relayed between them (a client that spot-checks relays none: client/verify.py)."""
        return self.options.relay and self.options.introduce and not self.options.verify

    def _not_taken(self, address: str, e: PeerError) -> None:
        self.rejected[address] = f"{e.code}: {e.message}"
        log.info("peer %s", e)  # the error names the address; warn_rejected tells the user
        if (ban := self.bans.get(address)) is not None:
            ban.back = False  # (it answered once since its ban, but not now: review113)
        # A fresh link if it is asked again: on this one every refresh would queue its requests
        # for when the peer is back, which then refused the burst busy (review112). Kept while
        # sessions hold it, or opens sent ahead on it (review113): a drop report there is theirs.
        if not self._link_in_use(address):
            self._close_link(address)

    def warn_rejected(self) -> None:
        """Log, as warnings, the peers that were not taken while the others cover every block.
        Otherwise the error that no route exists says why for each, so they are not also logged
        above INFO."""
        try:
            build_route(self.available(), self.n_layer, self.n_head)
        except RouteError:
            return
        for address, why in self.rejected.items():
            log.warning("peer %s: %s", address, why)

    def add_info(self, address: str, info: dict, rtt: float = 0.0, curve_key: bytes | None = None) -> None:
        # Asked now, whatever it answered: a sibling's read begun before is not taken in after
        # it (SharedReads.serves; review189: one that put back a peer forgotten here).
        self._asked = time.monotonic()
        if info.get("model_id") != self.model_id:
            self.forget(address, f"serves model {shown(info.get('model_id'), 12)}, not ours "
                        f"({self.model_id[:12]}; if it is the same checkpoint, it was sharded with other "
                        "options)")
            return
        try:  # a peer's own `info` is untrusted: what it claims must make sense before it is used
            layers, heads = claimed_span(info, self.n_layer, self.n_head)
            throughput, load = info.get("throughput") or 0.0, info.get("load") or 0.0
            if not (finite_float(throughput) and finite_float(load) and throughput >= 0 and load >= 0):
                raise ProtocolError(ErrorCode.MALFORMED, "throughput and load must be numbers >= 0")
        except ProtocolError as e:
            self.forget(address, f"bad_reply: its info is malformed: {e.message}")
            log.info("peer %s: %s", address, self.rejected[address])
            return
        self.rejected.pop(address, None)  # it answered this time (a refresh asks again)
        peer_id, relay_name = str(info.get("peer_id")), own_contact(address, info)
        twin = self.peers.get(relay_name) if relay_name else None
        if twin is not None and twin.peer_id == peer_id:
            # Known already by its record's contact (a bootstrap's table): one entry, not two
            # that a bootstrap's refresh took for a peer that moved, closing the sessions over
            # the given name's link every minute (review114; discovery.add_fetched, the other way).
            return
        self.peers[address] = PeerInfo(
            address=address, peer_id=peer_id, model_id=self.model_id,
            layers=layers, heads=heads, throughput=float(throughput), load=float(load),
            rtt=rtt, curve_key=curve_key, extra=info, relay_name=relay_name)
        self._learned[address] = time.monotonic()

    def available(self, max_length: int | None = None, refused: Collection[str] = ()) -> list[PeerInfo]:
        """Peers a route may use: not banned, not among `refused`, and, for a session of
        `max_length` positions, not one whose `info` said it takes fewer; each one's load counting
        the sessions this client holds on it."""
        now = time.monotonic()
        return [self._with_held(p) for a, p in self.peers.items() if (a not in self.bans or self.bans[a].until <= now)
                and a not in refused and (max_length is None or takes(p, max_length))]

    def rtt_of(self, address: str, estimate: float) -> float:
        """The round trip to count for `address`: as timed; if silent when timed, as slow as the
        wait (a frozen peer tied with like ones and took sessions, each then costing a failover),
        still usable where nothing else serves its blocks; not timed yet, `estimate` (a
        bootstrap's round trip)."""
        if address not in self.timed:
            return estimate
        seconds = self.timed[address]
        return seconds if seconds is not None else max(estimate, PROBE_SECONDS)

    def _with_held(self, peer: PeerInfo) -> PeerInfo:
        """`peer`, its load counting the sessions this client holds on it (SESSION_LOAD each)."""
        held = self.held(peer.address)
        return replace(peer, load=peer.load + SESSION_LOAD * held) if held else peer

    def forget(self, address: str, why: str) -> None:
        """Stop using `address` (not a ban: it did nothing wrong we know of) and close our link."""
        self.rejected[address] = why
        self.peers.pop(address, None)
        self.dropped(address)
        self._close_link(address)

    def dropped(self, address: str) -> None:
        """`address` left the table: noted for Swarm.take_learned (an hour, at most DROPPED_KEPT
        peers, the oldest going first)."""
        now = time.monotonic()
        self._learned.pop(address, None)
        self._dropped.pop(address, None)  # (to the end: the dict stays in the order of the drops)
        self._dropped[address] = now
        while self._dropped:
            oldest, when = next(iter(self._dropped.items()))
            if len(self._dropped) <= DROPPED_KEPT and now - when <= DROPPED_SECONDS:
                break
            del self._dropped[oldest]

    def plan(self, start: int = 0, stop: int | None = None, max_length: int | None = None,
             refused: dict[str, str] | None = None) -> list[StagePlan]:
        """The cheapest route over blocks [start, stop) for a session of `max_length` positions,
        leaving out the peers that `refused` it (address -> why) as well as banned ones."""
        self.drain_events()
        refused = refused or {}
        try:
            return self._plan(start, stop, max_length, refused)
        except RouteError as e:
            error = e
        if self.refresh():
            try:
                return self._plan(start, stop, max_length, refused)
            except RouteError as e:
                error = e
        if not self._lift_bans_of_peers_back(error.uncovered):
            raise error
        return self._plan(start, stop, max_length, refused)

    def _plan(self, start: int, stop: int | None, max_length: int | None, refused: dict[str, str]) -> list[StagePlan]:
        try:
            return build_route(self.available(max_length, refused), self.n_layer, self.n_head, start, stop)
        except RouteError as e:
            # The peers we were given but could not use are the likely cause: say why.
            now = time.monotonic()
            unused = {**self.rejected, **refused}
            unused.update((a, f"banned for {b.until - now:.0f}s more ({b.why})") for a, b in self.bans.items()
                          if b.until > now and a in self.peers)
            unused.update((p.address, f"takes sessions of at most {p.extra['max_length']} positions, "
                           f"not {max_length}") for p in self.available() if max_length and not takes(p, max_length))
            # A `--peers` client uses only its contacts, even where they know the rest (review115).
            hint = "" if self.bootstraps or not self.contacts else self.peers_only_hint
            gone = [a for a, b in self.bans.items() if b.code in GONE_CODES and b.until > now]
            if self.bootstraps and self._reads.failing and self.peers and set(self.peers) <= set(gone):
                # Nothing left to learn the swarm from (review192: the peers that joined since were
                # never learned, and every call failed on for good)
                hint += self.all_gone_hint
            if not unused:
                raise RouteError(e.uncovered, e.detail + hint) from None
            # Those that serve a missing block first, then those whose blocks are unknown (a
            # contact that did not answer): why a block is missing (review112 read a list of
            # other blocks' peers, the cause past its "and N more").
            wanted = set(e.uncovered)
            first = sorted(unused, key=lambda a: 1 if a not in self.peers
                           else 0 if wanted.intersection(range(*self.peers[a].layers)) else 2)
            why = [f"{a}: {unused[a]}" for a in first[:3]]
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise RouteError(e.uncovered, f"{e.detail}; not used: {'; '.join(why)}{more}{hint}") from None
