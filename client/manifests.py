"""A model's manifest asked of its peers and checked against its id, for those who have not its
files: `nanoswarm peers` without `--model` learns each model's block and head counts from it
(without them it could only guess them from the spans the records name).

The check is what makes a peer's word good: a model's id is the sha256 of its manifest's
canonical content (shards/manifest.py), so a manifest whose hash is the id is the model's, from
whichever peer it came; one that is not, or is not a manifest at all, is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import zmq

from nanoswarm.keys.records import record_contact
from nanoswarm.keys.table import RecordTable
from nanoswarm.shards.manifest import Manifest, ManifestError

from .peer_errors import PeerError
from .round_trips import ask_all
from .transport import PeerConnection

log = logging.getLogger(__name__)

PEERS_ASKED = 2  # a model's peers asked at once (its newest records'), so one gone costs no retry
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
    try:
        for contact in asked:
            try:
                conns[contact] = PeerConnection(contact, timeout, client_keys=client_keys)
            except (ValueError, zmq.ZMQError) as e:  # (records' contacts were checked: rare)
                log.info("%s: cannot ask it for its model's manifest: %s", contact, e)
        replies = ask_all(conns, "info", timeout, fields={c: {"manifest": True} for c in conns})
    finally:
        for conn in conns.values():
            conn.close()
    found: dict[str, Manifest] = {}
    for contact, reply in replies.items():
        model_id = asked[contact]
        if isinstance(reply, PeerError) or model_id in found:
            continue
        manifest = checked_manifest(model_id, reply.fields.get("manifest"))
        if manifest is not None:
            found[model_id] = manifest
        elif reply.fields.get("manifest") is not None:
            log.warning("%s sent a manifest that is not model %s's: not used", contact, model_id[:16])
    return found
