"""Route building: choose stages that cover blocks [start, stop) in order.

Cost of a route, compared in this order: round trips per token (a layer stage is one; a head
group is two per block, its members answering in parallel), then the time a token is expected
to take (each stage's measured round trips plus its compute, from the throughput its peers
state: a GPU peer beats a CPU peer serving the same blocks), where every route within TIME_STEP
of the fastest (and TIE_SLACK_US more) ties, then the fewest stages (each holds a session on its peers), then the
lowest load (which spreads sessions over peers that tie), then the exact time.
Shortest path over block boundaries; the swarm is small enough (blocks x peers) that a plain
dynamic program is instant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from nanoswarm.keys.contact import format_contact, same_endpoint, split_contact
from nanoswarm.keys.records import check_endpoint
from nanoswarm.protocol.messages import MAX_CONTACT_CHARS

# Routes whose expected token times are within this factor of the fastest's tie: measured
# throughputs and round trips of like peers differ by a few percent from run to run, and within
# that noise the lower load should decide, not the last digit of a measurement.
TIME_STEP = 1.25
# ... and this much more (microseconds), at most the fastest's own time (else a peer 10x slower
# tied with a GPU peer of a small model, review104): timing a peer's round trip on a busy
# machine is noisy by about that much, which parted like peers of a fast route (loopback, a
# small model) past the factor alone (review103: 0.5-2 ms for like peers of 2 ms compute).
TIE_SLACK_US = 1000
MAX_BLOCK_US = 10**9  # a block's compute counts at most this: a stated throughput near 0 is not infinite


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
    # The contact its `info` says it is known by (its signed record's), where it was given in
    # another form (`localhost` for 127.0.0.1): the name relayed steps give it, since a node
    # relays only to the contacts of its table (PeerTable.add_info).
    relay_name: str | None = None


def own_contact(address: str, info: dict) -> str | None:
    """The contact `info` says the peer at `address` is known by, where it names the same
    endpoint in another form (`localhost` for the 127.0.0.1 its signed record names, a host name
    for its IP) with the same CURVE key: the peer's table names it so, and a node relays only to a
    contact of its table (a client given `localhost` had every hop refuse its relayed steps
    `not_served`). Untrusted: anything else is not used (review114: a record's address that the
    hop before could not reach made every session wait out two step timeouts before going
    stage by stage, where `not_served` sends it so at once)."""
    contact = info.get("contact")
    if not isinstance(contact, str) or len(contact) > MAX_CONTACT_CHARS:
        return None
    try:
        given, key = split_contact(address)
        endpoint, own_key = split_contact(contact)
        check_endpoint(endpoint)
    except ValueError:
        return None
    if own_key != key or endpoint == given or not same_endpoint(given, endpoint):
        return None
    return format_contact(endpoint, key)


@dataclass
class StagePlan:
    start: int
    stop: int
    peers: list[PeerInfo]            # one for a layer stage, several for a head group
    heads: list[tuple[int, int]] | None = None

    @property
    def is_head_group(self) -> bool:
        return self.heads is not None

    def peer_heads(self, n_head: int) -> list[tuple[int, int]]:
        """The heads taken from each of `peers`, as its `open` names them: a member's, or all
        `n_head` of a layer stage's (Swarm.make_stage and open_ahead must name the same)."""
        return list(self.heads) if self.heads is not None else [(0, n_head)]

    def round_trips(self) -> int:
        return 2 * (self.stop - self.start) if self.is_head_group else 1

    def rtt_us(self) -> int:
        """The slowest peer's round trip times the stage's round trips, in whole microseconds,
        rounded per round trip so that sums compare exactly."""
        return round(max(p.rtt for p in self.peers) * 1e6) * self.round_trips()

    def expected_us(self, block_us: dict[int, int]) -> int:
        """What a token is expected to spend in this stage: its round trips and its compute, the
        blocks times its slowest peer's `block_us` (by id of the PeerInfo: `blocks_us`). Whole
        microseconds a block, so that one stage over blocks 0:12 and the same peer as 0:6 and
        6:12 cost the same (the fewer stages then win)."""
        return self.rtt_us() + (self.stop - self.start) * max(block_us[id(p)] for p in self.peers)


def blocks_us(peers: list[PeerInfo]) -> dict[int, int]:
    """Each peer's compute for one of its blocks (by id of its PeerInfo), in whole microseconds,
    from the throughput it states: tokens/s through all the blocks it serves, so one of its n
    blocks takes 1/n of its token time. A peer that states none counts as the slowest that does
    (a fast claim is believed anyway: docs/discovery.md)."""
    known = {id(p): round(min(MAX_BLOCK_US, 1e6 / ((p.layers[1] - p.layers[0]) * p.throughput)))
             for p in peers if p.throughput > 0}
    unknown = max(known.values(), default=0)
    return {id(p): known.get(id(p), unknown) for p in peers}


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


def _head_partition(peers: list[PeerInfo], n_head: int, block_us: dict[int, int],
                    blocks: int = 1) -> tuple[list[PeerInfo], list[tuple[int, int]]] | None:
    """Fewest peers whose head ranges exactly tile 0..n_head. Among equals, groups whose slowest
    member (a block: its two round trips plus its compute) is within TIME_STEP of the fastest
    group's (and TIE_SLACK_US over the group's `blocks`) tie, and the lowest summed load wins (a
    program's sessions spread over like members, as over like layer peers), then the fastest."""
    def member_us(p: PeerInfo) -> float:
        return 2e6 * p.rtt + block_us[id(p)]

    fastest = _tiling(peers, n_head, member_us, with_load=False)
    if fastest is None:
        return None
    # The slack is the stage's, over all its blocks (review104: counted a block, 4.2x slower
    # members tied over 12), and at most the fastest's own time, as in _kept.
    slack = min(TIE_SLACK_US / blocks, fastest[0][-1])
    near = [p for p in peers if member_us(p) - slack <= TIME_STEP * fastest[0][-1]]  # fastest's among them
    chosen = _tiling(near, n_head, member_us, with_load=True)[1]  # type: ignore[index]
    return chosen, [p.heads for p in chosen]  # type: ignore[misc]


def _tiling(peers: list[PeerInfo], n_head: int, member_us: Callable[[PeerInfo], float],
            with_load: bool) -> tuple[tuple[float, ...], list[PeerInfo]] | None:
    """The best tiling of heads 0..n_head by (members, summed load if `with_load`, slowest
    member's time): a dynamic program over head boundaries (count and load add up, so a prefix
    best to its boundary is best in every tiling it starts)."""
    best: dict[int, tuple[tuple[float, ...], list[PeerInfo]]] = {0: ((0, 0.0, 0.0), [])}
    for h in range(n_head):
        if h not in best:
            continue
        (count, load, slowest), chosen = best[h]
        for p in peers:
            if p.heads and p.heads[0] == h:
                cand = ((count + 1, load + p.load if with_load else 0.0, max(slowest, member_us(p))), chosen + [p])
                end = p.heads[1]
                if end not in best or cand[0] < best[end][0]:
                    best[end] = cand
    return best.get(n_head)


def stage_starts(peers: list[PeerInfo]) -> set[int]:
    """Blocks where some stage could start: any block of a layer peer, a head peer's first."""
    return {b for p in peers for b in (range(*p.layers) if p.heads is None else (p.layers[0],))}


def candidate_stages(peers: list[PeerInfo], pos: int, stop: int, n_head: int,
                     starts: set[int] | None = None, block_us: dict[int, int] | None = None) -> list[StagePlan]:
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
    block_us = blocks_us(peers) if block_us is None else block_us
    lo = pos + 1
    for end in reach:  # the members reaching `end` are those that reach every block up to it
        found = _head_partition([p for p in heads if p.layers[1] >= end], n_head, block_us, end - pos)
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


def _kept(arrived: list[tuple[tuple, list[StagePlan]]], fastest: int) -> tuple[tuple, list[StagePlan]]:
    """Of the routes that reach one block boundary, (cost, stages), the one to go on from: the
    fewest round trips; among those, every one within TIME_STEP of `fastest` (microseconds: the
    fastest route to this boundary of all, not only of those that arrived), and TIE_SLACK_US (at
    most `fastest`) more, ties, and the fewest
    stages, the lowest load, then the exact time decide. Cost: (round trips, expected
    microseconds, stages, load)."""
    fastest = max(1, fastest)
    slack = min(TIE_SLACK_US, fastest)

    def ranked(item: tuple[tuple, list[StagePlan]]) -> tuple:
        cost = item[0]
        steps = max(0, math.floor(math.log(max(1, cost[1] - slack) / fastest) / math.log(TIME_STEP)))
        return cost[0], steps, cost[2], cost[3], cost[1]
    return min(arrived, key=ranked)


def build_route(peers: list[PeerInfo], n_layer: int, n_head: int,
                start: int = 0, stop: int | None = None) -> list[StagePlan]:
    """The cheapest list of stages covering [start, stop); RouteError names any gap."""
    stop = n_layer if stop is None else stop
    starts, block_us = stage_starts(peers), blocks_us(peers)
    # Every route that reaches a boundary is kept until the boundary is reached from every
    # earlier one; "within TIME_STEP" is measured from the fastest route to it of all (`exact`,
    # a plain shortest path beside): measured from the fastest that arrived, which were built on
    # prefixes kept for their load, the window compounded, boundary after boundary (review98: a
    # route 2.3x the fastest over four blocks).
    arrived: dict[int, list[tuple[tuple, list[StagePlan]]]] = {start: [((0, 0, 0, 0.0), [])]}
    exact: dict[int, tuple[int, int]] = {start: (0, 0)}  # (round trips, us) of the fastest route to each boundary
    for pos in range(start, stop + 1):
        if pos not in arrived:
            continue
        cost, stages = _kept(arrived.pop(pos), exact[pos][1])
        best = exact[pos]
        if pos == stop:
            return stages
        for plan in candidate_stages(peers, pos, stop, n_head, starts, block_us):
            trips, us, load = plan.round_trips(), plan.expected_us(block_us), max(p.load for p in plan.peers)
            arrived.setdefault(plan.stop, []).append(((cost[0] + trips, cost[1] + us, cost[2] + 1, cost[3] + load),
                                                      stages + [plan]))
            via = (best[0] + trips, best[1] + us)
            if plan.stop not in exact or via < exact[plan.stop]:
                exact[plan.stop] = via
    # Every servable block starts some stage, so blocks are reachable exactly when covered.
    uncovered = [i for i in range(start, stop) if not candidate_stages(peers, i, stop, n_head)]
    raise RouteError(uncovered, _uncovered_detail(peers, uncovered, n_head))
