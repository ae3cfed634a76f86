"""How far a peer's wall clock is from ours, read from the `now` a `records_reply` carries.

Records live by wall-clock time (keys/records.py: `expires` is the signer's now + ttl, 60 s by
default, re-signed every ttl/3), so two machines whose clocks disagree by more than about 40 s
lose each other's records: the one behind signs records that reach the others expired (or
nearly), the one ahead finds theirs expired, and past ~240 s ahead its own are refused as
signed too far ahead. Review93 found every such case silent, or blamed on something else (the
--advertise warning, or "knows no peer of model"). A reply's `now` lets each side say so.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

CLOCK_WARN_SECONDS = 20.0  # half of what a record loses of its life before it is dropped
SAMPLE_SECONDS = 120.0     # an offset measured longer ago is not used
MAX_SAMPLES = 256          # contacts whose offsets are kept (gossip links are at most 64)


def reply_offset(their_now: object, sent: float, received: float, our_now: float | None = None) -> float | None:
    """Their clock minus ours, from the `now` of a reply to a request sent at monotonic `sent`
    and read at `received` (their now is taken as of the middle of the round trip); None
    without a usable `now` (a node from before it was sent, or a value that is not a time)."""
    if type(their_now) is not float or not math.isfinite(their_now):
        return None
    our_now = time.time() if our_now is None else our_now
    return their_now - (our_now - (received - sent) / 2)


def skew_words(offset: float) -> str:
    """'70 s behind' for a peer 70 s ahead of us (offset = theirs - ours), '70 s ahead of' for one
    behind: what to put between "this machine's clock is" and the peer."""
    return f"{abs(offset):.0f} s behind" if offset > 0 else f"{abs(offset):.0f} s ahead of"


class ClockOffsets:
    """The latest offset measured to each contact; the median of the recent ones."""

    def __init__(self) -> None:
        self._samples: OrderedDict[str, tuple[float, float]] = OrderedDict()  # contact -> (offset, when)

    def add(self, contact: str, offset: float) -> None:
        self._samples.pop(contact, None)
        self._samples[contact] = (offset, time.monotonic())
        while len(self._samples) > MAX_SAMPLES:
            self._samples.popitem(last=False)

    def of(self, contact: str, now: float | None = None) -> float | None:
        """The offset last measured to `contact`, if within the SAMPLE_SECONDS before `now`."""
        offset, when = self._samples.get(contact, (0.0, -math.inf))
        return offset if when >= (time.monotonic() if now is None else now) - SAMPLE_SECONDS else None

    def median(self, now: float | None = None, but: str | None = None) -> tuple[float, int] | None:
        """(median offset, contacts it is taken over) of those measured in the SAMPLE_SECONDS
        before `now` (monotonic), `but` that contact; None if none was. Of two middle values, the
        one nearer zero: with one peer of two skewed, the mean would put half its skew on this
        node's clock."""
        since = (time.monotonic() if now is None else now) - SAMPLE_SECONDS
        recent = sorted(offset for contact, (offset, when) in self._samples.items() if when >= since and contact != but)
        if not recent:
            return None
        low, high = recent[(len(recent) - 1) // 2], recent[len(recent) // 2]
        return (low if abs(low) <= abs(high) else high), len(recent)

