"""Start a node: load the served shard, measure it, bind, serve until told to stop."""

from __future__ import annotations

import dataclasses
import errno
import functools
import gc
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # not on Windows: there two nodes sharing a key file are not caught
    fcntl = None  # type: ignore[assignment]
try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from nanoswarm.keys.allowed import read_allowed_keys
from nanoswarm.keys.contact import endpoint_of, format_contact, split_contact
from nanoswarm.keys.identity import (
    Identity,
    curve_key_hex,
    default_key_path,
    load_or_create_identity,
)
from nanoswarm.keys.records import check_endpoint
from nanoswarm.shards.device import check_dtype, resolve_device
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks

from .affinity import float_io_threads
from .cluster import HARNESS_ENV
from .gossip import Gossip, GossipOptions
from .handler import RequestHandler
from .placement import (
    MAX_COVER,
    Rebalancer,
    block_bytes,
    blocks_for_budget,
    choose_start,
    coverage,
    default_memory_budget,
)
from .server import NodeServer
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
    """--layers and --heads within the model (its manifest), before anything is made or read."""
    config = read_manifest(opts.model_dir).config
    if opts.layers is not None and not 0 <= opts.layers[0] < opts.layers[1] <= config.n_layer:
        raise ValueError(f"block range {opts.layers[0]}:{opts.layers[1]} is outside 0:{config.n_layer}")
    if opts.heads is not None and not 0 <= opts.heads[0] < opts.heads[1] <= config.n_head:
        raise ValueError(f"head range {opts.heads[0]}:{opts.heads[1]} is outside 0:{config.n_head}")


def build_handler(opts: NodeOptions) -> RequestHandler:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    manifest = read_manifest(opts.model_dir)
    start, stop = opts.layers or (0, manifest.config.n_layer)
    dtype = getattr(torch, opts.dtype)
    blocks = load_blocks(opts.model_dir, start, stop, heads=opts.heads, manifest=manifest,
                         device=resolve_device(opts.device), dtype=dtype)
    peer_id = opts.peer_id or f"anon-{os.getpid()}"
    handler = RequestHandler(blocks, manifest.model_id, peer_id, opts.limits)
    tps = handler.measure_throughput()
    log.info("loaded blocks %d:%d%s of %s on %s/%s: %.1f tokens/s", start, stop,
             f" heads {opts.heads[0]}:{opts.heads[1]}" if opts.heads else "", manifest.model_id[:12],
             opts.device, opts.dtype, tps)
    return handler


def _choose_layers(opts: NodeOptions, identity: Identity) -> tuple[tuple[int, int], int, list]:
    """Blocks for a node started without --layers: (range, number of blocks, wires learned)."""
    manifest = read_manifest(opts.model_dir)
    config = manifest.config
    if opts.num_blocks is not None:
        n_blocks = max(1, min(opts.num_blocks, config.n_layer))
    else:
        budget = (opts.memory_budget_mb * 2**20 if opts.memory_budget_mb is not None
                  else default_memory_budget(resolve_device(opts.device), opts.limits.kv_budget_bytes))
        n_blocks = blocks_for_budget(config, budget, getattr(torch, opts.dtype))
        if budget < block_bytes(config, getattr(torch, opts.dtype)):
            log.warning("a memory budget of %d MiB holds no whole block; serving one anyway", budget >> 20)
    if n_blocks >= config.n_layer:
        return (0, config.n_layer), config.n_layer, []
    from nanoswarm.client.discovery import fetch_table

    # This model's records, all pages: without the id a bootstrap answers with the sample it
    # gossips (at most 128 records of every model), which junk or other models can crowd out.
    fetched = fetch_table(opts.bootstrap, timeout=5.0, client_keys=(identity.curve_public, identity.curve_secret),
                          model_id=manifest.model_id) if opts.bootstrap else None
    records = fetched.table.records(manifest.model_id) if fetched else []
    others = [r for r in records if r.peer_id != identity.peer_id]
    guess = min(sum(r.throughput for r in others) / len(others), MAX_COVER) if others else 1.0
    start = choose_start(coverage(others, config.n_layer, config.n_head), n_blocks, guess)
    log.info("chose blocks %d:%d (%d blocks; %d peers of this model known)", start, start + n_blocks,
             n_blocks, len(others))
    return (start, start + n_blocks), n_blocks, fetched.table.wires() if fetched else []


WILDCARDS = ("*", "0.0.0.0", "[::]", "[::0]")
_ADVERTISE = re.compile(r"tcp://(\[[^\]]*\]|[^:\[\]]+)(?::([0-9]+|\*))?")


def advertised_address(advertise: str | None, bound: str) -> str:
    """The endpoint our record and contact name: `bound` (where the socket listens), or
    --advertise's host with its port, or the bound port where it gives none (or `*`)."""
    if advertise is None:
        return bound
    m = _ADVERTISE.fullmatch(advertise)
    if m is None or m.group(1) in WILDCARDS:
        raise ValueError(f"{advertise!r} must look like tcp://HOST or tcp://HOST:PORT, HOST not a wildcard")
    port = m.group(2) if m.group(2) not in (None, "*") else bound.rpartition(":")[2]
    return check_endpoint(f"tcp://{m.group(1)}:{port}")


def check_contacts(opts: NodeOptions) -> None:
    """Refuse, before anything loads, addresses no peer could use: ours is advertised in our
    record (so a wildcard host or a port ZeroMQ would wrap is no use to anyone), and a bootstrap
    ZeroMQ cannot connect to would be retried every gossip round for as long as we run."""
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
    if host in WILDCARDS:
        host = "127.0.0.1"  # to check the port alone
    if port not in ("*", "0"):  # both let the system choose a free port
        try:
            check_endpoint(f"tcp://{host}:{port}")
        except ValueError as e:
            raise ValueError(f"--listen: {e}") from None
    _check_port_free(host, 0 if port in ("*", "0") else int(port))
    for contact in opts.bootstrap:
        try:
            check_endpoint(endpoint_of(contact))
            key = split_contact(contact)[1]
        except ValueError as e:
            raise ValueError(f"--bootstrap: {e}") from None
        if key is None and not opts.insecure:  # a node started --insecure prints no key
            log.warning("--bootstrap %s has no key: gossip with it is not encrypted (a node that "
                        "runs with encryption prints its contact as tcp://HOST:PORT#KEY)", contact)


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
    except socket.gaierror as e:
        raise ValueError(f"--listen: host {host!r} does not resolve ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--listen tcp://{host}:{port}: the port is in use by another process") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"--listen: {host} is not an address of this machine (give one of its own "
                             "addresses, and --advertise the one peers reach it at)") from None


def _harness_pid() -> int | None:
    """The process that started this node, when the local harness did (node/cluster.py)."""
    harness = os.environ.get(HARNESS_ENV, "")
    return int(harness) if harness.isdigit() else None


def _watch_harness_while_starting(harness_pid: int) -> threading.Event:
    """Until the returned event is set (the server's timer takes over, _leave_without_harness):
    a node whose harness is gone stops starting. A harness interrupted while the launcher forked
    a node had stopped its other nodes and removed their key files, and that node loaded, bound
    a port and served until it first looked (a review). SIGTERM is how the CLI stops a start-up."""
    if os.getppid() != harness_pid:
        raise RuntimeError(f"the local harness (pid {harness_pid}) that started this node is gone")
    serving = threading.Event()

    def watch() -> None:
        while not serving.wait(0.25):
            if os.getppid() != harness_pid:
                log.warning("the local harness (pid %d) is gone: not starting", harness_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="nanoswarm-harness-watch", daemon=True).start()
    return serving


def _leave_without_harness(server: NodeServer, harness_pid: int) -> None:
    if os.getppid() != harness_pid and not server.leaving:
        log.warning("the local harness (pid %d) is gone: leaving", harness_pid)
        server.leave()


def raise_fd_limit() -> None:
    """Take the hard limit on open files as the soft one: every connection is a descriptor, and at
    the common soft limit of 1024 a thousand idle TCP connections (no handshake needed) left
    libzmq retrying a failed accept at full speed and new clients unanswered (docs/reliability.md)."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    # An infinite hard limit is not a soft one every kernel takes (macOS caps it near 10,240).
    for want in ([hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16, 10240]):
        if want <= soft:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return
        except (ValueError, OSError) as e:
            log.debug("open-file limit %d refused: %s", want, e)


def _warn_unanswered(asked: dict[str, str | None], identity: Identity) -> None:
    """One warning for the bootstrap nodes that did not answer at start-up (`asked`: contact ->
    None if it answered, else why not), each with its reason."""
    why = {contact: reason for contact, reason in asked.items() if reason is not None}
    if not why:
        return
    reasons = "; ".join(f"{contact[:120]}: {reason}" for contact, reason in why.items())
    if any(reason.startswith("disconnected") for reason in why.values()):  # the handshake was closed
        reasons += (f"; a node that closes the handshake may be of a private swarm whose --allow-keys lacks "
                    f"this node's key {curve_key_hex(identity.curve_public)}")
    if len(why) < len(asked):
        log.warning("%d of %d bootstrap nodes did not answer (%s)", len(why), len(asked), reasons)
    else:
        log.warning("no bootstrap node answered (%s); serving anyway and retrying in the background", reasons)


def hold_key_file(path: Path, identity: Identity) -> int | None:
    """Lock the key file for this node's lifetime (the lock goes with the process, however it
    ends). Two nodes with one identity would be one peer id at two endpoints: each one's record
    replaces the other's in every table, so the swarm would see one of them at a time."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"key file {path} (peer id {identity.peer_id}) is in use by another node "
                         "on this machine: give each node its own --key-file") from None
    except OSError as e:  # a file system without locks (NFS without lockd, some FUSE): serve anyway
        os.close(fd)
        log.warning("cannot lock key file %s (%s): two nodes started with it would not be caught", path, e)
        return None
    return fd


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


def run_node(opts: NodeOptions, on_ready: Callable[[dict], None] | None = None) -> None:
    """Serve until SIGTERM/Ctrl-C. Once ready and announced, calls `on_ready` with the node's
    `contact` (ADDRESS#CURVEKEY, keys/contact.py: how peers reach it, with the port chosen for a
    listen address ending in `:*`), peer_id, model_id, layers and heads; the CLI prints them
    for the harness."""
    harness = _harness_pid()
    starting = _watch_harness_while_starting(harness) if harness is not None else threading.Event()
    float_io_threads(zmq.Context.instance())  # before any socket of ours
    raise_fd_limit()
    check_contacts(opts)
    gossip_options = GossipOptions(list(opts.bootstrap), opts.ttl, opts.gossip_interval)
    gossip_options.check()
    # Before a key file is made or a bootstrap asked:
    check_dtype(resolve_device(opts.device), getattr(torch, opts.dtype))
    check_span(opts)
    allow = read_allow_lists(opts.allow_keys, opts.insecure)
    identity = load_or_create_identity(opts.key_file)  # before anything is loaded: a bad key file fails at once
    key_lock = hold_key_file(opts.key_file or default_key_path(), identity)
    try:  # released however we end: a caller in this process may start a node with the file again
        _serve(opts, identity, allow, on_ready, gossip_options, starting)
    finally:
        starting.set()
        if key_lock is not None:
            os.close(key_lock)


def _serve(opts: NodeOptions, identity: Identity, allow: set[bytes] | None,
           on_ready: Callable[[dict], None] | None, gossip_options: GossipOptions,
           starting: threading.Event) -> None:
    """run_node once the node's identity is settled: load, announce, serve until told to stop
    (`starting` is set once the server watches the harness, if any)."""
    if allow is not None and identity.curve_public not in allow:
        log.warning("this node's own key (%s) is not on its --allow-keys list: nodes that share that list "
                    "will refuse it", curve_key_hex(identity.curve_public))
    auto = opts.layers is None and opts.heads is None
    if not auto and (opts.num_blocks is not None or opts.memory_budget_mb is not None):
        log.warning("--num-blocks and --memory-budget-mb choose blocks for a node without --layers/--heads; "
                    "ignored")
    learned: list = []
    n_blocks = 0
    if auto:
        layers, n_blocks, learned = _choose_layers(opts, identity)
        opts = dataclasses.replace(opts, layers=layers)
    opts = dataclasses.replace(opts, peer_id=opts.peer_id or identity.peer_id)
    handler = build_handler(opts)
    secret, public = (None, None) if opts.insecure else (identity.curve_secret, identity.curve_public)
    server = NodeServer(handler, opts.listen, curve_secret=secret, curve_public=public, allow_keys=allow)
    address = advertised_address(opts.advertise, server.address)
    gossip = Gossip(identity, handler, address, gossip_options, opts.insecure, allow_keys=allow)
    gossip.refresh()  # first: what `learned` holds of our own identity is then checked (_check_overtaken)
    gossip.offer_all(learned)
    gossip.attach(server)
    if auto and n_blocks < handler.config.n_layer:
        manifest = read_manifest(opts.model_dir)
        rebalancer = Rebalancer(handler, gossip, n_blocks, lambda a, b: load_blocks(
            opts.model_dir, a, b, manifest=manifest, device=resolve_device(opts.device),
            dtype=getattr(torch, opts.dtype)), opts.rebalance_interval, settle=3 * opts.gossip_interval)
        server.add_timer(min(opts.gossip_interval, opts.rebalance_interval) / 4, rebalancer.check)
    if opts.bootstrap:
        _warn_unanswered(gossip.exchange_now(opts.bootstrap), identity)
    contact = format_contact(address, public)
    handler.extra_info.update(address=address, contact=contact, insecure=opts.insecure,
                              curve_key=None if public is None else public.decode("ascii"))
    server.install_signal_handlers()
    harness = _harness_pid()
    if harness is not None:  # started by LocalCluster: leave with it, however it ended (SIGKILL too)
        server.add_timer(0.5, functools.partial(_leave_without_harness, server, harness))
    starting.set()
    info = handler.info()
    log.info("listening %s", contact)
    if on_ready is not None:
        on_ready({"contact": contact, "peer_id": info["peer_id"], "model_id": info["model_id"],
                  "layers": info["layers"], "heads": info["heads"]})
    # What start-up made (torch, the blocks: ~170,000 objects) lives as long as the node: out of
    # the collector's reach, so its full passes do not walk it again whenever a request makes
    # many objects (a 64 KiB header of empty arrays cost ~70 ms of collection, ~4 ms after this).
    gc.freeze()
    try:
        server.serve_forever()
    finally:
        gossip.close()
    if server.failure is not None:
        raise RuntimeError(server.failure)
    log.info("node stopped")
