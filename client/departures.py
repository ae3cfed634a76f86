"""Peers that left a client's peer table: which are taken for gone (`gone_candidates`: banned
for going, or known from a record that expired unrenewed) and their drop from the table when a
read of the swarm no longer lists them and they do not answer (`drop_unlisted`; discovery.add_fetched)."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from .bans import GONE_CODES
from .round_trips import BACKGROUND_PEERS

if TYPE_CHECKING:
    from .route import PeerInfo
    from .swarm import Swarm

log = logging.getLogger(__name__)

EXPIRED_GRACE = 60.0  # seconds past its record's expiry that a peer no read listed is taken for gone


def gone_candidates(swarm: Swarm) -> list[str]:
    """Peers of the table that went, not contacts the user gave (those are asked themselves):
    banned for being gone (GONE_CODES), the ban in force or ended so lately that a fault now
    would count in a row (Bans.ban), not heard from since (`Ban.back`); or known from a record
    that expired EXPIRED_GRACE ago (record_expired), banned for another fault or not, not back,
    with no session of this client on it. drop_unlisted drops those no read lists that do not
    answer `info` either."""
    now, wall = time.monotonic(), time.time()
    return [a for a, peer in swarm.peers.items() if a not in swarm.contacts and (
        (ban := swarm.bans.get(a)) is not None and ban.code in GONE_CODES
        and now < ban.until + swarm._ban_length(ban.strikes) and not ban.back
        or record_expired(peer, wall) and not (ban is not None and ban.back) and not swarm.held(a))]


def record_expired(peer: PeerInfo, wall: float) -> bool:
    """Whether `peer` is known from a signed record that expired more than EXPIRED_GRACE ago (by
    its signer's clock): no read since listed it, so it left or died unheard, banned or not
    (review191: a node that joined and left unused stayed in a long-lived client's table for
    good, planned over, its blocks taken for served; gone_candidates)."""
    expires = peer.extra.get("expires") if peer.extra.get("source") == "record" else None
    return isinstance(expires, (int, float)) and wall > expires + EXPIRED_GRACE


def drop_unlisted(swarm: Swarm, listed: set[str], asked: dict[str, bool] | None = None,
                  asked_at: float = math.inf) -> None:
    """Drop from the table the peers that went (gone_candidates: banned for going, or whose
    record expired unrenewed) that no answering bootstrap (or known peer) lists any more
    (`listed`: the peer ids of its records) and that do not answer `info` (at most
    BACKGROUND_PEERS asked, the others at a later read): they left, a departure removing their
    records, or went silent for their records' lifetime. Kept,
    one that had left was planned again each time its ban for going ran out, a failover each
    time (review139). Asked, because a bootstrap that restarted a moment ago lists few peers
    until gossip fills its table, and a peer back and serving must not go with that (review142:
    a peer gone once, hours ago, was dropped so, with the only copy of its blocks; review143: one
    back a few seconds after its ban, which a bootstrap client never asks). `asked`: the answers
    a background read got (Fetched.gone), so that taking it in at a session's open waits for no
    one (review144), at `asked_at`; a peer banned since (its ban made or renewed after it: review186,
    a sibling's read asked before this table banned it again) is left to the next read. None: asked here, within a
    second (a refresh, which waits anyway). Its ban stays, with its strikes, should it be listed
    again (review145: dropped with it, a peer failing again and again lost its escalation); the
    bans of peers no longer in the table go once they count for nothing: over a long uptime of
    peers that came and went they would only grow."""
    unlisted = [a for a in gone_candidates(swarm) if swarm.peers[a].peer_id not in listed]
    if asked is None:
        unlisted = unlisted[:BACKGROUND_PEERS]  # (the others at a later read: each asked on a link)
        answered = {a for a, (info, _) in swarm._ask_now(unlisted).items()
                    if info.get("leaving") is not True} if unlisted else set()
    else:  # the others: next read
        unlisted = [a for a in unlisted if a in asked and (a not in swarm.bans or swarm.bans[a].since < asked_at)]
        answered = {a for a in unlisted if asked[a]}
    for address in unlisted:
        ban = swarm.bans.get(address)
        if address in answered:
            if ban is not None and ban.code in GONE_CODES:
                ban.back = True  # (it answers: used again once no route is left without it)
            continue
        del swarm.peers[address]  # (its ban stays, pruned below once it counts for nothing)
        swarm.dropped(address)
        swarm._close_link(address)  # (a ban closed it already: sessions on it find out at their next step)
        log.info("peer %s went (%s) and no table read lists it any more: dropped from the table", address,
                 ban.why if ban is not None and ban.code in GONE_CODES else "its record expired unrenewed")
    # (Lapsed past its own length, a ban no longer counts for the next fault either: Bans.ban.)
    now = time.monotonic()
    for address in [a for a, b in swarm.bans.items()
                    if a not in swarm.peers and now >= b.until + swarm._ban_length(b.strikes)]:
        del swarm.bans[address]
