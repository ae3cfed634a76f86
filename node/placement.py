"""Automatic block choice: how many blocks a node serves, which ones, and when to move.

Coverage of a block is the summed advertised throughput (tokens/s) of the live records that
serve it whole, plus, where head shards hold every head between them (ranges that tile
0..n_head, as a route needs), the slowest member of the best such group; head shards that do
not add up to every head cover nothing.  Advertised figures are self-asserted: each is capped
at MAX_COVER.  The rules:

* size: as many blocks as the memory budget holds (`--num-blocks` overrides), at least one;
* start: the window that makes the swarm's coverage vector, sorted ascending, largest in
  lexicographic order ("leximin": raise the weakest block first, then the next weakest...);
  ties go to the lowest start.  An empty swarm therefore gets 0:n, the next node n:2n, ...;
* moving (checked now and then): only to the leximin-best window, only if no block we leave
  would become uncovered, and only if it helps a lot: fewer uncovered blocks when some are
  uncovered, else the weakest block's coverage rising by at least `gain` (1.5x);
* taking turns: nodes sharing blocks that see the same swarm decide as if those with a lower
  peer id had already made their moves (`earlier_turns`), so that two twins do not both
  leave their blocks, or both move into the same gap, at once.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from nanoswarm.keys.records import Record
from nanoswarm.shards.model import ModelConfig

if TYPE_CHECKING:
    from .gossip import Gossip
    from .handler import RequestHandler

log = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.25
# On a GPU: of its free memory less the KV budget. Below half, so that a move (which loads the new
# blocks before it lets the old ones go, Rebalancer.move) still fits.
GPU_BUDGET_FRACTION = 0.45
MOVE_GAIN = 1.5
# A node waits its turn (earlier_turns) this many rebalance intervals at most, plus one for each
# peer simulated before it: by then they have had their turn and not taken it (fixed --layers,
# sessions open), and the nodes that waited on them go one after another, not together.
YIELD_INTERVALS = 2
_MIN_COVER = 1e-3  # a record advertising 0 tokens/s still covers its blocks
MAX_COVER = 1e6   # tokens/s: a record claiming more counts as this much (sums stay finite)


# ----- how many blocks --------------------------------------------------------------------
def block_bytes(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Weight bytes of one block: attention (4 C^2 + 4 C), MLP (8 C^2 + 5 C), two layer norms (4 C)."""
    c = config.n_embd
    params = 12 * c * c + 13 * c
    return params * torch.empty((), dtype=dtype).element_size()


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_memory_budget(device: torch.device | None = None, kv_budget_bytes: int = 0) -> int:
    """Weight bytes a node without --layers may take: a quarter of the host's available memory,
    or on a GPU a share of what is free there once the KV budget (the caches live there too) is
    set aside: the rest is for activations, cuBLAS workspaces and kernels."""
    if device is not None and device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(0, int((free - kv_budget_bytes) * GPU_BUDGET_FRACTION))
    return int(available_memory() * DEFAULT_BUDGET_FRACTION)


def blocks_for_budget(config: ModelConfig, budget_bytes: int, dtype: torch.dtype = torch.float32) -> int:
    """How many whole blocks fit the budget, between 1 and n_layer."""
    return max(1, min(config.n_layer, budget_bytes // max(1, block_bytes(config, dtype))))


# ----- where ------------------------------------------------------------------------------
def coverage(records: Iterable[Record], n_layer: int, n_head: int, exclude: str | None = None) -> list[float]:
    """Per block, the throughput of `records` (those of one model) that a route could use,
    leaving out peer `exclude` (see the module doc)."""
    cov = [0.0] * n_layer
    heads: list[list[tuple[int, int, float]]] = [[] for _ in range(n_layer)]
    for r in records:
        if r.peer_id == exclude or r.departing:
            continue
        tps = min(max(r.throughput, _MIN_COVER), MAX_COVER)
        for i in range(max(0, r.layers[0]), min(n_layer, r.layers[1])):
            if r.heads is None:
                cov[i] += tps
            elif 0 <= r.heads[0] < r.heads[1] <= n_head:
                heads[i].append((r.heads[0], r.heads[1], tps))
    for i, shards in enumerate(heads):
        cov[i] += _head_group_cover(shards, n_head)
    return cov


def _head_group_cover(shards: list[tuple[int, int, float]], n_head: int) -> float:
    """The slowest member's throughput in the best set of shards tiling heads 0..n_head; 0 if
    none tiles them (the route planner's rule: client/route.py)."""
    if not shards or n_head < 1:  # no head shards (n_head unknown then): no group, not an endless one
        return 0.0
    best = {0: float("inf")}  # first head not yet held -> the best group's slowest member so far
    for h in sorted({a for a, _, _ in shards}):  # shard starts only: n_head may be a stranger's claim
        if h in best:
            for a, b, tps in shards:
                if a == h:
                    best[b] = max(best.get(b, 0.0), min(best[h], tps))
    return best.get(n_head, 0.0)


def with_us(cov: list[float], start: int, n_blocks: int, throughput: float) -> list[float]:
    out = list(cov)
    for i in range(start, start + n_blocks):
        out[i] += max(throughput, _MIN_COVER)
    return out


def choose_start(cov: list[float], n_blocks: int, throughput: float = 1.0) -> int:
    """The leximin-best start for a window of n_blocks over coverage `cov` (see the module doc)."""
    n_blocks = min(n_blocks, len(cov))
    best, best_key = 0, None
    for start in range(len(cov) - n_blocks + 1):
        key = sorted(with_us(cov, start, n_blocks, throughput))
        if best_key is None or key > best_key:
            best, best_key = start, key
    return best


def plan_move(cov_others: list[float], start: int, n_blocks: int, throughput: float,
              gain: float = MOVE_GAIN) -> int | None:
    """The new start if moving from `start` is worth it (see the module doc), else None."""
    target = choose_start(cov_others, n_blocks, throughput)
    if target == start:
        return None
    leaving = set(range(start, start + n_blocks)) - set(range(target, target + n_blocks))
    if any(cov_others[i] <= 0 for i in leaving):
        return None  # never uncover a block
    now = with_us(cov_others, start, n_blocks, throughput)
    after = with_us(cov_others, target, n_blocks, throughput)
    gaps_now, gaps_after = sum(c <= 0 for c in now), sum(c <= 0 for c in after)
    if gaps_now:
        return target if gaps_after < gaps_now else None
    return target if min(after) >= gain * min(now) else None


# Peers simulated by earlier_turns, at most: each costs two coverage passes, and peer ids are
# anyone's to choose (a stranger's many records only make us wait, a few intervals at most).
MAX_EARLIER = 8


@dataclass
class Turns:
    """The turns of the peers before us on one view (earlier_turns)."""

    ahead: list[Record]  # the records once those peers have made their moves
    held: list[float]  # per block, the coverage of the others less every peer before us that may move
    before: int  # how many peers before us were simulated


def earlier_turns(records: list[Record], me: str, span: tuple[int, int], n_layer: int,
                  n_head: int) -> Turns:
    """The moves of the peers that share a block of `span` with us and whose peer id is lower than
    ours, each made as plan_move tells it, in peer-id order: a node takes its turn after those
    before it, so two that see the same swarm do not both leave the same blocks (uncovering
    them) or both take the same gap. A peer before us may decide otherwise (it waits on peers we
    do not simulate): `held` counts it for nothing if it would move by either reckoning."""
    live = [r for r in records if not r.departing]
    earlier = sorted((r for r in live if r.peer_id < me and r.heads is None
                      and 0 <= r.layers[0] < r.layers[1] <= n_layer
                      and r.layers[0] < span[1] and span[0] < r.layers[1]), key=lambda r: r.peer_id)
    # The peers right before us are simulated; those before them are taken to move (review125:
    # dropped, the lowest ids, surest to move, counted as staying, and 12 nodes on 0:1 all left).
    movers = {r.peer_id for r in earlier[:-MAX_EARLIER]}
    earlier = earlier[-MAX_EARLIER:]
    ahead = live
    for r in earlier:
        n_blocks, throughput = r.layers[1] - r.layers[0], min(r.throughput, MAX_COVER)
        alone = plan_move(coverage(live, n_layer, n_head, exclude=r.peer_id), r.layers[0], n_blocks, throughput)
        target = plan_move(coverage(ahead, n_layer, n_head, exclude=r.peer_id), r.layers[0], n_blocks, throughput)
        if alone is not None or target is not None:
            movers.add(r.peer_id)
        if target is not None:
            ahead = [replace(x, layers=(target, target + n_blocks)) if x.peer_id == r.peer_id else x
                     for x in ahead]
    held = coverage([r for r in live if r.peer_id not in movers], n_layer, n_head, exclude=me)
    return Turns(ahead, held, len(earlier))


# ----- moving a running node --------------------------------------------------------------
class Rebalancer:
    """Timer body: now and then, check whether this node should serve other blocks, and move.

    A check that finds a session open does nothing (a session's KV cache belongs to the old
    blocks) and the next check decides again; a move loads the new blocks and swaps them in.
    Decisions are taken only on a settled view (the layers of this model's peers unchanged for
    `settle` seconds plus a random part of `interval`), and peers sharing blocks take turns
    (`plan`), so that two nodes rarely leave the same blocks at once; if they do (views that
    differ), the next checks repair it.
    """

    def __init__(self, handler: RequestHandler, gossip: Gossip, n_blocks: int,
                 load: Callable[[int, int], object], interval: float, settle: float = 1.0):
        self.handler = handler
        self.gossip = gossip
        self.n_blocks = n_blocks
        self.load = load  # (start, stop) -> Blocks
        self.interval = interval
        self.settle = settle
        self.moves = 0
        self.failures = 0  # loads that failed in a row (each doubles the wait before the next check)
        self._next = time.monotonic() + self._jitter()
        self._view: frozenset = frozenset()
        self._latest: float | None = None  # the latest the next check may be put off to
        self._waiting_until: float | None = None  # when we stop waiting for our turn

    def _jitter(self) -> float:
        # Randomized, so that two nodes seeing the same gap rarely move into it together.
        return self.interval * random.uniform(0.5, 1.5)

    def check(self) -> int | None:
        """Called often by a server timer; acts only when its randomized time has come."""
        records = self.gossip.table.records(self.handler.model_id)
        view = frozenset((r.peer_id, r.layers, r.heads) for r in records)
        now = time.monotonic()
        if view != self._view:
            # The swarm changed: decide again once it has settled, each node at its own random
            # moment, so that the first mover's new record reaches the others before they decide;
            # but one interval late at most, or churn elsewhere would put the check off for as
            # long as it lasts (review126: a gap unfilled for 120 s under a join a second).
            self._view = view
            if self._latest is None:
                self._latest = self._next + self.interval
            self._next = min(now + self.settle + random.uniform(0, self.interval), self._latest)
        due = self._next if self._waiting_until is None else min(self._next, self._waiting_until)
        if now < due or self.gossip.departed or self.handler.leaving:
            return None
        self._next, self._latest = now + self._jitter(), None
        if self.handler.sessions.sessions:
            return None  # moving would strand open sessions; try again later
        target = self.plan(records, now)
        if target is None or not self.move(target):
            return None
        return target

    def plan(self, records: list[Record], now: float) -> int | None:
        """Where to move on this view, if anywhere: after the moves of the peers before us
        (earlier_turns), leaving no block that one of them might leave too; or, once we have
        waited a while, as if they stayed (a peer of fixed --layers, or one with sessions open,
        never takes its turn)."""
        cfg = self.handler.config
        me, start = self.gossip.peer_id, self.handler.blocks.start
        throughput = self.handler.stats.throughput
        target = plan_move(coverage(records, cfg.n_layer, cfg.n_head, exclude=me), start, self.n_blocks, throughput)
        if target is None:  # nothing to take turns for (and no cost: the peers' moves are not simulated)
            self._waiting_until = None
            return None
        turns = earlier_turns(records, me, (start, start + self.n_blocks), cfg.n_layer, cfg.n_head)
        turn = plan_move(coverage(turns.ahead, cfg.n_layer, cfg.n_head, exclude=me), start, self.n_blocks,
                         throughput)
        if turn is not None and any(turns.held[i] <= 0 for i in range(start, start + self.n_blocks)
                                    if not turn <= i < turn + self.n_blocks):
            turn = None  # a block we would leave is held only by peers that may leave it too
        if turn is not None:  # our turn (the plain move, or another): now
            self._waiting_until = None
            return turn
        # Timed from the first wait, not from the last change to the swarm or to where we would
        # go: churn elsewhere would otherwise hold a gap open for as long as it lasts (check()
        # comes back at this time, whatever the swarm does meanwhile).
        if self._waiting_until is None:
            self._waiting_until = now + (YIELD_INTERVALS + turns.before) * self.interval
        if now >= self._waiting_until:
            self._waiting_until = None
            return target
        log.debug("waiting our turn to move to %d:%d", target, target + self.n_blocks)
        return None

    def move(self, start: int) -> bool:
        old = self.handler.blocks
        t0 = time.perf_counter()
        try:
            new = self.load(start, start + self.n_blocks)
        except Exception as e:  # noqa: BLE001 - e.g. a shard file gone or damaged since start
            # Keep serving what we have; ask again later, less often each time it fails.
            self.failures += 1
            self._next = time.monotonic() + self.interval * min(2 ** self.failures, 64)
            log.warning("staying on blocks %d:%d: cannot load %d:%d: %s", old.start, old.stop, start,
                        start + self.n_blocks, " ".join(str(e).split())[:300] or type(e).__name__)
            return False
        self.failures = 0
        was = f"{old.start}:{old.stop}"
        self.handler.blocks = new
        del old  # its weights go before the measurement allocates: a GPU held both sets otherwise
        if self.handler.device.type == "cuda":
            torch.cuda.empty_cache()  # and back to the device, for the other processes on it
        try:
            self.handler.measure_throughput()
        except RuntimeError as e:  # device memory taken meanwhile (OutOfMemoryError)
            log.warning("kept the old speed figure: measuring blocks %d:%d failed: %s", start,
                        start + self.n_blocks, type(e).__name__)
        finally:  # whatever the measurement did, the record says what this node now serves
            self.moves += 1
            log.info("moved from blocks %s to %d:%d in %.1fs (%.1f tokens/s)", was, start, start + self.n_blocks,
                     time.perf_counter() - t0, self.handler.stats.throughput)
            self.gossip.refresh()
            self.gossip.round()  # tell the swarm at once, so nobody else moves into the same place
            self.gossip.warm_next_hops()
        return True
