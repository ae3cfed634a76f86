"""What a peer's failure is called: the errors a link raises, and the words for why a link dropped."""

from __future__ import annotations

import ipaddress

import zmq

from nanoswarm import descriptors
from nanoswarm.keys.contact import host_and_port
from nanoswarm.protocol.errors import shown

# Answers to `open`, or to the replay into a new stage or a reopened one, that say a peer cannot
# take this session now (at its session count or KV budget, or a session longer than it takes),
# not that it failed. (`leaving` is not one: that peer is going, and is banned like one that went.)
CANNOT_TAKE = ("busy", "too_large")


class PeerError(Exception):
    """A peer answered with an error, answered nonsense, or did not answer."""

    def __init__(self, address: str, code: str, message: str):
        code, message = shown(code, 64), shown(message)  # a peer's words, for a terminal (a review)
        super().__init__(f"{address}: {code}: {message}")
        self.address, self.code, self.message = address, code, message


# What libzmq's monitor says of a handshake that failed (client/link_drops.py reads it): a refusal
# of our key by the node's ZAP handler (node/zap.py, status 400), a ZMTP error (a peer that does
# not speak CURVE with us: a mechanism mismatch), or neither (closed or timed out midway).
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_why(failure: int | None, status: int, keyed: bool, heartbeat: float | None,
                  node: bool = False) -> str:
    """Why a connection closed before its handshake finished, for the user's error line: from the
    monitor's `failure` event and its value (`status`), whether the contact named the peer's key
    (`keyed`: CURVE) and how long the handshake may take (`heartbeat`; None: libzmq's default).
    A refused key is always told apart (the node says so before it closes); a mechanism mismatch
    only when the node's greeting is read before its close. `node`: the link is a node's own (its
    gossip), whose key and whose fix are not a client's."""
    if failure == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if node and status == 400:
            return ("the node refused this node's key (a private swarm whose allow list does not hold it: every "
                    "node's --allow-keys file must list every node's key; `nanoswarm keys show KEY_FILE` prints one)")
        if status == 400:
            return ("the node refused this client's key (a private swarm whose allow list does not hold it: "
                    "--key-file picks the key, in Python SwarmOptions(client_keys=...))")
        return f"the node could not check this {'node' if node else 'client'}'s key (ZAP status {status})"
    if failure == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if not keyed:
            return ("the handshake failed: the peer encrypts its links and the contact has no #KEY: "
                    "give the whole contact the node printed")
        return ("the handshake failed: the peer does not take encrypted links (a node started with --insecure? "
                "give its contact without #KEY), or is not a nanoswarm node")
    # Neither: a node whose key is not the contact's closes the connection without a word, and
    # one that finds the other side's mechanism not its own may close before its greeting is read.
    waited = "" if heartbeat is None else f" within {heartbeat:g}s"
    if keyed:
        hint = ("the node's key may have changed since this contact was taken, something else listens there now, "
                "or the node takes no more connections")
    else:
        hint = "the contact has no #KEY: give the whole contact the node printed, if it encrypts its links"
    return f"connection closed during the handshake: refused by the peer, or no answer{waited} ({hint})"


def unreachable_why(endpoint: str, timed_out: float | None = None) -> str:
    """Why a connect to `endpoint` is retried before it ever connected: ZeroMQ says the same for a
    refused connect and for a host name that does not resolve; `timed_out`: the seconds of a
    connect that nothing answered."""
    if timed_out is not None:
        return (f"no answer to the connect within {timed_out:g}s: the address drops packets "
                "(a firewall, a wrong --advertise, or a machine that left the network)")
    host = host_and_port(endpoint)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return (f"connection refused, or no IPv4 address for the host name {host[:80]!r} (a name is "
                "reached at its IPv4 address: for IPv6 give the address in brackets, tcp://[ADDRESS]:PORT)")
    # (ZeroMQ retries a connect with no route to its address the same way: a review saw this
    # line for an --advertise no route led to; and a connect this process had no descriptor for,
    # review141)
    short = descriptors.shortage()
    if short is not None:
        return f"no connection: {short} (or nothing listens there)"
    return "connection refused: nothing listens there (or no route to the address)"


class LinkDropped(PeerError):
    """The link's connection dropped (its socket monitor said so), or never came up. A link
    reports it once: a reader that is not the sessions' own puts it back (PeerConnection.put_back).
    `harmless`: it lost nothing (no session open over the link, no reply awaited)."""

    def __init__(self, address: str, code: str, message: str, harmless: bool = False):
        super().__init__(address, code, message)
        self.harmless = harmless


class LinkClosed(PeerError):
    """Our own link to the peer was closed here, its peer banned or forgotten (perhaps by another
    session of the same swarm): the stage on it fails over, with no strike of its own (the fault
    that closed it was struck then; review113: after a lifted ban, a stale link's error banned the
    peer again and closed the lifting session's new link)."""

    def __init__(self, address: str):
        super().__init__(address, "disconnected", "the connection was closed (its peer was banned)")


class PeerTimeout(PeerError):
    """A peer did not answer (or take a request) in time."""

    def __init__(self, address: str, seconds: float, what: str = "no answer"):
        secs = f"{seconds:.1f}" if seconds >= 0.1 else f"{seconds:.2g}"  # not "0.0s" for a tiny --timeout
        super().__init__(address, "timeout", f"{what} within {secs}s")
