"""Who a client leaves out of its routes for a while, and why (`Bans`, a base of
client/peer_table.py's `PeerTable`): bans doubled for faults in a row, and the bans of peers that
were gone lifted when no route is left without them and they answer again."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .introduce import ask_info
from .peer_errors import PeerError

if TYPE_CHECKING:
    from .options import SwarmOptions
    from .route import PeerInfo
    from .transport import PeerConnection

log = logging.getLogger(__name__)

# Faults that say a peer was gone, not that it answered wrong or slowly: a peer banned for one
# that answers a refresh's `info` again is used once no route is left without it (review112: a
# long-lived client whose peers had restarted failed every session for minutes while all of them
# served). Not `timeout`: a peer slow to step answers `info` between its batches (review113).
GONE_CODES = ("disconnected", "unreachable", "leaving")


@dataclass
class Ban:
    until: float
    strikes: int
    why: str = ""
    code: str = ""  # the fault's code (GONE_CODES: the peer was gone)
    back: bool = False  # gone when banned, it answered a refresh's `info` since
    since: float = 0.0  # monotonic, when it was made (or renewed)


class Bans:
    """The bans of a `PeerTable` (its fields `bans`, `peers`, `options`, `bootstraps`; its links
    through `connection`, `_link_in_use`, `_close_link`)."""
    bans: dict[str, Ban]
    peers: dict[str, PeerInfo]
    options: SwarmOptions
    bootstraps: list[str]

    if TYPE_CHECKING:  # PeerTable's (the Swarm's)
        def connection(self, address: str) -> PeerConnection: ...
        def _close_link(self, address: str) -> None: ...
        def _link_in_use(self, address: str) -> bool: ...

    def ban(self, address: str, why: str, code: str = "") -> None:
        """Leave `address` out of routes for a while: ban_seconds, doubled for each fault in a
        row. A fault while banned, or within the last ban's length after it ended, is in a row;
        a later one starts over (review112: strikes never ran out, and a peer that restarted now
        and then was banned for minutes at its fifth)."""
        now, old = time.monotonic(), self.bans.get(address)
        in_a_row = old is not None and now < old.until + self._ban_length(old.strikes)
        strikes = old.strikes + 1 if in_a_row else 1
        seconds = self._ban_length(strikes)
        if code == "leaving" and in_a_row:
            # A peer that said it leaves did nothing wrong: no strike more (review117: a node
            # restarted gracefully now and then was banned 240 s and sat idle once back). Its
            # strikes and ban for faults stay.
            strikes, seconds = old.strikes, max(self.options.ban_seconds, old.until - now)
        self.bans[address] = Ban(now + seconds, strikes, why, code, since=now)
        log.info("banned %s for %.0fs: %s", address, seconds, why)
        self._close_link(address)  # a fresh socket later: no stale replies, no queued requests

    def _ban_length(self, strikes: int) -> float:
        return self.options.ban_seconds * 2 ** (strikes - 1)

    def _answered(self, address: str, info: dict) -> None:
        """`address` answered a refresh's `info` now: a ban for being gone (GONE_CODES) is marked
        `back`, unless the peer says it is leaving. (A background read's `info` may be from before
        the ban, and a bootstrap's record of a peer from before it died: neither counts.)"""
        ban = self.bans.get(address)
        if ban is not None and ban.code in GONE_CODES:
            ban.back = info.get("leaving") is not True

    def _lift_bans_of_peers_back(self, uncovered: list[int]) -> bool:
        """No route is left: lift the bans of the peers that were gone when banned and have
        answered since (`Ban.back`), of those that serve some of the `uncovered` blocks. They keep
        their strikes, so failing again soon bans them longer. False if there are none."""
        now, wanted = time.monotonic(), set(uncovered)
        serving = [a for a, b in self.bans.items() if b.code in GONE_CODES and b.until > now and a in self.peers
                   and wanted.intersection(range(*self.peers[a].layers))]
        if self.bootstraps:  # a refresh read the bootstraps' records, which say nothing of `back`
            self._ask_banned([a for a in serving if not self.bans[a].back])
        back = [a for a in serving if self.bans[a].back]
        for address in back:
            self.bans[address].until = now
        if back:
            log.warning("no route without them: using again %d banned peer%s that answered since (%s)", len(back),
                        "" if len(back) == 1 else "s", ", ".join(a[:40] for a in back))
        return bool(back)

    def _ask_banned(self, addresses: list[str]) -> None:
        """Ask banned peers for `info` themselves, within a second: those that answer, not
        leaving, are `back` (a bootstrap client's peer restarted at its address stayed banned
        while no route was left: review117, every generation failing for 17 s)."""
        for address, (info, _) in self._ask_now(addresses).items():
            self._answered(address, info)

    def _ask_now(self, addresses: list[str]) -> dict[str, tuple[dict, float]]:
        """Ask `addresses` for `info` over the swarm's links, all at once within a second: the
        `info` and the time it took of each that answered. The link of one that did not is
        closed, unless sessions hold it (a fresh one if asked again)."""
        conns: dict[str, PeerConnection] = {}
        for address in addresses:
            try:
                conns[address] = self.connection(address)
            except PeerError:
                continue
        took: dict[str, float] = {}
        answered = {}
        for address, reply in ask_info(conns, min(1.0, self.options.timeout), took).items():
            if not isinstance(reply, PeerError):
                answered[address] = (reply.fields, took[address])
            elif not self._link_in_use(address):
                self._close_link(address)
        return answered
