"""A model's manifest asked of its peers and checked against its id, for those who have not its
files: `nanoswarm peers` without `--model` learns each model's block and head counts from it
(without them it could only guess them from the spans the records name).

The check is what makes a peer's word good: a model's id is the sha256 of its manifest's
canonical content (shards/manifest.py), so a manifest whose hash is the id is the model's, from
whichever peer it came; one that is not, or is not a manifest at all, is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import zmq

from nanoswarm.keys.records import record_contact
from nanoswarm.keys.table import RecordTable
from nanoswarm.shards.manifest import Manifest, ManifestError

from .peer_errors import PeerError, PeerTimeout
from .round_trips import send_all, take_all
from .transport import PeerConnection

log = logging.getLogger(__name__)

PEERS_ASKED = 2  # a model's peers asked at once (its newest records'), so one gone costs no retry
SLICE_SECONDS = 0.1  # how long replies are read before the models answered for are checked
MAX_LINKS = 64  # links opened at once in all; models past them stay unasked (their counts guessed)


def checked_manifest(model_id: str, sent: object) -> Manifest | None:
    """The manifest a peer `sent` in `info`, if it is one and its hash is `model_id`."""
    try:
        manifest = Manifest.from_dict(sent)
    except (ManifestError, TypeError, ValueError, RecursionError):  # a peer's bytes: anything
        return None
    return manifest if manifest.model_id == model_id else None


def manifests_from_peers(table: RecordTable, model_ids: Iterable[str], timeout: float,
                         client_keys: tuple[bytes, bytes] | None = None) -> dict[str, Manifest]:
    """Per model of `model_ids`, its manifest as one of its peers in `table` sends it in `info`,
    checked against the id; the models no peer sent one for within `timeout` are left out (a
    node of an earlier version sends none)."""
    asked: dict[str, str] = {}  # contact -> the model asked of it
    for model_id in model_ids:
        newest = sorted(table.records(model_id), key=lambda r: -r.seq)
        for record in newest[:PEERS_ASKED]:
            if len(asked) < MAX_LINKS:
                asked.setdefault(record_contact(record), model_id)
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
                if isinstance(reply, PeerError) or asked[contact] in found:
                    continue
                manifest = checked_manifest(asked[contact], reply.fields.get("manifest"))
                if manifest is not None:
                    found[asked[contact]] = manifest
                elif reply.fields.get("manifest") is not None:
                    log.warning("%s sent a manifest that is not model %s's: not used", contact, asked[contact][:16])
            pending = {c for c in pending if asked[c] not in found}
    finally:
        for conn in conns.values():
            conn.close()
    return found
