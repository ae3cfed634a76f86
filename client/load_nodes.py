"""The nodes after a load run (client/load.py): each one's blocks, whether it still answers, its
peak memory (device memory on a GPU node, VmHWM for the nodes the run started, else what its
`info` claims) and its error counts, every figure a peer's claim checked before use."""

from __future__ import annotations

import logging

import torch

from nanoswarm.node.placement import block_bytes
from nanoswarm.protocol.errors import ProtocolError, shown
from nanoswarm.shards.model import ModelConfig

from .load_report import NodeReport
from .peer_errors import PeerError
from .peer_table import claimed_span
from .swarm import Swarm, SwarmOptions

log = logging.getLogger(__name__)


def node_reports(options: SwarmOptions, timeout: float, meta: tuple[str, int, int], before: dict[str, dict],
                 pids: dict[str, int], config: ModelConfig) -> list[NodeReport]:
    """Each node's state after the load, from its `info` (`before`: the one before the load; `pids`:
    the nodes this run started); a node that no longer answers keeps what it served before (its
    blocks and weights) and is reported gone (a leave and a crash look the same)."""
    reports = []
    probe = Swarm(*meta, options)
    try:
        for address, earlier in before.items():
            try:
                info, alive = probe.connection(address).request("info", timeout=min(timeout, 10.0)).fields, True
            except PeerError as e:
                log.warning("node %s did not answer info after the load: %s", address, e)
                info, alive = {}, False
            now = info or earlier  # a gone node: what it served before the load
            try:  # a node may have moved to other blocks meanwhile (placement)
                layers, heads = claimed_span(now, config.n_layer, config.n_head)
            except ProtocolError as e:  # its figures are a peer's claims: none used unchecked (a review)
                log.warning("node %s answered a malformed info after the load: %s", address, e.message)
                info, now = {}, earlier
                layers, heads = earlier["layers"], earlier.get("heads")  # checked before the load
            dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(now.get("dtype")), torch.float32)
            weights = (layers[1] - layers[0]) * block_bytes(config, dtype)
            if heads:  # a head shard holds its heads' columns and rows of every matrix
                weights = weights * (heads[1] - heads[0]) // config.n_head
            peak, source = _whole(info.get("peak_rss_bytes")), "info"
            pid = pids.get(address)
            if str(earlier.get("device", "")).startswith("cuda"):  # weights and caches are on the GPU
                peak, source = _whole(info.get("device_peak_bytes")), "device"
            elif pid is not None:
                peak, source = _vm_hwm(pid) or peak, "VmHWM"
            reports.append(NodeReport(address, list(layers), list(heads) if heads else None, alive, peak, source,
                                      weights, _whole(info.get("kv_budget", earlier.get("kv_budget"))),
                                      _error_counts(info.get("errors"))))
    finally:
        probe.close()
    return reports


def _whole(claim: object) -> int | None:
    """A byte count or a count from a node's `info`: a whole number >= 0, else unknown (None).
    A NaN peak passed the memory check and made `--json` print NaN; a string stopped the report
    (a review)."""
    ok = isinstance(claim, int) and not isinstance(claim, bool) and 0 <= claim < 2**63
    return claim if ok else None  # type: ignore[return-value]


def _error_counts(claim: object) -> dict[str, int]:
    """A node's error counts from its `info` (code -> count), what makes sense of them."""
    if not isinstance(claim, dict):
        return {}
    return {shown(str(code), 64): n for code, n in list(claim.items())[:64] if _whole(n) is not None}


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
