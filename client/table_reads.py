"""The peer table read again: at once when no route is left (`refresh`), and in the
background once it is a minute old (`refresh_stale`, `take_read_in`; client/background.py), a
swarm's siblings sharing those reads (`SharedReads`). `TableReads` is PeerTable's base class
(client/peer_table.py), as `Bans` is."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from nanoswarm.keys.contact import split_contact

from .background import BackgroundFetch, SharedReads, known_peers_to_ask
from .bans import GONE_CODES
from .discovery import DiscoveryError, Fetched, add_fetched, add_from_bootstrap, take_timed

if TYPE_CHECKING:
    from collections.abc import Collection

    from .bans import Ban
    from .options import SwarmOptions
    from .route import PeerInfo

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0  # the least time between two refreshes of the peer table (PeerTable.refresh)
TABLE_SECONDS = 60.0  # a session opened on an older table has the bootstraps read again (refresh_stale)
CHURN_SECONDS = 10.0  # ... or on one this old where a peer went since
# A background read is taken in at the next open up to this old: a program that opened a session
# once a minute or less threw each read away as too old, and read again (review145)
READ_KEPT_SECONDS = 5 * TABLE_SECONDS


class TableReads:
    """The reads of a `PeerTable` (its fields `peers`, `bans`, `bootstraps`, `contacts`,
    `options`, `_refreshed`, `_asked`, `_fetching`, `_reads`, `closed`), its base class."""
    peers: dict[str, PeerInfo]
    bans: dict[str, Ban]
    bootstraps: list[str]
    contacts: dict[str, None]
    options: SwarmOptions
    _refreshed: float
    _asked: float
    _read_began: float
    _fetching: BackgroundFetch | None
    _reads: SharedReads
    closed: bool

    if TYPE_CHECKING:  # PeerTable's
        def available(self, max_length: int | None = None, refused: Collection[str] = ()) -> list[PeerInfo]: ...
        def add_addresses(self, addresses: list[str], timeout: float = 5.0) -> None: ...
        def add_info(self, address: str, info: dict, rtt: float = 0.0, curve_key: bytes | None = None) -> None: ...
        def rtt_of(self, address: str, estimate: float) -> float: ...

    def refresh(self) -> bool:
        """Ask again who serves what: peers join after we connected, and move to other blocks
        (node/placement.py). From the bootstraps' tables when we came through one, else from
        each known peer and every contact given (`contacts`). A banned peer whose blocks changed
        is banned no more: it moved, it did not fail. False, asking nothing, if we asked less
        than REFRESH_SECONDS ago, or the last refresh of this table's family (SharedReads) found
        no bootstrap or known peer answering a moment ago (2 s, doubled for each round in a row,
        to 16), or another of the family is refreshing after such a one (SharedReads.may_refresh)."""
        now = time.monotonic()
        if now - self._refreshed < REFRESH_SECONDS:
            return False
        if self.bootstraps:
            with self._reads.lock:
                if not self._reads.may_refresh():  # (the family's last refresh found no one to ask)
                    return False
        self._refreshed = self._read_began = now
        self._fetching = None  # a table read before this one is not taken in after it (review101)
        before = self._spans()
        if self.bootstraps:
            try:
                answered = self._read_bootstraps()
            except BaseException:  # (Ctrl-C: neither answered nor not; the family waits on no one)
                with self._reads.lock:
                    self._reads.trying = False
                raise
            self._reads.answered(answered, now)
        else:
            # The known peers, and every contact given: one down at connect (restarting, say) was
            # never asked again, and when the others went no route was left (review100). All at
            # once: many dead ones cost one wait, not one each (review101). A drop read here is
            # put back for the sessions over the link (ask_all; review105, review106).
            self.add_addresses([*self.peers, *self.contacts], min(1.0, self.options.timeout))
        self._unban_moved(before)
        return True

    def _read_bootstraps(self) -> bool:
        """refresh's read of the bootstraps' tables, or of known peers' where none answers.
        Whether anyone answered."""
        try:
            add_from_bootstrap(self, self.bootstraps, min(5.0, self.options.timeout))
            return True
        except DiscoveryError as e:
            # Every node keeps the swarm's table: with the bootstraps gone, the peers still
            # in use know the swarm as well (a churn review: the only bootstrap died, and a
            # spare that joined later was never learned).
            others = known_peers_to_ask(self)
            try:
                if not others:
                    raise
                add_from_bootstrap(self, others, min(5.0, self.options.timeout), role="known peer")
                log.info("refreshed the peer table from %d known peers: %s", len(others), e)
                return True
            except DiscoveryError as again:
                log.warning("refreshing the peer table: %s", again)
                return False

    def _spans(self) -> dict[str, tuple]:
        return {a: (p.layers, p.heads) for a, p in self.peers.items()}

    def _unban_moved(self, before: dict[str, tuple]) -> None:
        """Lift the bans of peers whose blocks changed since `before` (_spans): they moved, they
        did not fail."""
        moved = [a for a, p in self.peers.items() if a in self.bans and before.get(a, (p.layers, p.heads))
                 != (p.layers, p.heads)]
        for address in moved:
            del self.bans[address]
        log.info("refreshed the peer table: %d peers (%d new, %d moved)", len(self.peers),
                 len(set(self.peers) - set(before)), len(moved))

    def refresh_stale(self) -> None:
        """At a session's open: when the table is older than TABLE_SECONDS, read the bootstraps'
        tables, and ask the `--peers` contacts for their `info`, again, in the background, and
        take them in at the first open after they came. A long-lived program (one SwarmModel)
        learned the peers, their load and their round trips once, at connect, and again only
        when no route was found: peers that joined later (or a contact down at connect) went
        unused, and the load a peer stated then steered sessions for hours (review99). Nothing
        waits on it (review100: a frozen bootstrap held every such open for its timeout), and it
        asks over links of its own: over the swarm's, it would read, and use up, the report of
        one that dropped."""
        if not self.take_read_in() and self._fetching is None and self._stale():
            self._fetching = self._shared_read()  # (taken in at a later call)

    def _stale(self) -> bool:
        """Time to read the table again, where there is one to ask: a minute since the last read,
        or CHURN_SECONDS where a peer went since the last read taken in was begun (review192: under
        churn, every peer a client knew died within the minute, and the peers that had joined
        meanwhile were never learned; review193: a peer that went while a read was under way, the
        common case, waited the minute)."""
        if not (self.bootstraps or self.contacts) or self.closed:
            return False
        age = time.monotonic() - max(self._asked, self._refreshed)
        return age >= TABLE_SECONDS or age >= CHURN_SECONDS and any(
            b.since > self._read_began and b.code in GONE_CODES for b in self.bans.values())

    def _serving_read(self) -> BackgroundFetch | None:
        """The read a sibling began after this table's own last (`_asked`, `_refreshed`) that
        serves it (SharedReads.serves), if any. Under `_reads.lock`."""
        return self._reads.serves(self, max(self._asked, self._refreshed), TABLE_SECONDS)

    def take_read_in(self) -> bool:
        """A background read that is done, taken in: this table's own, or, the table stale, one a
        sibling began that serves it (SharedReads.serves). Starts none (refresh_stale does): at a
        batch's end, one started would be thrown away by a program that ends then (review188).
        False where none was taken in."""
        fetch = self._fetching
        if fetch is not None and fetch.done.is_set() and time.monotonic() - fetch.finished >= READ_KEPT_SECONDS:
            if isinstance(fetch.result, Fetched):
                take_timed(self, fetch.result)  # its round trips hold yet
            fetch = self._fetching = None  # read too long ago to be taken in: a sibling's, or read again
        if fetch is None and self._stale():
            with self._reads.lock:
                shared = self._serving_read()
            if shared is not None and shared.done.is_set():
                fetch = self._fetching = shared
        if fetch is None or not fetch.done.is_set():
            return False
        self._fetching, self._asked = None, time.monotonic()  # tried: the next in TABLE_SECONDS
        self._read_began = max(self._read_began, fetch.started)
        result = fetch.result  # (not changed here: a swarm's siblings may take in the same read)
        if isinstance(result, Fetched) and time.monotonic() - fetch.finished >= TABLE_SECONDS:
            result = replace(result, gone={})  # who answered then says too little now: nobody is dropped on it
        if isinstance(result, BaseException) or result is None:
            log.warning("refreshing the peer table failed: %r", result)
        elif result.answered or result.infos:
            if result.answered:
                self._reads.answered(True, fetch.started)
            before = self._spans()
            if result.answered:
                add_fetched(self, result, min(5.0, self.options.timeout), quiet=True)
            self._take_infos(result)
            self._unban_moved(before)
        else:
            log.info("refreshing the peer table: nothing answered (%s)", "; ".join(result.errors.values()))
        return True

    def _shared_read(self) -> BackgroundFetch:
        """The read a sibling began that serves this table (_serving_read), to be taken in as if
        it were this table's own; or else a read started now, for the siblings to take in turn: a
        batch's threads, each stale a minute after the last, each read the swarm on their own."""
        with self._reads.lock:
            fetch = self._serving_read()
            if fetch is None:
                fetch = self._reads.latest = BackgroundFetch(self, min(5.0, self.options.timeout))
            return fetch

    def _take_infos(self, fetched: Fetched) -> None:
        """The `info` of each contact that a background read asked (background.read_contacts)."""
        take_timed(self, fetched)
        for contact, (info, seconds) in fetched.infos.items():
            if contact in self.contacts:
                self.add_info(contact, info, self.rtt_of(contact, seconds), curve_key=split_contact(contact)[1])
