"""Start a node: load the served shard, measure it, bind, serve until told to stop."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # not on Windows: there two nodes sharing a key file are not caught
    fcntl = None  # type: ignore[assignment]
from pathlib import Path

import msgpack
import torch
import zmq

from nanoswarm import descriptors
from nanoswarm.keys.contact import format_contact
from nanoswarm.keys.identity import (
    Identity,
    curve_key_hex,
    default_key_path,
    load_or_create_identity,
)
from nanoswarm.protocol.messages import MAX_HEADER_BYTES
from nanoswarm.shards.device import check_dtype, resolve_device
from nanoswarm.shards.manifest import Manifest, read_manifest
from nanoswarm.shards.weights import load_blocks

from .affinity import float_io_threads
from .cluster import HARNESS_ENV
from .gossip import Gossip, GossipOptions
from .handler import RequestHandler
from .options import NodeOptions, advertised_address, check_contacts, check_span, read_allow_lists
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
from .threads import ThreadGovernor

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = MAX_HEADER_BYTES - 8 * 1024  # the rest of an `info` reply is ~1-2 KB


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
    handler.manifest = shareable_manifest(manifest)
    tps = handler.measure_throughput()
    log.info("loaded blocks %d:%d%s of %s on %s/%s: %.1f tokens/s", start, stop,
             f" heads {opts.heads[0]}:{opts.heads[1]}" if opts.heads else "", manifest.model_id[:12],
             opts.device, opts.dtype, tps)
    return handler


def shareable_manifest(manifest: Manifest) -> dict | None:
    """The manifest as `info` sends it, or None for one that would not fit an `info` reply's
    header (MAX_HEADER_BYTES, with room for the rest of the reply): over ~380 files of ~150
    bytes, e.g. 96 blocks cut one a file with 3 head splits each."""
    d = manifest.to_dict()
    return d if len(msgpack.packb(d)) <= MAX_MANIFEST_BYTES else None


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


def _warn_unanswered(asked: dict[str, str | None], identity: Identity) -> None:
    """One warning for the bootstrap nodes that did not answer at start-up (`asked`: contact ->
    None if it answered, else why not), each with its reason."""
    why = {contact: reason for contact, reason in asked.items() if reason is not None}
    if not why:
        return
    reasons = "; ".join(f"{contact[:120]}: {reason}" for contact, reason in why.items())
    if any(reason.startswith("disconnected") and "refused this node's key" not in reason
           for reason in why.values()):  # the handshake was closed, and not said why
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


def run_node(opts: NodeOptions, on_ready: Callable[[dict], None] | None = None) -> None:
    """Serve until SIGTERM/Ctrl-C. Once ready and announced, calls `on_ready` with the node's
    `contact` (ADDRESS#CURVEKEY, keys/contact.py: how peers reach it, with the port chosen for a
    listen address ending in `:*`), peer_id, model_id, layers and heads; the CLI prints them
    for the harness."""
    harness = _harness_pid()
    starting = _watch_harness_while_starting(harness) if harness is not None else threading.Event()
    float_io_threads(zmq.Context.instance())  # before any socket of ours
    descriptors.raise_limit()  # (the command line did already; run_node may be called from Python)
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
    governor = ThreadGovernor(torch.get_num_threads(), name=f"node {opts.peer_id[:16]}")
    if os.environ.get("NANOSWARM_ADAPT_THREADS", "1") != "0" and governor.enabled \
            and resolve_device(opts.device).type == "cpu":
        server.after_batch.append(governor.check)
        server.each_second.append(governor.check)  # (idle: back to its own threads)
        handler.extra_info["threads"] = governor.state
    address = advertised_address(opts.advertise, server.address)
    gossip = Gossip(identity, handler, address, gossip_options, opts.insecure, allow_keys=allow)
    gossip.refresh()  # first: what `learned` holds of our own identity is then checked (_check_overtaken)
    gossip.attach(server)  # before the records learned: a next hop among them gets its relay link
    gossip.offer_all(learned)
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
        # Every tensor the loop makes is for inference: one guard for the node's life instead of
        # entering it for every step with the caches cold (node/steps.py `inference`; 4-stage
        # decode ~0.7 ms a token faster here, docs/performance.md). Blocks loaded on a move are
        # inference tensors too (never trained here, nor touched by another thread).
        with torch.inference_mode():
            server.serve_forever()
    finally:
        gossip.close()
        governor.restore()  # (a program that ran the node goes on with its own threads)
    if server.failure is not None:
        raise RuntimeError(server.failure)
    log.info("node stopped")
