"""What a node makes of the peers its gossip table holds (node/gossip.py's `Gossip`, whose base
class this is): which contacts it relays steps to (`knows`), which peers it links to ahead as its
likely next hops (`warm_next_hops`, at a join, a refresh that makes one, or a move), and the
joins, refreshes and silences of its peers, logged and passed to its gossip links."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nanoswarm.keys.contact import split_contact
from nanoswarm.keys.records import Record, record_contact

if TYPE_CHECKING:
    from nanoswarm.keys.table import RecordTable

    from .clock_watch import ClockWatch
    from .gossip_links import GossipLinks
    from .handler import RequestHandler

log = logging.getLogger("nanoswarm.node.gossip")  # (one logger for the gossip: operators grep it)


class TablePeers:
    """The peers of a `Gossip`'s table, as its node uses them (its fields `table`, `handler`,
    `links`, `clock`, `insecure`, `on_next_hop`, `_known`, `_knows`; `peer_id`, `_update_stats`)."""
    table: RecordTable
    handler: RequestHandler
    links: GossipLinks
    clock: ClockWatch
    insecure: bool
    on_next_hop: Callable[[str], None] | None
    _known: set[tuple[str, bytes | None]]
    _knows: dict[str, bool]

    if TYPE_CHECKING:  # Gossip's
        @property
        def peer_id(self) -> str: ...
        def _update_stats(self) -> None: ...

    def knows(self, contact: str) -> bool:
        """Whether `contact` is a peer of our table serving our model: the only peers we relay
        steps to and all-reduce with (review134: one of another model sharing the swarm counted
        too). Asked for every relayed step: answered from a cache, as parsing a contact's key
        takes a Python loop."""
        known = self._knows.get(contact)
        if known is None:
            try:
                known = split_contact(contact) in self._known
            except ValueError:
                known = False
            if len(self._knows) >= 1024:  # contacts come from clients: keep the cache bounded
                self._knows.clear()
            self._knows[contact] = known
        return known

    def _renewed(self, record: Record, old: Record) -> None:
        """A newer record of a peer held live (`old`: the one it replaces): a link to it that
        dropped, with requests waiting, is started afresh (GossipLinks.renewed), so that their
        timeout does not forget the peer just heard from. Not at a join (the first record of a
        peer, or one back after it was forgotten: _joined re-dates the requests instead): at
        start-up every record is one, and a bootstrap whose connect was refused had its link
        closed by another's reply, and was warned about as not answering even when it came up
        within the grace (review136). A peer that has just become a likely next hop (it moved to
        the blocks after ours, switched to our model under its identity, or is one at a new
        contact) is linked ahead, as at a join."""
        if record.peer_id == self.peer_id:
            return
        self.links.renewed(record_contact(record))
        if self._next_hop(record) and not (self._next_hop(old) and record_contact(old) == record_contact(record)):
            self.on_next_hop(record_contact(record))  # (_next_hop: only where on_next_hop is set)

    def _joined(self, record: Record) -> None:
        """Log a peer that joined (or came back), as departures and silent peers are logged."""
        if record.peer_id == self.peer_id:
            return
        served = f"layers {record.layers[0]}:{record.layers[1]}"
        if record.heads is not None:
            served += f", heads {record.heads[0]}:{record.heads[1]}"
        if record.model_id != self.handler.model_id:
            served += f" of another model ({record.model_id[:16]})"
        log.info("peer %s at %s joined: %s%s", record.peer_id, record.address, served,
                 self.clock.peer_note(record_contact(record)))
        self.links.joined(record_contact(record))
        if self._next_hop(record):
            self.on_next_hop(record_contact(record))

    def warm_next_hops(self) -> None:
        """Link ahead to the likely next hops of the table: after this node moved to other blocks
        (node/placement.py), its next hops are other peers than at their joins."""
        for record in self.table.records(self.handler.model_id):
            if record.peer_id != self.peer_id and self._next_hop(record):
                self.on_next_hop(record_contact(record))

    def _next_hop(self, record: Record) -> bool:
        """Whether `record`'s peer is a likely next hop of relayed steps (whole blocks of our model
        that begin where ours end, and a link we may use), and someone wants to know."""
        return (self.on_next_hop is not None and record.model_id == self.handler.model_id and record.heads is None
                and not self.handler.head_shard and record.layers[0] == self.handler.blocks.stop
                and (self.insecure or not record.insecure))

    def _forget(self, contact: str) -> None:
        """Forget the records behind a contact that stopped answering: those with its endpoint
        and its key, not others that merely claim the same endpoint."""
        try:
            silent = split_contact(contact)
        except ValueError:
            silent = None
        for r in self.table.records():
            if (r.address, None if r.insecure else r.curve_key) == silent and r.peer_id != self.peer_id:
                self.table.remove(r.peer_id)
                log.info("peer %s at %s stopped answering; forgotten until it announces again",
                         r.peer_id, r.address)
        self._update_stats()
