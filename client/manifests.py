"""A model's manifest asked of its peers and checked against its id, for those who have not its
files: `nanoswarm peers` without `--model` learns each model's block and head counts from it
(without them it could only guess them from the spans the records name).

The check is what makes a peer's word good: a model's id is the sha256 of its manifest's
canonical content (shards/manifest.py), so a manifest whose hash is the id is the model's, from
whichever peer it came; one that is not, or is not a manifest at all, is dropped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection, Iterable

import zmq

from nanoswarm.keys.records import record_contact
from nanoswarm.keys.table import RecordTable
from nanoswarm.shards.manifest import Manifest, ManifestError

from .peer_errors import PeerError, PeerTimeout
from .round_trips import send_all, take_all
from .transport import PeerConnection

log = logging.getLogger(__name__)

PEERS_ASKED = 2  # a model's peers asked at once (drawn at random), so one gone costs no retry
SLICE_SECONDS = 0.1  # how long replies are read before the models answered for are checked
MAX_LINKS = 64  # links opened at once in all; models past them stay unasked (their counts guessed)


def manifests_from_peers(table: RecordTable, model_ids: Iterable[str], timeout: float,
                         client_keys: tuple[bytes, bytes] | None = None,
                         first: Iterable[str] = ()) -> dict[str, Manifest]:
    """Per model of `model_ids`, its manifest as one of its peers in `table` sends it in `info`,
    checked against the id; the models no peer sent one for within `timeout` are left out (a
    node of an earlier version sends none). Contacts in `first` (the bootstraps that answered)
    are asked before others for the models their records name; the rest are drawn at random,
    not by anything a record states (a record's `seq` is its signer's to choose: review171's
    records that outranked every honest one and never answered). A manifest counts for
    whichever wanted model it is, whoever sent it (a made-up model's record may name a real
    node's contact)."""
    wanted = set(model_ids)
    first = list(first)
    asked: dict[str, str] = {}  # contact -> the model it was asked for (it may send another's)
    for model_id in sorted(wanted):
        contacts = list(dict.fromkeys(record_contact(r) for r in table.records(model_id)))
        random.shuffle(contacts)
        contacts.sort(key=lambda c: c not in first)  # (a stable sort: the rest stay shuffled)
        for contact in [c for c in contacts if c not in asked][:PEERS_ASKED]:
            if len(asked) < MAX_LINKS:
                asked[contact] = model_id
    conns: dict[str, PeerConnection] = {}
    found: dict[str, Manifest] = {}
    try:
        for contact in asked:
            try:
                conns[contact] = PeerConnection(contact, timeout, client_keys=client_keys)
            except (ValueError, zmq.ZMQError) as e:  # (records' contacts were checked: rare)
                log.info("%s: cannot ask it for its model's manifest: %s", contact, e)
        sent = send_all(conns, "info", {c: {"manifest": True} for c in conns})
        deadline, pending = time.monotonic() + timeout, set(conns)
        # In slices, so that a model one peer answered for does not wait out another that is gone.
        while pending and (left := deadline - time.monotonic()) > 0:
            for contact, reply in take_all(sent, min(left, SLICE_SECONDS), only=pending).items():
                if isinstance(reply, PeerTimeout):
                    continue  # (only this slice's: read again in the next)
                pending.discard(contact)
                if isinstance(reply, PeerError):
                    continue
                manifest = checked_manifest(reply.fields.get("manifest"), wanted)
                if manifest is not None:
                    found.setdefault(manifest.model_id, manifest)
                elif reply.fields.get("manifest") is not None:
                    log.warning("%s sent a manifest that is not of a model its records name: not used", contact)
            pending = {c for c in pending if asked[c] not in found}
    finally:
        for conn in conns.values():
            conn.close()
    return found


def checked_manifest(sent: object, model_ids: Collection[str]) -> Manifest | None:
    """What a peer `sent` for a manifest in `info`, if it is one and its hash is one of `model_ids`."""
    try:
        manifest = Manifest.from_dict(sent)
    except (ManifestError, TypeError, ValueError, RecursionError):  # a peer's bytes: anything
        return None
    return manifest if manifest.model_id in model_ids else None
