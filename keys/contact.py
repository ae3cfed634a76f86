"""Contact addresses: a ZeroMQ endpoint plus the CURVE public key of the node behind it.

    tcp://127.0.0.1:5555#<64 hex digits>     a node with CURVE (the default)
    tcp://127.0.0.1:5555                     a node started with --insecure (no key)

CURVE needs the server's public key before connecting, so an address alone is not enough to
reach a node; the contact string carries both.  The key is printed as hex so the string can be
pasted into a shell unquoted (z85 uses `$`, `&`, `<`, ...); a 40-character z85 key after the
`#` is accepted too.  Nodes print their contact on the `listening` line and `nanoswarm cluster`
prints one per node; `--peers` and `--bootstrap` take them.
"""

from __future__ import annotations

import binascii
import ipaddress
import socket
import time

import zmq
from zmq.utils import z85

from .identity import curve_key_hex, is_z85_key

_HEX_LEN = 64


def split_contact(contact: str) -> tuple[str, bytes | None]:
    """'tcp://h:p#KEY' -> ('tcp://h:p', z85 key bytes); a plain endpoint -> (endpoint, None).

    Raises ValueError for a key part that is neither 64 hex digits nor a 40-character z85 key.
    """
    endpoint, sep, key = contact.strip().partition("#")
    if not sep:
        return endpoint, None
    if len(key) == _HEX_LEN:
        try:
            raw = binascii.unhexlify(key)
        except ValueError:  # binascii.Error, or a character not ASCII (a look-alike letter pasted)
            raise ValueError(f"contact {contact!r}: the key after '#' is not valid hex") from None
        return endpoint, z85.encode(raw)
    # A look-alike letter pasted is no key (review228: "replace" made it "?", a z85 character).
    z = key.encode("ascii") if key.isascii() else b""
    if is_z85_key(z):
        return endpoint, z
    raise ValueError(f"contact {contact!r}: expected a CURVE key after '#' (64 hex digits or 40 z85 characters)")


def format_contact(endpoint: str, curve_key: bytes | None) -> str:
    """The printable contact of a node: endpoint#hexkey, or the bare endpoint without a key."""
    if curve_key is None:
        return endpoint
    return f"{endpoint}#{curve_key_hex(curve_key)}"


def endpoint_of(contact: str) -> str:
    """The ZeroMQ endpoint part of a contact string (no validation of the key)."""
    return contact.strip().partition("#")[0]


def same_endpoint(given: str, other: str) -> bool:
    """Whether endpoint `other` (tcp://IP:PORT, from a peer) is endpoint `given` (tcp://HOST:PORT,
    from the user) in another form: the same port, and an IP that `given`'s host resolves to
    (`localhost` for 127.0.0.1, a host name for its IP). A host name in `other` is never looked
    up: a peer's words must not make this machine ask DNS for names it chose."""
    (host, port), (other_host, other_port) = host_and_port(given), host_and_port(other)
    try:
        ip = ipaddress.ip_address(other_host)
    except ValueError:
        return False
    return port == other_port and ip in _addresses_of(host)


def host_and_port(endpoint: str) -> tuple[str, str]:
    """'tcp://[::1]:5555' -> ('::1', '5555'): the host without an IPv6 address's brackets."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host.removeprefix("[").removesuffix("]"), port


# A host's lookup is used for this long: a name that moved to another IP, or that did not resolve
# while DNS was down, was held for the process's life. A failed lookup keeps the last answer and is
# made again LOOKUP_FAILED_SECONDS on, doubled at each failure up to LOOKUP_SECONDS: it runs on
# the caller's thread, which a DNS that does not answer holds for its timeout (review121).
LOOKUP_SECONDS = 300.0
LOOKUP_FAILED_SECONDS = 30.0
LOOKUPS_KEPT = 64
_lookups: dict[str, tuple[float, frozenset, int]] = {}  # host -> (when looked up again, its IPs, failures in a row)


def _addresses_of(host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IPs `host` resolves to (none if it never did), for hosts the user gave, looked up
    again as above; at most LOOKUPS_KEPT hosts kept, the oldest given way."""
    now = time.monotonic()
    known = _lookups.get(host)
    if known is not None and now < known[0]:
        return known[1]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        ips = frozenset(ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos)
    except (OSError, UnicodeError, ValueError):
        ips = frozenset()
    failures = 0 if ips else (known[2] + 1 if known is not None else 1)
    if not ips and known is not None:
        ips = known[1]  # DNS down: the last answer holds (review119: every hop named so went star)
    wait = min(LOOKUP_FAILED_SECONDS * 2 ** (failures - 1), LOOKUP_SECONDS) if failures else LOOKUP_SECONDS
    _lookups.pop(host, None)  # (re)inserted last: the oldest is first
    if len(_lookups) >= LOOKUPS_KEPT:
        del _lookups[next(iter(_lookups))]
    _lookups[host] = (now + wait, ips, failures)
    return ips


def allow_ipv6(sock: zmq.Socket, endpoint: str) -> None:
    """Let `sock` bind or connect to `endpoint` if its host is an IPv6 address (tcp://[::1]:5555),
    and bind on both IPv4 and IPv6 for the wildcard `*`: ZeroMQ sockets take IPv4 only unless
    told otherwise. A host name stays IPv4 (review94): with IPv6 on, ZeroMQ takes only a name's
    IPv6 addresses where it has any, with no fallback, so a name with both would stop reaching
    nodes that listen on IPv4 (`localhost` is ::1 on some systems). Call it before bind/connect."""
    if endpoint.strip().startswith(("tcp://[", "tcp://*:")):
        sock.setsockopt(zmq.IPV6, 1)
