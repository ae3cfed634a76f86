"""`--peers` contacts told of each other, so that they relay.

A node passes a relayed step on only to a peer in its own table of signed records
(docs/protocol.md), and nodes started without `--bootstrap` know no one: a client of such
contacts had every session's first relayed step refused `not_served` at each hop, and then went
star (every stage answering the client) for the rest of the session. At connect (and at each
refresh of the contacts) the client asks each contact for the records it gossips, its own first,
in the same round trip as its `info`, and offers each the others' own records that it does not
hold: unchanged signed wires, which the node verifies as it does gossip's, as the local harness
does for the nodes it starts (LocalCluster.introduce). Gossip between them takes it from there.
"""

from __future__ import annotations

import logging

from nanoswarm.keys.records import unverified_peer_id
from nanoswarm.protocol.messages import Message

from .peer_errors import PeerError
from .round_trips import Asked, ask_all, take_all
from .transport import PeerConnection

log = logging.getLogger(__name__)

# What one offer carries at most: a node takes 256 records from one message, and its header must
# stay under 64 KiB (a record is ~300 bytes).
OFFER_RECORDS = 128
OFFER_BYTES = 32 * 1024
TABLE_RECORDS = 256  # of a contact's reply, read at most (a node gossips 128)


def introduce(conns: dict[str, PeerConnection], tables: Asked, peer_ids: dict[str, str],
              timeout: float) -> list[str]:
    """Read the `records` replies of `tables` (asked with want=True) of the contacts in
    `peer_ids` (address -> the peer id its `info` gave), and offer each contact the own records
    of the others that its reply does not name, all at once within one `timeout`. Returns the
    contacts that took an offer."""
    own: dict[str, dict] = {}   # address -> its own signed record, as it sent it
    holds: dict[str, set[str | None]] = {}  # address -> the peer ids its table names
    for address, reply in take_all(tables, timeout, only=peer_ids).items():
        wires = _wires(reply)
        if wires is None:
            continue  # (an old node, a slow one: it relays as it did)
        holds[address] = {unverified_peer_id(w) for w in wires}
        if wires and unverified_peer_id(wires[0]) == peer_ids[address]:  # a node gossips its own first
            own[address] = wires[0]
    offers = {address: _offer(address, own, peer_ids, known) for address, known in holds.items()}
    offers = {address: wires for address, wires in offers.items() if wires}
    if not offers:
        return []
    replies = ask_all({a: conns[a] for a in offers}, "records", timeout,
                      fields={a: {"records": wires, "want": False} for a, wires in offers.items()})
    told = [a for a, reply in replies.items() if not isinstance(reply, PeerError)]
    log.info("told %d of %d contacts of the others (%d records)", len(told), len(peer_ids),
             sum(len(offers[a]) for a in told))
    return told


def _wires(reply: Message | PeerError) -> list | None:
    if isinstance(reply, PeerError):
        return None
    wires = reply.fields.get("records")
    return wires[:TABLE_RECORDS] if isinstance(wires, list) else None


def _offer(address: str, own: dict[str, dict], peer_ids: dict[str, str], known: set[str | None]) -> list[dict]:
    """The records to offer `address`: the others' own ones whose peer id its table lacks (its
    own id is in it: a contact of the same id is never offered it)."""
    offer, size = [], 0
    for other, wire in own.items():
        if other == address or peer_ids[other] in known:
            continue
        size += len(wire["body"]) + len(wire["sig"]) + 16  # msgpack framing
        if size > OFFER_BYTES or len(offer) == OFFER_RECORDS:
            break
        offer.append(wire)
    return offer
