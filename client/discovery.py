"""Finding the swarm from one bootstrap contact: fetch its table of signed records, verify them.

Nothing a bootstrap node says is trusted as such: every record is verified here (signature,
peer id, lifetime; keys/records.py) and only then used, and each peer is reached with the CURVE
key from its own signed record, so a bootstrap cannot send us to an impostor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import zmq

from nanoswarm.keys.contact import endpoint_of, format_contact, split_contact
from nanoswarm.keys.records import Record, check_endpoint
from nanoswarm.keys.table import STALE_SEQ, RecordTable

from .transport import PeerConnection, PeerError

log = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """No bootstrap contact answered."""


NO_PEER_OF_MODEL = "knows no peer of model"


@dataclass
class Fetched:
    table: RecordTable
    answered: list[str]  # bootstrap contacts that replied
    rtt: dict[str, float]  # contact -> seconds for the records request
    errors: dict[str, str]  # contact -> why it failed

    def warn_unanswered(self) -> None:
        """Log, as warnings, the bootstraps that failed when others answered. When none answered,
        the caller's one error line says why for each, so they are not also logged above INFO."""
        if self.answered:
            for why in self.errors.values():
                log.warning("bootstrap %s", why)  # a PeerError names the contact


def record_contact(record: Record) -> str:
    """How to reach the node behind a record: endpoint#key, or the bare endpoint if --insecure."""
    return format_contact(record.address, None if record.insecure else record.curve_key)


def record_age(record: Record, now: float | None = None) -> float:
    """Seconds since the record was signed: nodes use wall-clock microseconds as seq (seq_now)."""
    now = time.time() if now is None else now
    return max(0.0, now - record.seq / 1e6)


MAX_PAGES = 64  # pages of one model's records asked of a bootstrap (a table holds <= 4,096 peers)


def fetch_wires(contact: str, timeout: float = 5.0, client_keys: tuple[bytes, bytes] | None = None,
                model_id: str | None = None) -> tuple[list, float]:
    """The raw wires of a bootstrap's table (nothing pushed) and the first request's rtt. With
    `model_id`, that model's live records, page after page (node/gossip.py on_records): all of
    them, however many other records (of other models, or thrown in to crowd ours out) the table
    holds; without, the sample a node gossips. A contact that is not tcp://HOST:PORT[#KEY]
    raises ValueError before anything connects."""
    check_endpoint(endpoint_of(contact))
    split_contact(contact)  # the key, if any, must be one
    try:
        conn = PeerConnection(contact, timeout, client_keys=client_keys)
    except zmq.ZMQError as e:
        raise ValueError(f"cannot connect: {e}") from None
    fields: dict = {"records": [], "want": True}
    if model_id is not None:
        fields["model_id"] = model_id
    wires: list = []
    rtt = 0.0
    try:
        for page in range(MAX_PAGES):
            t0 = time.perf_counter()
            reply = conn.request("records", fields)
            if page == 0:
                rtt = time.perf_counter() - t0
            wires += reply.fields["records"]
            after = reply.fields.get("after")
            if model_id is None or not after or after <= (fields.get("after") or ""):
                break  # the last page (or a node that does not page, or a cursor that does not move on)
            fields["after"] = after
        return wires, rtt
    finally:
        conn.close()


def fetch_table(bootstrap: list[str], timeout: float = 5.0,
                client_keys: tuple[bytes, bytes] | None = None, model_id: str | None = None,
                insecure: bool = True) -> Fetched:
    """Ask every bootstrap contact for its table (with `model_id`: that model's records, all
    pages); verified records from all of them, merged. Without `insecure`, a contact without a
    key is not asked (a client's rule for every peer: client/swarm.py)."""
    table = RecordTable()
    fetched = Fetched(table, [], {}, {})
    for contact in bootstrap:
        if not insecure and "#" not in contact:
            fetched.errors[contact] = (f"{contact}: insecure: no CURVE key for this bootstrap: give its whole "
                                       "contact (ADDRESS#KEY, printed by the node) or allow unencrypted links "
                                       "with --insecure")
            continue
        try:
            wires, rtt = fetch_wires(contact, timeout, client_keys, model_id)
        except (PeerError, ValueError) as e:
            fetched.errors[contact] = str(e) if isinstance(e, PeerError) else f"{contact}: bad_contact: {e}"
            if isinstance(e, PeerError) and e.code == "disconnected":  # the node dropped our handshake
                fetched.errors[contact] += (" (the contact has no #KEY: give the whole contact the node printed)"
                                            if split_contact(contact)[1] is None else
                                            " (a private swarm that does not allow this client's key? --key-file)")
            log.info("bootstrap %s", fetched.errors[contact])  # a PeerError names the contact
            continue
        fetched.answered.append(contact)
        fetched.rtt[contact] = rtt
        for wire in wires:
            table.offer(wire)  # verifies; a bad record is counted in table.rejected and dropped
    # stale_seq is no failure: a second bootstrap's copy of a record, or an older one during churn.
    failed = {why: n for why, n in table.rejected.items() if why != STALE_SEQ}
    if failed:
        log.warning("bootstrap sent records that failed verification: %s", failed)
    return fetched


def record_info(record: Record) -> dict:
    """The `info`-like fields the route builder needs, from a verified record."""
    return {"peer_id": record.peer_id, "model_id": record.model_id, "layers": list(record.layers),
            "heads": list(record.heads) if record.heads else None, "throughput": record.throughput,
            "load": record.load, "insecure": record.insecure, "expires": record.expires,
            "seq": record.seq, "source": "record"}


def add_from_bootstrap(swarm, bootstrap: list[str], timeout: float = 5.0) -> int:
    """Fill `swarm` (client/swarm.py) with the peers of its model from the bootstraps' tables.

    Peers are keyed by their contact string (endpoint#key); where records of several peer ids
    name one contact, the node behind it says which is its own (`_owners`). Records of --insecure
    nodes are skipped unless the swarm allows insecure links.  Returns how many peers were added; raises
    DiscoveryError if no bootstrap answered.
    """
    fetched = fetch_table(bootstrap, timeout, swarm.options.client_keys, swarm.model_id, swarm.options.insecure)
    if not fetched.answered:
        detail = "; ".join(fetched.errors.values())  # each names its contact
        raise DiscoveryError(f"no bootstrap node answered ({detail})")
    fetched.warn_unanswered()
    rtt = min(fetched.rtt.values())  # a stand-in until the first real exchange with each peer
    claims: dict[str, list[Record]] = {}
    for record in fetched.table.records(swarm.model_id):
        claims.setdefault(record_contact(record), []).append(record)
    for contact in fetched.answered:
        if not claims:  # the likely mistake: bootstraps of another model's swarm (or --model of another one)
            swarm.rejected.setdefault(contact, f"{NO_PEER_OF_MODEL} {swarm.model_id[:12]} "
                                      "(`nanoswarm peers --bootstrap` lists what it knows)")
        elif swarm.rejected.get(contact, "").startswith(NO_PEER_OF_MODEL):  # a refresh found some
            del swarm.rejected[contact]
    for contact in [c for c, records in claims.items() if records[0].insecure and not swarm.options.insecure]:
        swarm.rejected[contact] = "node runs without encryption (--insecure); not used"
        del claims[contact]
    owners = _owners(swarm, {c: r for c, r in claims.items() if len(r) > 1}, timeout)
    added: dict[str, str] = {}  # peer id -> its contact now
    for contact, records in claims.items():
        record = records[0] if len(records) == 1 else owners.get(contact)
        if record is None:
            continue
        swarm.add_info(contact, record_info(record), rtt, curve_key=None if record.insecure else record.curve_key)
        added[record.peer_id] = contact
    # A peer that restarted elsewhere (its signed record, newer, names a new contact): its old
    # contact is forgotten, not kept to fail over from whenever its ban runs out.
    for address, peer in list(swarm.peers.items()):
        if added.get(peer.peer_id, address) != address:
            swarm.forget(address, f"peer {peer.peer_id} is now at {added[peer.peer_id]}")
    log.info("bootstrap: %d records, %d peers for model %s", len(fetched.table), len(added), swarm.model_id[:12])
    return len(added)


def _owners(swarm, disputed: dict[str, list[Record]], timeout: float) -> dict[str, Record]:
    """For each contact that records of several peer ids name, the node's own record: anyone can
    copy a node's public endpoint and CURVE key into a record they sign, to make clients take it
    for a node serving other blocks. Only the node holding that key's secret can answer `info`
    over it, so its answer says whose record it is. All are asked at once, within one `timeout`;
    a contact that does not answer, or names none of its records, is not used."""
    asked: dict[str, tuple] = {}
    for contact, records in disputed.items():
        try:
            conn = swarm.connection(contact)
            asked[contact] = (conn, conn.send("info", timeout=0), records)
        except PeerError as e:
            swarm.forget(contact, f"records of {len(records)} peer ids name this contact; {e.code}")
    owners: dict[str, Record] = {}
    deadline = time.monotonic() + timeout
    while asked:
        for contact, (conn, req_id, records) in list(asked.items()):
            why = f"records of {len(records)} peer ids name this contact"
            try:
                reply = conn.take(req_id)
            except PeerError as e:
                del asked[contact]
                swarm.forget(contact, f"{why}, and it did not answer info ({e.code})")
                continue
            if reply is None:
                continue
            del asked[contact]
            owner = next((r for r in records if r.peer_id == reply.fields.get("peer_id")), None)
            if owner is None:
                swarm.forget(contact, f"{why}, and none is the peer id it gives")
            else:
                owners[contact] = owner
                log.warning("bootstrap: %d records claim %s; kept the one of %s, which it confirmed",
                            len(records), contact, owner.peer_id)
        left = deadline - time.monotonic()
        if not asked or left <= 0:
            break
        poller = zmq.Poller()
        for conn, _, _ in asked.values():
            conn.register(poller)
        poller.poll(max(1, int(left * 1000)))
    for contact, (_, _, records) in asked.items():
        swarm.forget(contact, f"records of {len(records)} peer ids name this contact, and it did not "
                              f"answer info within {timeout:g}s")
    return owners


# ----- `nanoswarm peers` ------------------------------------------------------------------
def _spans(blocks: list[int]) -> list[str]:
    from .route import format_layers

    return format_layers(blocks).split(", ") if blocks else []


def routable_blocks(records: list[Record], n_layer: int, n_head: int) -> list[bool]:
    """Per block: whether a client can route through it, by the route planner's own rule.

    A whole-block peer serves a block; head shards do only if their head ranges tile 0..n_head
    exactly, so a block served by `heads 0:6` alone (of 12) is a gap.
    """
    from .route import PeerInfo, candidate_stages

    peers = [PeerInfo(r.address, r.peer_id, r.model_id, tuple(r.layers), tuple(r.heads) if r.heads else None)
             for r in records]
    return [bool(candidate_stages(peers, i, n_layer, n_head)) for i in range(n_layer)]


def swarm_report(table: RecordTable, n_layers: dict[str, int] | None = None, model_id: str | None = None,
                 now: float | None = None, n_heads: dict[str, int] | None = None) -> list[dict]:
    """Per model: its peers and the coverage of every block (summed tokens/s) with the gaps.

    `n_layers` gives a model's block count (from its manifest); otherwise it is the highest block
    any record serves, so gaps after the last served block cannot be seen.  `n_heads` likewise
    gives its head count; otherwise it is the highest head any record serves, so a block whose
    head shards all stop short of the last head is not seen as a gap unless a record elsewhere
    serves that head.  A gap is a block no route can pass (see routable_blocks).
    """
    now = time.time() if now is None else now
    by_model: dict[str, list[Record]] = {}
    for r in table.records(model_id):
        by_model.setdefault(r.model_id, []).append(r)
    if model_id is not None:
        by_model.setdefault(model_id, [])
    out = []
    for mid, records in sorted(by_model.items()):
        known = (n_layers or {}).get(mid)
        n_layer = known or max((r.layers[1] for r in records), default=0)
        n_head = (n_heads or {}).get(mid) or max((r.heads[1] for r in records if r.heads), default=0)
        routable = routable_blocks(records, n_layer, n_head)
        # Throughput by the placement rule: whole-block peers, plus the slowest member of the best
        # head group that holds every head (a head shard alone runs no block).
        from nanoswarm.node.placement import coverage

        cover = [[tps, 0] for tps in coverage(records, n_layer, n_head)]
        for r in records:
            for i in range(r.layers[0], min(r.layers[1], n_layer)):
                cover[i][1] += 1
        out.append({
            "model_id": mid, "n_layer": n_layer, "n_layer_known": known is not None,
            "peers": [{"peer_id": r.peer_id, "contact": record_contact(r), "address": r.address,
                       "layers": list(r.layers), "heads": list(r.heads) if r.heads else None,
                       "throughput": r.throughput, "load": r.load, "age": record_age(r, now),
                       "expires_in": r.expires - now, "insecure": r.insecure}
                      for r in sorted(records, key=lambda r: (r.layers, r.peer_id))],
            "coverage": [{"block": i, "throughput": t, "peers": n} for i, (t, n) in enumerate(cover)],
            "gaps": _spans([i for i, ok in enumerate(routable) if not ok]),
        })
    return out


def format_report(report: list[dict]) -> str:
    """The report as readable tables."""
    lines: list[str] = []
    for m in report:
        extent = f"{m['n_layer']} blocks" + ("" if m["n_layer_known"] else " seen")
        n = len(m["peers"])
        lines.append(f"model {m['model_id'][:16]} ({extent}, {n} peer{'' if n == 1 else 's'})")
        lines.append(f"  {'PEER':<28} {'ADDRESS':<24} {'LAYERS':<7} {'HEADS':<6} {'TOK/S':>8} {'LOAD':>5} {'AGE':>6}")
        for p in m["peers"]:
            heads = f"{p['heads'][0]}:{p['heads'][1]}" if p["heads"] else "all"
            lines.append(f"  {p['peer_id']:<28} {p['address']:<24} {p['layers'][0]}:{p['layers'][1]:<5} "
                         f"{heads:<6} {p['throughput']:>8.1f} {p['load']:>5.2f} {p['age']:>5.0f}s")
        lines.append("  coverage (tokens/s through each block: whole-block peers plus the slowest member of a "
                     "head group holding every head; peers serving any of it):")
        cov, i = m["coverage"], 0
        while i < len(cov):  # group runs of blocks with the same coverage
            j = i
            while j + 1 < len(cov) and (cov[j + 1]["throughput"], cov[j + 1]["peers"]) == (
                    cov[i]["throughput"], cov[i]["peers"]):
                j += 1
            n = cov[i]["peers"]
            lines.append(f"    blocks {i}:{j + 1:<4} {cov[i]['throughput']:>8.1f} tokens/s  "
                         f"{n} peer{'' if n == 1 else 's'}")
            i = j + 1
        lines.append(f"  gaps: {', '.join(m['gaps']) if m['gaps'] else 'none'}")
    return "\n".join(lines) if lines else "no records"
