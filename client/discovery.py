"""Finding the swarm from bootstrap contacts: fetch their tables of signed records, verify them.

Nothing a bootstrap node says is trusted as such: every record is verified here (signature,
peer id, lifetime; keys/records.py) and only then used, and each peer is reached with the CURVE
key from its own signed record, so a bootstrap cannot send us to an impostor.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from nanoswarm import descriptors
from nanoswarm.keys.clock import CLOCK_WARN_SECONDS, reply_offset, skew_words
from nanoswarm.keys.contact import endpoint_of, split_contact
from nanoswarm.keys.records import EXPIRED, TOO_FAR_FUTURE, Record, check_endpoint, record_contact
from nanoswarm.keys.table import STALE_SEQ, RecordTable

from .departures import drop_unlisted
from .peer_errors import PeerError, PeerTimeout
from .round_trips import (
    PROBE_SECONDS,
    TIMING_LIFE,
    ask_all,
    measure_round_trips,
)
from .transport import PeerConnection

if TYPE_CHECKING:
    from .swarm import Swarm

log = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """No bootstrap contact answered."""


NO_PEER_OF_MODEL = "knows no peer of model"
CLOCK_OFF = "this machine's clock is"
MAX_PARALLEL_FETCHES = 8  # bootstrap contacts asked at once
_clock_warned: set[str] = set()  # bootstraps whose clock this process has warned about


@dataclass
class Fetched:
    table: RecordTable
    answered: list[str]  # bootstrap contacts that replied
    rtt: dict[str, float]  # contact -> seconds for the records request
    errors: dict[str, str]  # contact -> why it failed
    clock: dict[str, float] = field(default_factory=dict)  # contact -> its clock minus ours (keys/clock.py)
    # Round trips of its peers timed with the read, in the background (time_records; None: no
    # answer in time), so that taking the read in does not wait to time them (BackgroundFetch).
    timed: dict[str, float | None] = field(default_factory=dict)
    timed_when: float = 0.0  # monotonic, when those were timed (PeerTable.timed_at)
    # `--peers` contacts' own `info` and the seconds it took, read in the background (read_contacts).
    infos: dict[str, tuple[dict, float]] = field(default_factory=dict)
    # Peers that went (departures.gone_candidates), asked for `info` in the background: address -> whether it
    # answered, not leaving. None: not asked with the read (departures.drop_unlisted asks them itself).
    gone: dict[str, bool] | None = None
    gone_at: float = math.inf  # monotonic, when they were asked (a ban made after: not answered by it)
    role: str = "bootstrap"  # what those asked are, in messages ("known peer": PeerTable.refresh's fallback)

    def no_answer(self) -> str:
        """Why no bootstrap answered, in one line: each reason names its contact. Where none could
        even be asked (no key given, a malformed contact), it says so (review163: "no bootstrap
        node answered" of a contact never asked)."""
        unasked = self.errors and all(why.startswith((f"{c}: bad_contact:", f"{c}: insecure:"))
                                      for c, why in self.errors.items())
        who = self.role if self.role.endswith("peer") else f"{self.role} node"  # (not "known peer node")
        return (f"{f'no {self.role} contact could be used' if unasked else f'no {who} answered'} "
                f"({'; '.join(self.errors.values())})")

    def clock_off(self, contact: str) -> str | None:
        """How far this machine's clock is off `contact`'s, when it is too far for records to
        live through it (review93: every record then looks expired, or signed too far ahead)."""
        offset = self.clock.get(contact)
        if offset is None or abs(offset) <= CLOCK_WARN_SECONDS:
            return None
        return (f"{CLOCK_OFF} {skew_words(offset)} this bootstrap's: records live by wall-clock "
                "time, so they look " + (f"{offset:.0f} s younger" if offset > 0 else f"{-offset:.0f} s older")
                + " here; one of the two clocks is off (NTP sets it)")

    def warn_unanswered(self, level: int = logging.WARNING) -> None:
        """Log, as warnings (or at `level`), the bootstraps that failed when others answered. When
        none answered, the caller's one error line says why for each, so they are not also logged
        above INFO."""
        if self.answered:
            for why in self.errors.values():
                log.log(level, "%s %s", self.role, why)  # a PeerError names the contact


MAX_PAGES = 64  # pages of one model's records asked of a bootstrap (a table holds <= 4,096 peers)


def fetch_wires(contact: str, timeout: float = 5.0, client_keys: tuple[bytes, bytes] | None = None,
                model_id: str | None = None) -> tuple[list, float, float | None]:
    """The raw wires of a bootstrap's table (nothing pushed), the first request's rtt, and the
    contact's clock minus ours (None from a node that does not send its `now`). With
    `model_id`, that model's live records, page after page (node/gossip.py on_records): all of
    them, however many other records (of other models, or thrown in to crowd ours out) the table
    holds; without, the sample a node gossips. A contact that is not tcp://HOST:PORT[#KEY]
    raises ValueError before anything connects."""
    check_endpoint(endpoint_of(contact))
    split_contact(contact)  # the key, if any, must be one
    try:
        conn = PeerConnection(contact, timeout, client_keys=client_keys)
    except zmq.ZMQError as e:
        descriptors.check(e)  # none left here for a socket: no fault of the contact's (review141)
        raise ValueError(f"cannot connect: {e}") from None
    fields: dict = {"records": [], "want": True}
    if model_id is not None:
        fields["model_id"] = model_id
    wires: list = []
    rtt, offset = 0.0, None
    try:
        for page in range(MAX_PAGES):
            if page == 0:
                reply, rtt = conn.timed_request("records", fields)
                offset = reply_offset(reply.fields.get("now"), 0.0, rtt)
            else:
                reply = conn.request("records", fields)
            wires += reply.fields["records"]
            after = reply.fields.get("after")
            if model_id is None or not after or after <= (fields.get("after") or ""):
                break  # the last page (or a node that does not page, or a cursor that does not move on)
            fields["after"] = after
        return wires, rtt, offset
    finally:
        conn.close()


def _fetch_all(contacts: list[str], timeout: float, client_keys: tuple[bytes, bytes] | None,
               model_id: str | None) -> dict[str, tuple[list, float, float | None] | BaseException]:
    """`fetch_wires` of every contact, MAX_PARALLEL_FETCHES at a time, each on a thread (and a
    socket) of its own: asked in turn, a frozen bootstrap listed first cost its whole timeout
    before the next was asked (a churn review). Daemon threads, waited on from this one: Ctrl-C
    here ends the wait at once, and exit does not wait for their timeouts (a pool's workers it
    joins did: a diff review)."""
    results: queue.Queue = queue.Queue()

    def fetch(contact: str) -> None:
        try:
            results.put((contact, fetch_wires(contact, timeout, client_keys, model_id)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
            results.put((contact, e))

    out: dict[str, tuple[list, float, float | None] | BaseException] = {}
    for i in range(0, len(contacts), MAX_PARALLEL_FETCHES):
        batch = contacts[i:i + MAX_PARALLEL_FETCHES]
        for contact in batch:
            threading.Thread(target=fetch, args=(contact,), daemon=True, name="nanoswarm-bootstrap").start()
        for _ in batch:
            contact, result = results.get()
            out[contact] = result
    return out


def fetch_table(bootstrap: list[str], timeout: float = 5.0,
                client_keys: tuple[bytes, bytes] | None = None, model_id: str | None = None,
                insecure: bool = True, role: str = "bootstrap") -> Fetched:
    """Ask every bootstrap contact for its table (with `model_id`: that model's records, all
    pages); verified records from all of them, merged. Without `insecure`, a contact without a
    key is not asked (a client's rule for every peer: client/swarm.py). `role`: what they are,
    in messages (review191: known peers asked when no bootstrap answered were called bootstraps)."""
    table = RecordTable()
    fetched = Fetched(table, [], {}, {}, role=role)
    asked = []
    for contact in dict.fromkeys(bootstrap):
        try:
            check_endpoint(endpoint_of(contact))  # what is wrong with "garbage" is not its key
        except ValueError as e:
            fetched.errors[contact] = f"{contact}: bad_contact: {e}"
            continue
        if not insecure and "#" not in contact:
            fetched.errors[contact] = (f"{contact}: insecure: no CURVE key for this bootstrap: give its whole "
                                       "contact (ADDRESS#KEY, printed by the node) or allow unencrypted links "
                                       "with --insecure")
            continue
        asked.append(contact)
    results = _fetch_all(asked, timeout, client_keys, model_id)
    for contact in asked:
        try:
            result = results[contact]
            if isinstance(result, BaseException):
                raise result
            wires, rtt, offset = result
        except (PeerError, ValueError) as e:
            fetched.errors[contact] = str(e) if isinstance(e, PeerError) else f"{contact}: bad_contact: {e}"
            log.info("%s %s", role, fetched.errors[contact])  # a PeerError names the contact
            continue
        fetched.answered.append(contact)
        fetched.rtt[contact] = rtt
        if offset is not None:
            fetched.clock[contact] = offset
        for wire in wires:
            table.offer(wire)  # verifies; a bad record is counted in table.rejected and dropped
    # stale_seq is no failure: a second bootstrap's copy of a record, or an older one during churn.
    failed = {why: n for why, n in table.rejected.items() if why != STALE_SEQ}
    if failed:
        # A record's lifetime runs on its signer's clock: expired (or too far ahead) here says that
        # its signer's clock or this machine's is off, where no bootstrap's clock was measured (an
        # earlier version's reply carries none, review96) to name it below.
        lifetime = (" (records live by their signers' wall clocks: this machine's clock or theirs is off)"
                    if failed.keys() & {EXPIRED, TOO_FAR_FUTURE} else "")
        log.warning("%s sent records that failed verification: %s%s", role, failed, lifetime)
    for contact in fetched.answered:
        if (off := fetched.clock_off(contact)) and contact not in _clock_warned:  # once: a client fetches again
            _clock_warned.add(contact)
            log.warning("%s %s: %s", role, contact, off)
    return fetched


def record_info(record: Record) -> dict:
    """The `info`-like fields the route builder needs, from a verified record."""
    return {"peer_id": record.peer_id, "model_id": record.model_id, "layers": list(record.layers),
            "heads": list(record.heads) if record.heads else None, "throughput": record.throughput,
            "load": record.load, "insecure": record.insecure, "expires": record.expires,
            "seq": record.seq, "source": "record"}


def add_from_bootstrap(swarm: Swarm, bootstrap: list[str], timeout: float = 5.0, time_peers: bool = False,
                       role: str = "bootstrap") -> int:
    """Fill `swarm` (client/swarm.py) with the peers of its model from the bootstraps' tables;
    with `time_peers` (a connect), time the round trip of each (round_trips.measure_round_trips).

    Peers are keyed by their contact string (endpoint#key); where records of several peer ids
    name one contact, the node behind it says which is its own (`_owners`). Records of --insecure
    nodes are skipped unless the swarm allows insecure links.  Returns how many peers were added; raises
    DiscoveryError if no bootstrap answered.
    """
    # A bootstrap is usually a peer of the route too: the swarm's link to it starts its handshake
    # now, beside the fetch's own link, not at the first open after it (review92b: 1.7 s for the
    # fetch, then 1.8 s for the open, at a 300 ms round trip).
    swarm.connect_ahead(bootstrap)  # a contact it cannot use: the fetch says why
    fetched = fetch_table(bootstrap, timeout, swarm.options.client_keys, swarm.model_id, swarm.options.insecure,
                          role)
    if not fetched.answered:
        raise DiscoveryError(fetched.no_answer())
    return add_fetched(swarm, fetched, timeout, time_peers=time_peers)


def add_fetched(swarm: Swarm, fetched: Fetched, timeout: float = 5.0, quiet: bool = False,
                time_peers: bool = False) -> int:
    """Fill `swarm` from bootstrap tables that `fetch_table` read (at least one answered): see
    add_from_bootstrap. Returns how many peers were added. `quiet`: bootstraps that did not
    answer are logged at INFO (a periodic refresh would warn about a dead one every minute).
    `time_peers`: time those not timed yet, here (a connect); a refresh does not wait for it (a
    frozen peer would hold a failover, or an open and the model's lock: review103)."""
    fetched.warn_unanswered(logging.INFO if quiet else logging.WARNING)
    # A peer's round trip is the bootstraps' until it is timed (PeerTable.rtt_of): by the
    # connect, or with a read in the background (fetched.timed), whose fresh times come first.
    rtt = min(fetched.rtt.values())
    take_timed(swarm, fetched)
    claims: dict[str, list[Record]] = {}
    for record in fetched.table.records(swarm.model_id):
        claims.setdefault(record_contact(record), []).append(record)
    for contact in fetched.answered:
        if not claims and (off := fetched.clock_off(contact)):  # its records are dropped here for the clock
            swarm.rejected.setdefault(contact, off)
        elif not claims:  # the likely mistake: bootstraps of another model's swarm (or --model of another one)
            swarm.rejected.setdefault(contact, f"{NO_PEER_OF_MODEL} {swarm.model_id[:12]} "
                                      "(`nanoswarm peers --bootstrap` lists what it knows; if it is the "
                                      "same checkpoint, it was sharded with other options)")
        elif swarm.rejected.get(contact, "").startswith((NO_PEER_OF_MODEL, CLOCK_OFF)):  # a refresh found some
            del swarm.rejected[contact]
    for contact in [c for c, records in claims.items() if records[0].insecure and not swarm.options.insecure]:
        swarm.rejected[contact] = ("the node runs without encryption (--insecure): allow unencrypted links with "
                                   "--insecure to use it")  # (review191: "not used" twice, no way out)
        del claims[contact]
    owners = _owners(swarm, {c: r for c, r in claims.items() if len(r) > 1}, timeout)
    added: dict[str, str] = {}  # peer id -> its contact now
    # `--peers` contacts given in another form than their records (PeerInfo.relay_name): such a
    # peer stays under the name it was given, not added twice (PeerTable.add_info, the other way).
    given = {p.relay_name: a for a, p in swarm.peers.items() if p.relay_name}
    for contact, records in claims.items():
        record = records[0] if len(records) == 1 else owners.get(contact)
        if record is None:
            continue
        if contact in given and swarm.peers[given[contact]].peer_id == record.peer_id:
            added[record.peer_id] = given[contact]
            continue
        swarm.add_info(contact, record_info(record), swarm.rtt_of(contact, rtt),
                       curve_key=None if record.insecure else record.curve_key)
        added[record.peer_id] = contact
    # A peer that restarted elsewhere (its signed record, newer, names a new contact): its old
    # contact is forgotten, not kept to fail over from whenever its ban runs out.
    for address, peer in list(swarm.peers.items()):
        if added.get(peer.peer_id, address) != address:
            swarm.forget(address, f"peer {peer.peer_id} is now at {added[peer.peer_id]}")
    drop_unlisted(swarm, {r.peer_id for records in claims.values() for r in records}, fetched.gone,
                  fetched.gone_at)
    log.info("%s: %d records, %d peers for model %s", fetched.role, len(fetched.table), len(added), swarm.model_id[:12])
    for contact in [c for c in swarm.timed if c not in swarm.peers and c not in swarm.contacts]:
        del swarm.timed[contact]  # (peers gone: the table is all there is to time)
        swarm.timed_at.pop(contact, None)
    if time_peers:
        measure_round_trips(swarm, [c for c in added.values() if c in swarm.peers], min(timeout, PROBE_SECONDS))
    return len(added)


def take_timed(swarm: Swarm, fetched: Fetched) -> None:
    """The round trips a background read timed (fresh ones over older), also where its records
    are not taken in (read too long ago: review104, a program opening a session less than once a
    minute never took one in, so its peers stayed untimed), stamped with when they were timed
    (review111: stamped when taken in, a read taken in late made them look fresh). No answer in
    time replaces a round trip TIMING_LIFE old too, as slow as the wait (rtt_of), as at connect:
    a peer whose link got that slow kept its first, fast one (review111)."""
    for contact, seconds in fetched.timed.items():
        if (seconds is not None or contact not in swarm.timed
                or fetched.timed_when - swarm.timed_at.get(contact, -math.inf) >= TIMING_LIFE):
            swarm.timed[contact], swarm.timed_at[contact] = seconds, fetched.timed_when
            if contact in swarm.peers:
                swarm.peers[contact].rtt = swarm.rtt_of(contact, swarm.peers[contact].rtt)


def _owners(swarm: Swarm, disputed: dict[str, list[Record]], timeout: float) -> dict[str, Record]:
    """For each contact that records of several peer ids name, the node's own record: anyone can
    copy a node's public endpoint and CURVE key into a record they sign, to make clients take it
    for a node serving other blocks. Only the node holding that key's secret can answer `info`
    over it, so its answer says whose record it is. All are asked at once, within one `timeout`;
    a contact that does not answer, or names none of its records, is not used."""
    conns: dict[str, PeerConnection] = {}
    for contact, records in disputed.items():
        try:
            conns[contact] = swarm.connection(contact)
        except PeerError as e:
            swarm.forget(contact, f"records of {len(records)} peer ids name this contact; {e.code}")
    owners: dict[str, Record] = {}
    for contact, reply in ask_all(conns, "info", timeout).items():
        records = disputed[contact]
        why = f"records of {len(records)} peer ids name this contact"
        if isinstance(reply, PeerTimeout):
            swarm.forget(contact, f"{why}, and it did not answer info within {timeout:g}s")
        elif isinstance(reply, PeerError):
            swarm.forget(contact, f"{why}, and it did not answer info ({reply.code})")
        elif (owner := next((r for r in records if r.peer_id == reply.fields.get("peer_id")), None)) is None:
            swarm.forget(contact, f"{why}, and none is the peer id it gives")
        else:
            owners[contact] = owner
            log.warning("bootstrap: %d records claim %s; kept the one of %s, which it confirmed",
                        len(records), contact, owner.peer_id)
    return owners
