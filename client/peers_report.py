"""The swarm as `nanoswarm peers` shows it: per model, its peers, each block's coverage and the gaps
no route can pass, from a table of verified records (client/discovery.py fetches it)."""

from __future__ import annotations

import time

from nanoswarm.keys.records import Record, record_age, record_contact
from nanoswarm.keys.table import RecordTable
from nanoswarm.node.placement import coverage

from .route import PeerInfo, candidate_stages, format_layers


def _spans(blocks: list[int]) -> list[str]:
    return format_layers(blocks).split(", ") if blocks else []


def routable_blocks(records: list[Record], n_layer: int, n_head: int) -> list[bool]:
    """Per block: whether a client can route through it, by the route planner's own rule.

    A whole-block peer serves a block; head shards do only if their head ranges tile 0..n_head
    exactly, so a block served by `heads 0:6` alone (of 12) is a gap.
    """
    peers = [PeerInfo(r.address, r.peer_id, r.model_id, tuple(r.layers), tuple(r.heads) if r.heads else None)
             for r in records]
    # Blocks between two span edges are served by the same peers, so one block of each run
    # decides it, and a one-block stage (stop = block + 1) is enough to know whether any starts
    # there. Block by block, with every stage to its end, this took minutes for a few records
    # claiming 65,536 blocks when no --model bounds the count (a review).
    edges = sorted({0, n_layer} | {min(max(e, 0), n_layer) for r in records for e in r.layers})
    routable = [False] * n_layer
    for a, b in zip(edges, edges[1:]):
        if candidate_stages(peers, a, a + 1, n_head, starts=set()):
            routable[a:b] = [True] * (b - a)
    return routable


def swarm_report(table: RecordTable, n_layers: dict[str, int] | None = None, model_id: str | None = None,
                 now: float | None = None, n_heads: dict[str, int] | None = None) -> list[dict]:
    """Per model: its peers and the coverage of every block (summed tokens/s) with the gaps.

    `n_layers` gives a model's block count (from its manifest); otherwise it is the highest block
    any record serves, so gaps after the last served block cannot be seen.  `n_heads` likewise
    gives its head count; otherwise it is the highest head any record serves, so a block whose
    head shards all stop short of the last head is not seen as a gap unless a record elsewhere
    serves that head.  A gap is a block no route can pass (see routable_blocks).
    """
    now = time.time() if now is None else now
    by_model: dict[str, list[Record]] = {}
    for r in table.records(model_id):
        by_model.setdefault(r.model_id, []).append(r)
    if model_id is not None:
        by_model.setdefault(model_id, [])
    out = []
    for mid, records in sorted(by_model.items()):
        known = (n_layers or {}).get(mid)
        n_layer = known or max((r.layers[1] for r in records), default=0)
        head_known = (n_heads or {}).get(mid)
        n_head = head_known or max((r.heads[1] for r in records if r.heads), default=0)
        routable = routable_blocks(records, n_layer, n_head)
        # Throughput by the placement rule: whole-block peers, plus the slowest member of the best
        # head group that holds every head (a head shard alone runs no block).
        cover = [[tps, 0] for tps in coverage(records, n_layer, n_head)]
        for r in records:
            for i in range(r.layers[0], min(r.layers[1], n_layer)):
                cover[i][1] += 1
        out.append({
            "model_id": mid, "n_layer": n_layer, "n_layer_known": known is not None,
            # 0: no head shards, and no head count was given
            "n_head": n_head, "n_head_known": head_known is not None,
            "peers": [{"peer_id": r.peer_id, "contact": record_contact(r), "address": r.address,
                       "layers": list(r.layers), "heads": list(r.heads) if r.heads else None,
                       "throughput": r.throughput, "load": r.load, "age": record_age(r, now),
                       "expires_in": r.expires - now, "insecure": r.insecure}
                      for r in sorted(records, key=lambda r: (r.layers, r.peer_id))],
            "coverage": [{"block": i, "throughput": t, "peers": n} for i, (t, n) in enumerate(cover)],
            "gaps": _spans([i for i, ok in enumerate(routable) if not ok]),
        })
    return out


def _rate(tokens_per_s: float) -> str:
    """A peer's claimed tokens/s in 8 columns (1.7e308 written out took 300)."""
    return f"{tokens_per_s:>8.1f}" if tokens_per_s < 1e7 else f"{tokens_per_s:>8.1e}"


def format_report(report: list[dict]) -> str:
    """The report as readable tables."""
    lines: list[str] = []
    for m in report:
        extent = f"{m['n_layer']} blocks" + ("" if m["n_layer_known"] else " seen")
        n = len(m["peers"])
        lines.append(f"model {m['model_id'][:16]} ({extent}, {n} peer{'' if n == 1 else 's'})")
        lines.append(f"  {'PEER':<28} {'ADDRESS':<24} {'LAYERS':<7} {'HEADS':<6} {'TOK/S':>8} {'LOAD':>5} {'AGE':>6}")
        for p in m["peers"]:
            heads = f"{p['heads'][0]}:{p['heads'][1]}" if p["heads"] else "all"
            lines.append(f"  {p['peer_id']:<28} {p['address']:<24} {p['layers'][0]}:{p['layers'][1]:<5} "
                         f"{heads:<6} {_rate(p['throughput'])} {p['load']:>5.2f} {p['age']:>5.0f}s")
        head_guess = not m["n_head_known"] and any(p["heads"] for p in m["peers"])
        heads = f"{m['n_head']} head{'s' * (m['n_head'] != 1)}"
        lines.append("  coverage (tokens/s through each block: whole-block peers plus the slowest member of a "
                     "head group holding every head" + (f", if the model has {heads} (--model to know)" if head_guess
                                                        else "") + "; peers serving any of it):")
        cov, i = m["coverage"], 0
        while i < len(cov):  # group runs of blocks with the same coverage
            j = i
            while j + 1 < len(cov) and (cov[j + 1]["throughput"], cov[j + 1]["peers"]) == (
                    cov[i]["throughput"], cov[i]["peers"]):
                j += 1
            n = cov[i]["peers"]
            lines.append(f"    blocks {i}:{j + 1:<4} {cov[i]['throughput']:>8.1f} tokens/s  "
                         f"{n} peer{'' if n == 1 else 's'}")
            i = j + 1
        # Counts guessed from the records leave gaps unseen: say so (a review read "gaps: none"
        # of a swarm that served blocks 0:2 of a 4-block model).
        guesses = []
        if not m["n_layer_known"]:
            guesses.append(f"in blocks 0:{m['n_layer']}, the most any peer serves")
        if head_guess:
            guesses.append(f"if the model has {heads}, the most any head shard serves")
        guessed = f" ({'; '.join(guesses)}: --model to know)" if guesses else ""
        lines.append(f"  gaps: {', '.join(m['gaps']) if m['gaps'] else 'none'}{guessed}")
    return "\n".join(lines) if lines else "no records"
