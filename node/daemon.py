"""Start a node: load the served shard, measure it, bind, serve until told to stop."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoswarm.shards.manifest import load_blocks, read_manifest

from .handler import RequestHandler
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
    peer_id: str | None = None


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for, but torch sees no CUDA device")
    return torch.device(device)


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


def run_node(opts: NodeOptions) -> None:
    """Serve until SIGTERM/Ctrl-C. Prints `listening ADDRESS` on stdout once ready (the harness
    reads it to learn the port when the listen address ends in `:*`)."""
    handler = build_handler(opts)
    server = NodeServer(handler, opts.listen)
    server.install_signal_handlers()
    handler.extra_info["address"] = server.address
    print(f"listening {server.address}", flush=True)
    sys.stdout.flush()
    server.serve_forever()
    log.info("node stopped")
