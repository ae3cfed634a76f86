"""A node's watch on its own wall clock against its peers' (review93): records live by
wall-clock time, so a node whose clock is far off loses its peers' records, or they lose its,
and nothing else says why. keys/clock.py measures; this says so, at most once a minute."""

from __future__ import annotations

import logging
import time
from collections import deque

from nanoswarm.keys.clock import CLOCK_WARN_SECONDS, ClockOffsets, skew_words
from nanoswarm.keys.records import EXPIRED, TOO_FAR_FUTURE
from nanoswarm.keys.table import RecordTable

log = logging.getLogger(__name__)

CLOCK_WARN_INTERVAL = 60.0  # how often a node says again that its clock is off
CLOCK_WARN_ROUNDS = 5  # gossip rounds before the first warning: the bootstrap's offset alone tells little
LOST_RECORDS = 3  # records of others dropped for their lifetime, none taken, over one ttl: a clock off


def node_clock_warning(offset: float, peers: int, ttl: float) -> str:
    """What a node whose clock is `offset` off the median of `peers` peers' is told."""
    if peers == 1:  # which of the two is off cannot be told
        return (f"this node's clock is {skew_words(offset)} the one peer's it measured: records live by "
                f"wall-clock time (--ttl {ttl:g} s), and those signed on one of the two clocks look "
                f"{abs(offset):.0f} s older on the other, so they are dropped early; one of the two machines' "
                "clocks is off (NTP)")
    effect = (f"the records it signs look {offset:.0f} s older to them, so they drop them early" if offset > 0 else
              f"their records look {-offset:.0f} s older here, so it drops them early (and relays to none)")
    return (f"this node's clock is {skew_words(offset)} its peers' (the median of {peers} measured): records "
            f"live by wall-clock time (--ttl {ttl:g} s), and {effect}; set this machine's clock (NTP)")


class ClockWatch:
    """Offsets measured from peers' gossip replies (`add`), and a check each gossip round."""

    def __init__(self, ttl: float, interval: float):
        self.offsets = ClockOffsets()
        self.ttl = ttl
        self.own_taken = 0  # our own records our table took: not records of others
        self.measured: tuple[float, int] | None = None  # (median offset, peers), as of the last check
        # (records dropped as expired or too far ahead, others' records taken) at each of the
        # last rounds of one ttl: a node far ahead drops every record pushed to it, so it links to
        # no peer and measures no clock (a bootstrap that no one else bootstraps from, review93b)
        self._counts: deque[tuple[int, int]] = deque(maxlen=max(2, round(ttl / interval)) + 1)
        self._warned = float("-inf")

    def check(self, rounds: int, table: RecordTable, stats: dict) -> None:
        """Update `stats["clock_offset"]` (theirs - ours) and warn while the clock looks off."""
        self.measured = self.offsets.median()
        stats["clock_offset"] = None if self.measured is None else round(self.measured[0], 1) + 0.0  # not -0.0
        lost = table.rejected.get(EXPIRED, 0) + table.rejected.get(TOO_FAR_FUTURE, 0)
        self._counts.append((lost, table.accepted - self.own_taken))
        why = None
        if self.measured is not None and abs(self.measured[0]) > CLOCK_WARN_SECONDS:
            why = node_clock_warning(*self.measured, self.ttl)
        elif len(self._counts) == self._counts.maxlen:
            (lost_then, taken_then), (lost_now, taken_now) = self._counts[0], self._counts[-1]
            if lost_now - lost_then >= LOST_RECORDS and taken_now == taken_then:
                # Nothing measured says whose clock it is: a node far ahead of all its peers (the
                # bootstrap of review93b), or one peer far off that sends no clock (an earlier
                # version's records_reply has no `now`: review96 saw this node blamed). Or the
                # peers measured are within CLOCK_WARN_SECONDS, but a --ttl shorter than their
                # offset lets no record live (review98).
                lost = (f"every record of another peer that came in the last {self.ttl:g} s was dropped as expired "
                        f"or signed too far ahead by this node's clock ({lost_now - lost_then}, none taken)")
                if self.measured is None:
                    why = (f"{lost}, and no peer's clock was measured (a peer of an earlier version sends none): "
                           "this node's clock or its peers' is off; check both (NTP)")
                else:
                    why = (f"{lost}; this node's clock is {skew_words(self.measured[0])} the peers measured "
                           f"(the median of {self.measured[1]}), more than a record's ttl of {self.ttl:g} s "
                           "allows, or a peer of an earlier version (which sends no clock) is off: check the clocks "
                           "(NTP), or give a longer --ttl")
        now = time.monotonic()
        if why is not None and rounds >= CLOCK_WARN_ROUNDS and now - self._warned >= CLOCK_WARN_INTERVAL:
            self._warned = now
            log.warning("%s", why)

    def peer_note(self, contact: str) -> str:
        """What a log line about peer `contact` adds when its clock is off: its records lapse
        early, so others log it joining again and again (a node 45 s behind, every 20 s: review93)
        and, without this, said nothing of its clock. Measured against the median of the peers
        (with one peer measured, against this node's clock, and which of the two is off cannot
        be told). Empty when its clock is near theirs, or not measured lately."""
        offset, others = self.offsets.of(contact), self.offsets.median(but=contact)
        if offset is None:
            return ""
        off = offset - others[0] if others else offset
        if abs(off) <= CLOCK_WARN_SECONDS:
            return ""
        against = "the other peers' (their median)" if others else "this node's"
        return (f"; its clock is {abs(off):.0f} s {'ahead of' if off > 0 else 'behind'} {against}: records live "
                "by wall-clock time, so those signed on one clock lapse early by the other; "
                + ("its machine's clock is off (NTP)" if others else "one of the two clocks is off (NTP)"))

    def unreached_why(self) -> str | None:
        """Why peers may not reach this node, when its clock is what is off (the warning above)."""
        if self.measured is None or abs(self.measured[0]) <= CLOCK_WARN_SECONDS:
            return None
        if self.measured[1] == 1:
            return ("this node's clock and its one measured peer's disagree (above): records signed on one "
                    "are dropped by the other")
        return "this node's clock is off its peers' (above): they drop its records"
