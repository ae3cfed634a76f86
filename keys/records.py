"""Signed node announcements ("records") and their strict verification.

Wire form (msgpack-serializable)::

    {"body": <canonical msgpack map of the record fields>, "sig": <64-byte Ed25519 signature of body>}

The signature covers the exact body bytes, so a record can be relayed by any peer unchanged and
checked by every receiver.  Bodies must be canonical (exactly what `encode_record` produces), which
gives each record a single byte form: no two different wires carry the same signed content.

Lifetime rules
--------------
* A live record is accepted while ``now < expires <= now + max_ttl``; ``expires <= now`` is
  "expired", ``expires > now + max_ttl`` is "too_far_future" (a long-lived record could be
  replayed long after the node changed).
* A departure is a record with ``departing=True``, a higher ``seq`` than the node's last record
  and ``expires`` set to the moment it left.  It is meant to be already "expired", so it is
  checked against a different window: accepted while ``now - max_ttl < expires <= now + max_ttl``.
  Signature and peer id are checked exactly as for live records; what a departure does to the
  swarm table (remove the peer if its seq is newer) is the table's business.
* ``seq`` must grow with every record a node signs, across restarts too; `seq_now` (microseconds
  of wall time) is a good source.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .contact import format_contact
from .identity import SIGN_PUBLIC_LEN, Identity, is_z85_key, peer_id_for

RECORD_VERSION = 1
DEFAULT_TTL = 60.0  # a node's default (--ttl, GossipOptions.ttl)
DEFAULT_MAX_TTL = 300.0
SIG_LEN = 64
MAX_BODY_BYTES = 4096
MAX_ADDRESS_LEN = 256
MAX_MODEL_ID_LEN = 128
MAX_PEER_ID_LEN = 64
MAX_LAYER = 1 << 16
MAX_HEAD = 1 << 16
MAX_SEQ = (1 << 63) - 1

# Stable rejection reasons; counters and logs key on these strings.
MALFORMED = "malformed"
BAD_SIGNATURE = "bad_signature"
PEER_ID_MISMATCH = "peer_id_mismatch"
EXPIRED = "expired"
TOO_FAR_FUTURE = "too_far_future"
REASONS = (MALFORMED, BAD_SIGNATURE, PEER_ID_MISMATCH, EXPIRED, TOO_FAR_FUTURE)

# Field order of the canonical body; "v" lets a later format be told apart.
_BODY_KEYS = (
    "v", "peer_id", "sign_key", "curve_key", "address", "model_id", "layers", "heads",
    "throughput", "load", "seq", "expires", "insecure", "departing",
)  # fmt: skip


class RecordRejected(Exception):
    """A record failed verification.  `reason` is one of REASONS; `detail` is for logs only."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Record:
    """A node's announcement: who it is, where it listens, and which blocks it serves."""

    peer_id: str
    sign_key: bytes  # raw Ed25519 public key, 32 bytes
    curve_key: bytes  # z85 CURVE public key, 40 bytes
    address: str  # ZeroMQ endpoint, e.g. "tcp://127.0.0.1:5555"
    model_id: str
    layers: tuple[int, int]  # half-open [start, end)
    heads: tuple[int, int] | None
    throughput: float
    load: float
    seq: int
    expires: float  # unix time
    insecure: bool = False  # node runs without CURVE
    departing: bool = False  # see the module docstring

    def is_expired(self, now: float) -> bool:
        return self.expires <= now


def seq_now() -> int:
    """A sequence number that keeps growing across restarts (wall-clock microseconds)."""
    return time.time_ns() // 1000


def encode_record(record: Record) -> bytes:
    """Canonical msgpack body of a record: fixed key order, tuples as lists, floats as float64."""
    values: dict[str, Any] = {
        "v": RECORD_VERSION,
        "peer_id": record.peer_id,
        "sign_key": record.sign_key,
        "curve_key": record.curve_key,
        "address": record.address,
        "model_id": record.model_id,
        "layers": list(record.layers),
        "heads": None if record.heads is None else list(record.heads),
        "throughput": record.throughput,
        "load": record.load,
        "seq": record.seq,
        "expires": record.expires,
        "insecure": record.insecure,
        "departing": record.departing,
    }
    return msgpack.packb(values, use_bin_type=True)


# ---------------------------------------------------------------------------------------------
# Field validation.  Everything here handles untrusted, msgpack-decoded values.


class _Malformed(ValueError):
    pass


def _is_int(value: object) -> bool:
    # bool is an int subclass; a True where a count belongs is junk, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object, name: str, max_len: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_len or not value.isprintable():
        raise _Malformed(f"{name} must be a printable string of 1..{max_len} characters")
    return value


# What peers connect to: a TCP endpoint, nothing else. Anything ZeroMQ cannot connect to (another
# transport, a `#` that makes the contact string ambiguous, a port of `*`) would fail in every
# node and client that picks the record; ipc:// and inproc:// would point into the receiver's
# own machine or process.
# Hostnames may hold `_` (container and compose service names do), but not begin with it, `-` or
# `.`: ZeroMQ refuses those (EINVAL), and a record naming one had every node of the swarm warn
# that it could not gossip with it, once a round, for as long as the record lived (a review).
_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):([0-9]{1,5})")


def _address(value: object) -> str:
    text = _text(value, "address", MAX_ADDRESS_LEN)
    try:
        return check_endpoint(text)
    except ValueError:
        raise _Malformed("address must be a TCP endpoint tcp://host:port") from None


def check_endpoint(text: str) -> str:
    """`text` if peers can connect to it the way records require (tcp://HOST:PORT, port
    1-65535); ValueError saying so otherwise. For contacts given on the command line."""
    m = _ADDRESS.fullmatch(text)
    if m is None or len(text) > MAX_ADDRESS_LEN:
        if text.startswith("tcp://[") and "%" in text:
            raise ValueError(f"{text[:MAX_ADDRESS_LEN]!r}: {_LINK_LOCAL}")
        raise ValueError(f"{text[:MAX_ADDRESS_LEN]!r} is not a TCP endpoint tcp://HOST:PORT")
    if not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    if m.group(1).startswith("[") and _is_link_local(m.group(1)[1:-1]):
        raise ValueError(f"{text!r}: {_LINK_LOCAL}")
    return text


# A link-local address (fe80::/10) is reached only through a zone naming the connecting
# machine's own interface (fe80::1%eth0), which no record or contact can know (review94).
_LINK_LOCAL = ("a link-local IPv6 address (fe80::/10) is usable only with a zone naming an interface of "
               "the connecting machine: give a global or unique-local (fd00::/8) address")


def _is_link_local(host: str) -> bool:
    try:
        return ipaddress.IPv6Address(host).is_link_local
    except ValueError:
        return False


def _span(value: object, name: str, limit: int) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise _Malformed(f"{name} must be a list of two integers")
    start, end = value
    if not 0 <= start < end <= limit:
        raise _Malformed(f"{name} must satisfy 0 <= start < end <= {limit}")
    return start, end


def _number(value: object, name: str, minimum: float | None = None) -> float:
    # Only float: the canonical encoding is float64, and an int would re-encode differently.
    if not isinstance(value, float) or not math.isfinite(value):
        raise _Malformed(f"{name} must be a finite float")
    if minimum is not None and value < minimum:
        raise _Malformed(f"{name} must be >= {minimum}")
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise _Malformed(f"{name} must be a boolean")
    return value


# Ed25519 points of small order (the identity, and those of order 2, 4 and 8), by their y
# coordinate: a signature by such a "key" verifies for many bodies without any secret (review206:
# an all-zero sign_key and an all-zero sig verified one body in four), so a record may not name one.
_P25519 = 2**255 - 19
_Y_ORDER_8 = 0x5FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826
_SMALL_ORDER_Y = frozenset({0, 1, _P25519 - 1, _Y_ORDER_8, _P25519 - _Y_ORDER_8})


def _small_order(key: bytes) -> bool:
    """Whether a 32-byte Ed25519 public key encodes a point of small order: its y (the sign bit
    of x aside) taken mod p, as a lax decoder would take a non-canonical encoding."""
    return (int.from_bytes(key, "little") & (2**255 - 1)) % _P25519 in _SMALL_ORDER_Y


def _record_from_map(m: dict[Any, Any]) -> Record:
    if m.get("v") != RECORD_VERSION or isinstance(m.get("v"), bool):
        raise _Malformed(f"unsupported record version {m.get('v')!r}")
    sign_key, curve_key, seq = m["sign_key"], m["curve_key"], m["seq"]
    if not isinstance(sign_key, bytes) or len(sign_key) != SIGN_PUBLIC_LEN:
        raise _Malformed("sign_key must be 32 bytes")
    if _small_order(sign_key):
        raise _Malformed("sign_key is a point of small order (anyone can sign for it)")
    if not is_z85_key(curve_key):
        raise _Malformed("curve_key must be a 40-byte z85 key")
    if not _is_int(seq) or not 0 <= seq <= MAX_SEQ:
        raise _Malformed("seq must be a non-negative 63-bit integer")
    return Record(
        peer_id=_text(m["peer_id"], "peer_id", MAX_PEER_ID_LEN),
        sign_key=sign_key,
        curve_key=curve_key,
        address=_address(m["address"]),
        model_id=_text(m["model_id"], "model_id", MAX_MODEL_ID_LEN),
        layers=_span(m["layers"], "layers", MAX_LAYER),
        heads=None if m["heads"] is None else _span(m["heads"], "heads", MAX_HEAD),
        throughput=_number(m["throughput"], "throughput", 0.0),
        load=_number(m["load"], "load", 0.0),
        seq=seq,
        expires=_number(m["expires"], "expires"),
        insecure=_flag(m["insecure"], "insecure"),
        departing=_flag(m["departing"], "departing"),
    )


def _decode_body(body: bytes) -> Record:
    """Parse and validate a body; raises _Malformed for anything but a canonical record."""
    try:
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=True,
            max_str_len=MAX_BODY_BYTES, max_bin_len=MAX_BODY_BYTES, max_array_len=16, max_map_len=32,
        )  # fmt: skip
    except Exception as e:  # msgpack raises many types (ExtraData, ValueError, UnicodeDecodeError, ...)
        raise _Malformed(f"body is not valid msgpack ({e.__class__.__name__})") from None
    if not isinstance(obj, dict) or set(obj) != set(_BODY_KEYS):
        raise _Malformed("body must be a map with exactly the record fields")
    record = _record_from_map(obj)
    if encode_record(record) != body:
        raise _Malformed("body is not in canonical form")
    return record


def _unpack_wire(wire: object) -> tuple[bytes, bytes]:
    if not isinstance(wire, dict) or set(wire) != {"body", "sig"}:
        raise _Malformed("wire record must be a map with exactly 'body' and 'sig'")
    body, sig = wire["body"], wire["sig"]
    if not isinstance(body, bytes) or not 0 < len(body) <= MAX_BODY_BYTES:
        raise _Malformed(f"body must be 1..{MAX_BODY_BYTES} bytes")
    if not isinstance(sig, bytes) or len(sig) != SIG_LEN:
        raise _Malformed("sig must be 64 bytes")
    return body, sig


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class VerifiedRecord:
    """A verified record with the exact signed wire form it arrived in, for relaying unchanged."""

    record: Record
    wire: dict[str, bytes]  # a fresh {"body", "sig"} dict, independent of the caller's


def verify_wire(wire: object, now: float | None = None, max_ttl: float = DEFAULT_MAX_TTL) -> VerifiedRecord:
    """Verify a wire record from the network; returns the Record and a clean copy of the wire.

    Raises RecordRejected(reason) with reason in REASONS, and nothing else, whatever `wire` is.
    Checks run in this order: shape and field types ("malformed"), signature over the body by the
    body's own sign_key ("bad_signature"), peer_id derived from that key ("peer_id_mismatch"),
    then the lifetime window ("expired" / "too_far_future", see the module docstring).
    """
    now = time.time() if now is None else now
    try:
        body, sig = _unpack_wire(wire)
        record = _decode_body(body)
    except _Malformed as e:
        raise RecordRejected(MALFORMED, str(e)) from None
    try:
        Ed25519PublicKey.from_public_bytes(record.sign_key).verify(sig, body)
    except (InvalidSignature, ValueError):
        raise RecordRejected(BAD_SIGNATURE) from None
    if record.peer_id != peer_id_for(record.sign_key):
        raise RecordRejected(PEER_ID_MISMATCH, f"{record.peer_id} is not the id of its sign_key")
    oldest = now - max_ttl if record.departing else now
    if record.expires <= oldest:
        raise RecordRejected(EXPIRED, f"expires {record.expires:.3f} <= {oldest:.3f}")
    if record.expires > now + max_ttl:
        raise RecordRejected(TOO_FAR_FUTURE, f"expires {record.expires - now:.1f}s ahead > {max_ttl}s")
    return VerifiedRecord(record, {"body": body, "sig": sig})


def verify_record(wire: object, now: float | None = None, max_ttl: float = DEFAULT_MAX_TTL) -> Record:
    """Like `verify_wire`, returning only the Record."""
    return verify_wire(wire, now, max_ttl).record


def unverified_record(wire: object) -> Record | None:
    """The record a wire's body holds, its signature and lifetime unchecked (None: not a
    well-formed record): only to tell which records a peer says it holds, never to trust one (a
    client offers a node the records it lacks, client/introduce.py; the node verifies them)."""
    try:
        return _decode_body(_unpack_wire(wire)[0])
    except _Malformed:
        return None


def sign_record(
    identity: Identity,
    *,
    address: str,
    model_id: str,
    layers: tuple[int, int],
    seq: int,
    expires: float | None = None,
    heads: tuple[int, int] | None = None,
    throughput: float = 0.0,
    load: float = 0.0,
    insecure: bool = False,
    departing: bool = False,
) -> dict[str, bytes]:
    """Build and sign this node's record; returns the wire form {"body", "sig"}.

    peer_id, sign_key and curve_key come from `identity`.  `expires` defaults to now + DEFAULT_TTL.
    Raises ValueError if the fields would be rejected as malformed by receivers, so a bad
    announcement fails here rather than silently everywhere else.
    """
    record = Record(
        peer_id=identity.peer_id,
        sign_key=identity.sign_public,
        curve_key=identity.curve_public,
        address=address,
        model_id=model_id,
        layers=tuple(layers),  # type: ignore[arg-type]
        heads=None if heads is None else tuple(heads),  # type: ignore[arg-type]
        throughput=float(throughput),
        load=float(load),
        seq=seq,
        expires=float(time.time() + DEFAULT_TTL if expires is None else expires),
        insecure=insecure,
        departing=departing,
    )
    body = encode_record(record)
    try:
        _decode_body(body)
    except _Malformed as e:
        raise ValueError(f"record would be rejected as malformed: {e}") from None
    return {"body": body, "sig": identity.sign(body)}


def sign_departure(
    identity: Identity, last: Record, *, seq: int | None = None, now: float | None = None
) -> dict[str, bytes]:
    """Sign a departure for `last` (this node's latest record): seq above it, expires = now."""
    return sign_record(
        identity,
        address=last.address,
        model_id=last.model_id,
        layers=last.layers,
        heads=last.heads,
        seq=last.seq + 1 if seq is None else seq,
        expires=time.time() if now is None else now,
        insecure=last.insecure,
        departing=True,
    )


def record_contact(record: Record) -> str:
    """How to reach the node behind a record: endpoint#key, or the bare endpoint if --insecure."""
    return format_contact(record.address, None if record.insecure else record.curve_key)


def record_age(record: Record, now: float | None = None) -> float:
    """Seconds since the record was signed: nodes use wall-clock microseconds as seq (seq_now)."""
    now = time.time() if now is None else now
    return max(0.0, now - record.seq / 1e6)
