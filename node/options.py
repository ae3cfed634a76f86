"""A node's options, and the checks made on them before anything loads or binds: a block or
head range outside the model, addresses no peer could use, a port another process holds, an
allow list that admits no one (node/daemon.py starts the node from them)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from nanoswarm.keys.allowed import read_allowed_keys
from nanoswarm.keys.contact import endpoint_of, split_contact
from nanoswarm.keys.records import check_endpoint
from nanoswarm.shards.manifest import read_manifest

from .sessions import NodeLimits

log = logging.getLogger(__name__)


@dataclass
class NodeOptions:
    model_dir: Path
    layers: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None
    listen: str = "tcp://127.0.0.1:*"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    limits: NodeLimits = field(default_factory=NodeLimits)
    peer_id: str | None = None           # default: the identity's peer id
    # Identity, gossip and links (docs/discovery.md).
    key_file: Path | None = None         # None: the default key file, created on first use
    bootstrap: list[str] = field(default_factory=list)  # contact strings of known nodes
    allow_keys: tuple[Path, ...] = ()    # private swarm: only the CURVE keys in these files (or one) may connect
    insecure: bool = False               # no CURVE on our socket (tests, trusted networks)
    advertise: str | None = None         # tcp://HOST[:PORT] peers reach us at, when not `listen`
    ttl: float = 60.0                    # lifetime of our signed record
    gossip_interval: float = 1.0
    # Automatic block choice, used when neither layers nor heads are given.
    num_blocks: int | None = None        # default: what the memory budget holds
    memory_budget_mb: int | None = None  # default: placement.default_memory_budget (RAM or GPU)
    rebalance_interval: float = 30.0


def check_span(opts: NodeOptions) -> None:
    """--layers, --heads and --num-blocks within the model (its manifest), before anything is made or read."""
    config = read_manifest(opts.model_dir).config
    if opts.layers is not None and not 0 <= opts.layers[0] < opts.layers[1] <= config.n_layer:
        raise ValueError(f"block range {opts.layers[0]}:{opts.layers[1]} is outside 0:{config.n_layer}")
    if opts.heads is not None and not 0 <= opts.heads[0] < opts.heads[1] <= config.n_head:
        raise ValueError(f"head range {opts.heads[0]}:{opts.heads[1]} is outside 0:{config.n_head}")
    if opts.num_blocks is not None and opts.layers is None and opts.heads is None and opts.num_blocks > config.n_layer:
        # (it served them all, without a word: a walkthrough review, review185)
        raise ValueError(f"--num-blocks {opts.num_blocks}: the model has {config.n_layer} blocks, "
                         f"so from 1 to {config.n_layer}")


WILDCARDS = ("*", "0.0.0.0", "[::]", "[::0]")
_ADVERTISE = re.compile(r"tcp://(\[[^\]]*\]|[^:\[\]]+)(?::([0-9]+|\*))?")


def advertised_address(advertise: str | None, bound: str) -> str:
    """The endpoint our record and contact name: `bound` (where the socket listens), or
    --advertise's host with its port, or the bound port where it gives none (or `*`)."""
    if advertise is None:
        return bound
    m = _ADVERTISE.fullmatch(advertise)
    if m is None or m.group(1) in WILDCARDS:
        why = (": HOST not a wildcard, which no peer can reach" if m is not None
               else " (tcp:// is missing)" if not advertise.startswith("tcp://") else "")  # (review191)
        raise ValueError(f"{advertise!r} must look like tcp://HOST or tcp://HOST:PORT{why}")
    port = m.group(2) if m.group(2) not in (None, "*") else bound.rpartition(":")[2]
    return check_endpoint(f"tcp://{m.group(1)}:{port}")


def check_contacts(opts: NodeOptions, warn: bool = True) -> None:
    """Refuse, before anything loads, addresses no peer could use: ours is advertised in our
    record (so a wildcard host or a port ZeroMQ would wrap is no use to anyone), and a bootstrap
    ZeroMQ cannot connect to would be retried every gossip round for as long as we run. `warn`:
    log a bootstrap without a key (the command line checks early without it: the node's start
    checks again, review115 read the warning twice)."""
    host, _, port = opts.listen.removeprefix("tcp://").rpartition(":")
    if not opts.listen.startswith("tcp://") or not host:  # peers reach nodes by the endpoint in the record
        raise ValueError(f"--listen must be a TCP endpoint (tcp://HOST:PORT or tcp://HOST:*), not {opts.listen!r}")
    if opts.advertise is not None:
        try:
            advertised_address(opts.advertise, "tcp://127.0.0.1:1")  # the port may come from the bind
        except ValueError as e:
            raise ValueError(f"--advertise: {e}") from None
    elif host in WILDCARDS:
        raise ValueError(f"--listen {opts.listen}: peers connect to the address a node advertises; give "
                         "the address they reach this machine at, or --advertise it")
    _check_families(opts.listen, host, opts.advertise)
    if host in WILDCARDS:
        host = "127.0.0.1"  # to check the port alone
    try:  # * and 0 let the system choose a free port: the host is checked with another
        check_endpoint(f"tcp://{host}:{1 if port in ('*', '0') else port}")
    except ValueError as e:
        raise ValueError(f"--listen: {e}") from None
    _check_port_free(host, 0 if port in ("*", "0") else int(port))
    for contact in opts.bootstrap:
        try:
            check_endpoint(endpoint_of(contact))
            key = split_contact(contact)[1]
        except ValueError as e:
            raise ValueError(f"--bootstrap: {e}") from None
        if key is None and not opts.insecure and warn:  # a node started --insecure prints no key
            log.warning("--bootstrap %s has no key: gossip with it is not encrypted (a node that "
                        "runs with encryption prints its contact as tcp://HOST:PORT#KEY)", contact)


def _check_families(listen: str, host: str, advertise: str | None) -> None:
    """Refuse an --advertise of one address family on a --listen that takes only the other: no
    peer could connect (review94: a node on 0.0.0.0 advertising an IPv6 address started without
    a word, and every peer found it refused). `*`, [::] and host names in --advertise pass."""
    m = None if advertise is None else _ADVERTISE.fullmatch(advertise)
    if m is None or host in ("*", "[::]", "[::0]"):
        return
    listens, advertised = _family(host, name=4), _family(m.group(1), name=None)
    if advertised is not None and advertised != listens:
        raise ValueError(f"--advertise {advertise} is an IPv{advertised} address, but --listen {listen} takes "
                         f"IPv{listens} connections only: listen on tcp://[::]:PORT (both) or on an "
                         f"IPv{advertised} address of this machine")


def _family(host: str, name: int | None) -> int | None:
    """6 for a bracketed host, 4 for an IPv4 address, `name` for a host name."""
    if host.startswith("["):
        return 6
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return name  # ZeroMQ binds a name over IPv4 (keys/contact.py allow_ipv6)
    return 4


def _check_port_free(host: str, port: int) -> None:
    """Refuse a --listen address this process could not bind now, before a key file is made or
    blocks load (the bind itself comes after both): a port another process holds, a host name
    that does not resolve, an address not of this machine. (ZeroMQ's own errors for the last
    two came after loading, and read "No such device".)"""
    # ZeroMQ binds a bracketed host over IPv6 (allow_ipv6) and any other over IPv4 only.
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    host = host.strip("[]")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds
            probe.bind((host, port))
    except socket.gaierror as e:  # a name with IPv6 addresses only, too (review94)
        raise ValueError(f"--listen: host {host!r} does not resolve to an IPv4 address ({e.strerror}); "
                         "a host name is bound over IPv4: give an IPv6 address in brackets, "
                         "tcp://[ADDRESS]:PORT") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--listen tcp://{host}:{port}: the port is in use by another process") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"--listen: {host} is not an address of this machine (give one of its own "
                             "addresses, and --advertise the one peers reach it at)") from None
        # anything else ZeroMQ's bind would meet after the blocks had loaded (an invalid address)
        raise ValueError(f"--listen tcp://{host}:{port}: cannot bind it ({e.strerror})") from None


def read_allow_lists(paths: tuple[Path, ...] | str | os.PathLike[str], insecure: bool) -> set[bytes] | None:
    """The keys of every --allow-keys file (None: no list, every key may connect). A list that
    names no key would admit no one: refused, as is a list on a node without encryption."""
    if isinstance(paths, (str, os.PathLike)):  # one file, as NodeOptions took before lists repeated
        paths = (Path(paths),)
    if not paths:
        return None
    if insecure:
        raise ValueError("--allow-keys needs encrypted links; it cannot be combined with --insecure")
    allow = set().union(*(read_allowed_keys(p) for p in paths))
    if not allow:
        raise ValueError(f"--allow-keys {', '.join(map(str, paths))}: no key listed, so no client or peer "
                         "could connect")
    return allow
