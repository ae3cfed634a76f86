"""What a peer's failure is called: the errors a link raises, and the words for why a link dropped."""

from __future__ import annotations

import ipaddress

from nanoswarm.keys.contact import split_contact
from nanoswarm.protocol.errors import shown


class PeerError(Exception):
    """A peer answered with an error, answered nonsense, or did not answer."""

    def __init__(self, address: str, code: str, message: str):
        code, message = shown(code, 64), shown(message)  # a peer's words, for a terminal (a review)
        super().__init__(f"{address}: {code}: {message}")
        self.address, self.code, self.message = address, code, message


def why_dropped(contact: str) -> str:
    """What a node that closed the connection during our handshake (`disconnected` before any
    answer) most likely meant, for the user's error line."""
    if split_contact(contact)[1] is None:
        return " (the contact has no #KEY: give the whole contact the node printed)"
    return (" (a private swarm that does not allow this client's key? --key-file, in Python "
            "SwarmOptions(client_keys=...); or the node's key changed since this contact was taken)")


def unreachable_why(endpoint: str) -> str:
    """Why a connect to `endpoint` is retried before it ever connected: ZeroMQ says the same for a
    refused connect and for a host name that does not resolve."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"connection refused, or no address for the host name {host[:80]!r}"
    return "connection refused: nothing listens there"


class PeerTimeout(PeerError):
    """A peer did not answer (or take a request) in time."""

    def __init__(self, address: str, seconds: float, what: str = "no answer"):
        secs = f"{seconds:.1f}" if seconds >= 0.1 else f"{seconds:.2g}"  # not "0.0s" for a tiny --timeout
        super().__init__(address, "timeout", f"{what} within {secs}s")
