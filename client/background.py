"""A long-lived client's peer table read again in the background (`BackgroundFetch`): the
bootstraps' tables (discovery.fetch_table; known peers' where no bootstrap answers:
`known_peers_to_ask`) and the `--peers` contacts' `info` (`read_contacts`), on a thread and
links of its own, with the round trips of the peers it finds timed, and of those timed more
than TIMING_LIFE ago timed again, and the peers that went asked whether they answer; taken in
by PeerTable.refresh_stale. A swarm and its siblings share their reads (`SharedReads`)."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING

import zmq

from nanoswarm.keys.contact import split_contact
from nanoswarm.keys.table import RecordTable

from .departures import gone_candidates, record_expired
from .discovery import Fetched, fetch_table
from .introduce import ask_info
from .peer_errors import PeerError
from .round_trips import (
    BACKGROUND_PEERS,
    PROBE_SECONDS,
    RETIME_SECONDS,
    TIMING_LIFE,
    time_links,
    time_records,
)
from .transport import PeerConnection

if TYPE_CHECKING:
    from .swarm import Swarm


REFRESH_PEERS = 4  # known peers asked for their tables when no bootstrap answers


class BackgroundFetch:
    """`fetch_table` of the bootstraps, and `read_contacts` of the `--peers` contacts, on a
    daemon thread (with sockets of its own, none of the swarm's): a long-lived client's
    periodic refresh (Swarm.refresh_stale), which no session's open waits for. A frozen
    bootstrap cost every such open its timeout (review100), and a refresh over the swarm's own
    links read, and used up, the report of a link that had dropped."""

    def __init__(self, swarm: Swarm, timeout: float):
        self.result: Fetched | BaseException | None = None
        self.started = time.monotonic()
        self.finished = 0.0  # monotonic, when it was read
        self.done = threading.Event()
        args = (list(swarm.bootstraps), timeout, swarm.options.client_keys, swarm.model_id, swarm.options.insecure)
        # Every node keeps the swarm's table: with no bootstrap answering, peers of the table are
        # asked for it, as PeerTable.refresh does (review192: a client whose bootstraps had died
        # read nothing in the background, and learned no peer that joined since).
        self.others = known_peers_to_ask(swarm)
        # Peers timed already (a copy: the swarm's thread goes on changing its own), not timed
        # again: fresh_timings.
        timed = fresh_timings(swarm)
        # Peers that went (or whose record expired), asked here whether they answer where the read
        # does not list them: one that does not is dropped when the read is taken in
        # (departures.drop_unlisted), with no wait at that open.
        gone = {a: (swarm.peers[a].curve_key, swarm.peers[a].peer_id)
                for a in gone_candidates(swarm)} if swarm.bootstraps else {}
        # What this read asks that is the starting table's own: a sibling takes the read in only
        # when it asks what the sibling would (SharedReads.serves).
        self.untimed, self.asks_gone = frozenset(timed), frozenset(gone)
        threading.Thread(target=self._run, args=(args, list(swarm.contacts), timed, swarm.introduces, gone),
                         daemon=True, name="nanoswarm-refresh").start()

    def _run(self, args: tuple, contacts: list[str], timed: set[str], introduces: bool,
             gone: dict[str, tuple[bytes | None, str]]) -> None:
        try:
            bootstraps, timeout, client_keys, model_id, insecure = args
            self.result = fetch_table(*args) if bootstraps else Fetched(RecordTable(), [], {}, {})
            if bootstraps and not self.result.answered and self.others:
                again = fetch_table(self.others, *args[1:], role="known peer")
                if again.answered:  # (the bootstraps' failures were logged)
                    self.result = again
                else:
                    self.result.errors.update(again.errors)
            # The records as they were when read: a record has 40-60 s of life left when fetched,
            # and read at a later open by the table's own clock, none was left (review101).
            read = time.time()
            self.result.table.clock = lambda: read
            # New peers are timed here, not when the read is taken in: that holds a session's
            # open, and the model's lock.
            self.result.timed = time_records(self.result.table, model_id, timed, min(timeout, PROBE_SECONDS),
                                             client_keys, insecure)
            if contacts:
                read_contacts(self.result, contacts, timeout, client_keys, insecure, timed,
                              model_id if introduces else None)
            if bootstraps and self.result.answered:
                # Only those the read does not list, a bounded number (review193: once a table had
                # gone two minutes unread, every peer was a candidate, each asked on a link of its own)
                listed = {r.peer_id for r in self.result.table.records(model_id)}
                unlisted = [a for a, (_, peer_id) in gone.items() if peer_id not in listed][:BACKGROUND_PEERS]
                self.result.gone_at = time.monotonic()  # (a ban made after it: not answered by this)
                self.result.gone = ask_gone({a: gone[a][0] for a in unlisted}, min(timeout, 1.0), client_keys)
            self.result.timed_when = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - read by the swarm's thread
            self.result = e
        finally:
            self.finished = time.monotonic()
            self.done.set()


def known_peers_to_ask(swarm: Swarm) -> list[str]:
    """Up to REFRESH_PEERS peers of the table, not bootstraps, to ask for the swarm's table when no
    bootstrap answers: those holding this client's sessions first, then those timed lately, then
    those not silent when timed, then those whose record has not expired, in random order within
    each (review193: the same four, dead, were asked at every read, the live ones never), banned
    ones last (a table read of a peer banned for a freeze does no harm: review195 saw every peer of
    a table banned, none asked). (Till the sixty-eighth session a peer silent when timed, its
    record not yet expired, came before one never timed whose record had: a peer just killed
    before one that may serve, whose renewed record this client had not read.)"""
    fresh, wall, now = fresh_timings(swarm), time.time(), time.monotonic()
    peers = [a for a in swarm.peers if a not in swarm.bootstraps]
    random.shuffle(peers)
    peers.sort(key=lambda a: (a in swarm.bans and swarm.bans[a].until > now,  # (a banned one last: review195)
                              not swarm.held(a), a not in fresh, swarm.timed.get(a, 0.0) is None,
                              record_expired(swarm.peers[a], wall)))
    return peers[:REFRESH_PEERS]


def fresh_timings(swarm: Swarm) -> set[str]:
    """The peers whose round trips a read leaves as they are: all but those silent when timed, or
    whose answer came late in the wait (a long batch ending), or timed more than TIMING_LIFE ago
    (or at no known time)."""
    now = time.monotonic()
    return {c for c, seconds in swarm.timed.items() if seconds is not None and seconds < RETIME_SECONDS
            and now - swarm.timed_at.get(c, -math.inf) < TIMING_LIFE}


class SharedReads:
    """The background reads of a swarm and its siblings (Swarm.sibling: a batch's threads, a
    batcher's workers), one read serving them all: each went stale a minute after the last and
    read the bootstraps' tables, and timed the peers, on its own (16 reads a minute for a batcher
    of 16 workers). `latest` is the last read started (PeerTable._shared_read), `recent` the last
    RECENT_READS; `introduced`, when the last introduction was asked for (Swarm.introduce_soon).
    Threads of one family use it: `lock`."""

    RECENT_READS = 8  # reads kept for siblings to take in: each sibling whose peers that went differ reads

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recent: deque[BackgroundFetch] = deque(maxlen=self.RECENT_READS)
        self.introduced = -math.inf
        # After a refresh that no one answered, the family's next waits QUIET_SECONDS, doubled for
        # each round in a row, and one of them refreshes at a time (TableReads.refresh; review195:
        # a batch's threads each read the dead bootstraps, 400 reads a minute through an outage;
        # review196: those that failed together each doubled the wait, and all went again at its end)
        self.quiet_until, self.quiet_for = -math.inf, self.QUIET_SECONDS
        self.failed_at = -math.inf  # when the last refresh no one answered was begun (-inf: none since one was)
        self.trying = False  # a refresh of the family's under way while it fails

    QUIET_SECONDS, QUIET_MAX = 2.0, 16.0

    @property
    def failing(self) -> bool:
        """Whether the family's last refresh was answered by no bootstrap or known peer (and none
        begun since was): PeerTable.all_gone_hint."""
        return self.failed_at > -math.inf

    def may_refresh(self) -> bool:
        """Whether a table of the family may refresh now: always while refreshes are answered;
        after one no one answered, once the wait is over, and one table at a time (it then calls
        `answered`). Under `lock`."""
        if not self.failing:
            return True
        if self.trying or time.monotonic() < self.quiet_until:
            return False
        self.trying = True
        return True

    def answered(self, anyone: bool, began: float) -> None:
        """A read of the family's begun at `began` got an answer (`anyone`), or none at all. An
        answer to one begun before the last that went unanswered ends no wait (review196: a read
        from before an outage, taken in during it, did)."""
        with self.lock:
            self.trying = False
            if anyone:
                if began >= self.failed_at:
                    self.quiet_until, self.quiet_for, self.failed_at = -math.inf, self.QUIET_SECONDS, -math.inf
                return
            now = time.monotonic()
            self.failed_at = max(self.failed_at, began)
            if now >= self.quiet_until:  # (once a round: those that failed together double it once)
                self.quiet_until = now + self.quiet_for
                self.quiet_for = min(2 * self.quiet_for, self.QUIET_MAX)

    @property
    def latest(self) -> BackgroundFetch | None:
        return self.recent[-1] if self.recent else None

    @latest.setter
    def latest(self, fetch: BackgroundFetch) -> None:
        self.recent.append(fetch)

    def serves(self, swarm: Swarm, since: float, fresh_for: float) -> BackgroundFetch | None:
        """The newest of `recent` that `swarm` may take in as its own read: begun after `since`
        (the table's own last read: review101), under way or done less than `fresh_for` ago
        (review186: one done four minutes before was taken for fresh another minute), and asking
        what the table would ask itself: its peers that went (whose answers drop them or bring
        them back), and the round trips it would time again (review186: a sibling that had banned
        a peer that left kept it for good, another's read never asking it). Not only the latest:
        siblings whose peers that went differ (X, Y, X, Y) each read on their own (review187).
        Under `lock`."""
        now = time.monotonic()
        asks: tuple[set[str], set[str]] | None = None  # (what the table would ask, made once)
        for fetch in reversed(self.recent):
            if fetch.started <= since:
                return None  # (the older ones too)
            if fetch.done.is_set() and now - fetch.finished >= fresh_for:
                continue
            if asks is None:
                asks = set(gone_candidates(swarm)) if swarm.bootstraps else set(), fresh_timings(swarm)
            if asks[0] <= fetch.asks_gone and fetch.untimed <= asks[1]:
                return fetch
        return None


def read_contacts(fetched: Fetched, contacts: list[str], timeout: float,
                  client_keys: tuple[bytes, bytes] | None, insecure: bool, timed: Collection[str],
                  introduce_model: str | None = None) -> None:
    """Into `fetched`: each of `contacts` (given with `--peers`) asked for `info` at once, over
    links of its own, within one `timeout` (`infos`; `errors` for those that did not answer),
    and those that answered and are not among `timed` timed (`timed`, as time_records): a
    long-lived client of `--peers` contacts asked them again only when no route was found, so
    one down at connect went unused while it served, and the load each stated then steered its
    sessions for good. Those serving `introduce_model`, if given, are told of each other, as at
    a connect (client/introduce.py): one that came up since knows no one."""
    conns: dict[str, PeerConnection] = {}
    try:
        for contact in contacts:
            try:
                key = split_contact(contact)[1]
                if key is not None or insecure:  # (one without a key was refused at connect)
                    conns[contact] = PeerConnection(contact, timeout, server_key=key, client_keys=client_keys)
            except (ValueError, zmq.ZMQError) as e:
                fetched.errors[contact] = f"{contact}: bad_contact: {e}"
        took: dict[str, float] = {}
        for contact, reply in ask_info(conns, timeout, took, introduce_model).items():
            if isinstance(reply, PeerError):
                fetched.errors[contact] = str(reply)
            else:
                fetched.infos[contact] = (reply.fields, took[contact])
        todo = {c: conns[c] for c in list(fetched.infos)[:BACKGROUND_PEERS] if c not in timed}
        fetched.timed.update({**dict.fromkeys(todo), **time_links(todo, min(timeout, PROBE_SECONDS))})
    finally:
        for conn in conns.values():
            conn.close()


def ask_gone(gone: dict[str, bytes | None], timeout: float, client_keys: tuple[bytes, bytes] | None) -> dict[str, bool]:
    """Whether each peer that went (`gone`: address -> its CURVE key) answers `info` now, not
    leaving, all asked at once within `timeout` over links of its own."""
    conns: dict[str, PeerConnection] = {}
    try:
        for address, key in gone.items():
            try:
                conns[address] = PeerConnection(address, timeout, server_key=key, client_keys=client_keys)
            except (ValueError, zmq.ZMQError):
                pass  # (not asked: kept for the next read, as one banned since)
        return {address: not isinstance(reply, PeerError) and reply.fields.get("leaving") is not True
                for address, reply in ask_info(conns, timeout).items()}
    finally:
        for conn in conns.values():
            conn.close()
