"""Route building: choose stages that cover blocks [start, stop) in order.

Cost of a route, compared in this order: round trips per token (a layer stage is one; a head
group is two per block, its members answering in parallel), then the time a token is expected
to take (each stage's measured round trips plus its compute, from the throughput its peers
measured: a GPU peer beats a CPU peer serving the same blocks), compared in steps of
TIME_STEP so that peers that measured about the same tie, then the fewest stages (each holds a
session on its peers), then the lowest load (which spreads sessions over peers that tie).
Shortest path over block boundaries; the swarm is small enough (blocks x peers) that a plain
dynamic program is instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Expected token times compare equal within a factor of about this much: measured throughputs
# and round trips of like peers differ by a few percent from run to run, and within that noise
# the lower load should decide, not the last digit of a measurement.
TIME_STEP = 1.25


@dataclass
class PeerInfo:
    """What the client knows of one peer: from its `info` reply or its signed record."""

    address: str
    peer_id: str
    model_id: str
    layers: tuple[int, int]
    heads: tuple[int, int] | None = None
    throughput: float = 0.0
    load: float = 0.0
    rtt: float = 0.0                 # seconds, measured by the client; 0 when unknown
    curve_key: bytes | None = None   # CURVE public key from the signed record
    extra: dict = field(default_factory=dict)


@dataclass
class StagePlan:
    start: int
    stop: int
    peers: list[PeerInfo]            # one for a layer stage, several for a head group
    heads: list[tuple[int, int]] | None = None

    @property
    def is_head_group(self) -> bool:
        return self.heads is not None

    def round_trips(self) -> int:
        return 2 * (self.stop - self.start) if self.is_head_group else 1

    def rtt_us(self) -> int:
        """The slowest peer's round trip times the stage's round trips, in whole microseconds,
        rounded per round trip so that sums compare exactly."""
        return round(max(p.rtt for p in self.peers) * 1e6) * self.round_trips()

    def compute_us(self) -> int:
        """The stage's compute a token, in whole microseconds, from its peers' throughput (tokens/s
        through all the blocks each serves, so k of a peer's n blocks take k/n of a token's time);
        a head group waits for its slowest member. A peer that states none counts 0, as an
        unknown round trip does."""
        blocks = self.stop - self.start
        return max(round(1e6 * blocks / ((p.layers[1] - p.layers[0]) * p.throughput)) if p.throughput > 0 else 0
                   for p in self.peers)

    def expected_us(self) -> int:
        """What a token is expected to spend in this stage: its round trips and its compute."""
        return self.rtt_us() + self.compute_us()


class RouteError(Exception):
    """No set of peers covers the asked blocks; names the uncovered layers."""

    def __init__(self, uncovered: list[int], detail: str = ""):
        self.uncovered, self.detail = uncovered, detail
        super().__init__(f"no peer serves layers {format_layers(uncovered)}{detail}")


def format_layers(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3:6, 9:10' (half-open, like the CLI)."""
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(f"{start}:{layer + 1}")
            start = None
    return ", ".join(spans)


def _head_partition(peers: list[PeerInfo], n_head: int) -> tuple[list[PeerInfo], list[tuple[int, int]]] | None:
    """Fewest peers whose head ranges exactly tile 0..n_head; among equals, the group whose
    slowest member (its round trip plus its compute a block) is fastest."""
    best: dict[int, tuple[tuple[int, float], list[PeerInfo]]] = {0: ((0, 0.0), [])}
    for h in range(n_head):
        if h not in best:
            continue
        (count, slowest), chosen = best[h]
        for p in peers:
            if p.heads and p.heads[0] == h:
                end = p.heads[1]
                block = 1 / ((p.layers[1] - p.layers[0]) * p.throughput) if p.throughput > 0 else 0.0
                cand = ((count + 1, max(slowest, p.rtt + block)), chosen + [p])
                if end not in best or cand[0] < best[end][0]:
                    best[end] = cand
    if n_head not in best:
        return None
    chosen = best[n_head][1]
    return chosen, [p.heads for p in chosen]  # type: ignore[misc]


def stage_starts(peers: list[PeerInfo]) -> set[int]:
    """Blocks where some stage could start: any block of a layer peer, a head peer's first."""
    return {b for p in peers for b in (range(*p.layers) if p.heads is None else (p.layers[0],))}


def candidate_stages(peers: list[PeerInfo], pos: int, stop: int, n_head: int,
                     starts: set[int] | None = None) -> list[StagePlan]:
    """Every stage that can start at block `pos`: a layer peer as far as it goes (<= stop); a head
    group as far as its members all reach, or ending early where another stage could take over
    (a group costs two round trips a block, a layer stage one for all its blocks)."""
    out = []
    for p in peers:
        if p.heads is None and p.layers[0] <= pos < p.layers[1]:
            out.append(StagePlan(pos, min(p.layers[1], stop), [p]))
    # Members need not serve the same blocks: a node opens a session on any part of its range,
    # so head peers that all reach block `end` form a group over pos:end.
    heads = [p for p in peers if p.heads is not None and p.layers[0] <= pos < p.layers[1]]
    if not heads:
        return out
    reach = sorted({min(p.layers[1], stop) for p in heads})
    starts = stage_starts(peers) if starts is None else starts
    lo = pos + 1
    for end in reach:  # the members reaching `end` are those that reach every block up to it
        found = _head_partition([p for p in heads if p.layers[1] >= end], n_head)
        if found:
            out.extend(StagePlan(pos, e, found[0], found[1]) for e in range(lo, end + 1)
                       if e == end or e in starts)
        lo = end + 1
    return out


def _uncovered_detail(peers: list[PeerInfo], uncovered: list[int], n_head: int) -> str:
    """Say so when head shards serve an uncovered block but do not add up to all its heads, and
    which heads no one serves there (at the first such block)."""
    partial = [i for i in uncovered if any(p.heads is not None and p.layers[0] <= i < p.layers[1] for p in peers)]
    if not partial:
        return ""
    served = {h for p in peers if p.heads is not None and p.layers[0] <= partial[0] < p.layers[1]
              for h in range(*p.heads)}
    missing = [h for h in range(n_head) if h not in served]
    why = (f": heads {format_layers(missing)} of layer {partial[0]} served by no one" if missing
           else ": their head ranges overlap without partitioning them")
    return f" (head shards of layers {format_layers(partial)} do not cover every head{why})"


def time_step(us: int) -> int:
    """Which step of TIME_STEP an expected time of `us` microseconds falls in (0 for none)."""
    return math.floor(math.log(us) / math.log(TIME_STEP)) if us >= 1 else 0


def _ranked(cost: tuple) -> tuple:
    """A route's cost (round trips, expected us, stages, load) as compared: the time in steps."""
    return cost[0], time_step(cost[1]), cost[2], cost[3]


def build_route(peers: list[PeerInfo], n_layer: int, n_head: int,
                start: int = 0, stop: int | None = None) -> list[StagePlan]:
    """The cheapest list of stages covering [start, stop); RouteError names any gap."""
    stop = n_layer if stop is None else stop
    starts = stage_starts(peers)
    # Times add in whole microseconds: summed as floats, one stage over blocks 0:12 and the same
    # peers as two stages 0:6 and 6:12 would differ by rounding alone, and the fewer stages
    # (sessions held on the peers, requests to open them) must win that tie.
    best: dict[int, tuple[tuple, list[StagePlan]]] = {start: ((0, 0, 0, 0.0), [])}
    for pos in range(start, stop):
        if pos not in best:
            continue
        cost, stages = best[pos]
        for plan in candidate_stages(peers, pos, stop, n_head, starts):
            load = max(p.load for p in plan.peers)
            new = (cost[0] + plan.round_trips(), cost[1] + plan.expected_us(), cost[2] + 1, cost[3] + load)
            if plan.stop not in best or _ranked(new) < _ranked(best[plan.stop][0]):
                best[plan.stop] = (new, stages + [plan])
    if stop in best:
        return best[stop][1]
    # Every servable block starts some stage, so blocks are reachable exactly when covered.
    uncovered = [i for i in range(start, stop) if not candidate_stages(peers, i, stop, n_head)]
    raise RouteError(uncovered, _uncovered_detail(peers, uncovered, n_head))
