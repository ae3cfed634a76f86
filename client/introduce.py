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

from nanoswarm.keys.records import Record, record_contact, unverified_record
from nanoswarm.protocol.messages import Message

from .peer_errors import PeerError
from .round_trips import PROBE_SECONDS, Asked, ask_all, send_all, take_all
from .transport import PeerConnection

log = logging.getLogger(__name__)

# What one offer carries at most: a node takes 256 records from one message, and its header must
# stay under 64 KiB (a record is ~300 bytes).
OFFER_RECORDS = 128
OFFER_BYTES = 32 * 1024
TABLE_RECORDS = 256  # of a contact's reply, read at most (a node gossips 128)


def ask_info(conns: dict[str, PeerConnection], timeout: float, took: dict[str, float] | None = None,
             introduce_model: str | None = None) -> dict[str, Message | PeerError]:
    """Each contact's `info`, all asked at once within one `timeout` (round_trips.ask_all); with
    `introduce_model`, their tables too, in the same round trip, and those that answered as
    peers of that model are told of each other (`introduce`)."""
    infos = send_all(conns, "info")
    tables = (send_all(conns, "records", dict.fromkeys(conns, {"want": True}))
              if introduce_model and len(conns) > 1 else None)
    replies = take_all(infos, timeout, took)
    if tables is not None:  # the tables of those that answered now (review110: a frozen one's cost 1 s more)
        ours = {c: str(r.fields.get("peer_id")) for c, r in replies.items()
                if not isinstance(r, PeerError) and r.fields.get("model_id") == introduce_model}
        if len(ours) > 1:
            introduce(conns, tables, ours, min(timeout, PROBE_SECONDS))
    return replies


def introduce(conns: dict[str, PeerConnection], tables: Asked, peer_ids: dict[str, str],
              timeout: float) -> list[str]:
    """Read the `records` replies of `tables` (asked with want=True) of the contacts in
    `peer_ids` (address -> the peer id its `info` gave), and offer each contact the own records
    of the others that it does not hold, all at once within one `timeout`. Returns the contacts
    that answered the offer (a node answers one whose records it all refused too)."""
    own: dict[str, tuple[dict, Record]] = {}  # address -> its own signed record, as it sent it
    holds: dict[str, set[tuple[str, str]]] = {}  # address -> (peer id, contact) of what its table holds
    for address, reply in take_all(tables, timeout, only=peer_ids).items():
        wires = _wires(reply)
        if wires is None:
            continue  # (a slow node: it relays as it did)
        records = [unverified_record(w) for w in wires]
        # A departure (a peer that left, and may be back since) or an old contact of the peer
        # is not what a relay needs: review110 found a restarted node not offered to a contact
        # that held its departure, which then refused to relay to it.
        holds[address] = {(r.peer_id, record_contact(r)) for r in records if r is not None and not r.departing}
        first = records[0] if records else None
        if first is not None and first.peer_id == peer_ids[address] and not first.departing:  # own first
            own[address] = (wires[0], first)
    offers = {address: _offer(address, own, peer_ids[address], known) for address, known in holds.items()}
    offers = {address: wires for address, wires in offers.items() if wires}
    if not offers:
        return []
    replies = ask_all({a: conns[a] for a in offers}, "records", timeout,
                      fields={a: {"records": wires, "want": False} for a, wires in offers.items()})
    answered = [a for a, reply in replies.items() if not isinstance(reply, PeerError)]
    log.info("offered %d of %d contacts the others' records (%d records)", len(answered), len(peer_ids),
             sum(len(offers[a]) for a in answered))
    return answered


def _wires(reply: Message | PeerError) -> list | None:
    if isinstance(reply, PeerError):
        return None
    wires = reply.fields.get("records")
    return wires[:TABLE_RECORDS] if isinstance(wires, list) else None


def _offer(address: str, own: dict[str, tuple[dict, Record]], peer_id: str,
           known: set[tuple[str, str]]) -> list[dict]:
    """The records to offer `address` (of `peer_id`): the others' own ones that its table does
    not hold at that contact; never one of its own peer id (a copy of its key file elsewhere is
    gossip's to name, docs/discovery.md)."""
    offer, size = [], 0
    for other, (wire, record) in own.items():
        if other == address or record.peer_id == peer_id or (record.peer_id, record_contact(record)) in known:
            continue
        size += len(wire["body"]) + len(wire["sig"]) + 16  # msgpack framing
        if size > OFFER_BYTES or len(offer) == OFFER_RECORDS:
            break
        offer.append(wire)
    return offer
