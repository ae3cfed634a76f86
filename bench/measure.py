"""Timed generation rounds: prefill then teacher-forced decode through a session's stages.

The same code times the local reference (one LocalStage) and a swarm (remote stages): the
client embeds, runs the session, applies ln_f + lm_head and takes the argmax, as generation does.
Decode feeds fixed token ids rather than the argmax, so every run sees the same inputs and the
logits of two runs can be compared position by position.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoswarm.client.batch import BatchStopped, HeadBatch, Worker, join_all, stop_and_wait
from nanoswarm.client.generate import ClientModel
from nanoswarm.client.head_group import HeadGroupStage
from nanoswarm.client.peer_errors import PeerError
from nanoswarm.client.session import InferenceSession
from nanoswarm.client.stages import RemoteLayerStage, Stage
from nanoswarm.client.transport import PeerConnection

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    prefill_seconds: float
    step_seconds: list[float]               # per decode step: the token's time (embed, route, head)
    route_seconds: list[float]              # per decode step: the route's part (session.step)
    route_busy: list[float]                 # per decode step: compute the nodes reported (busy_us)
    stages: int
    prefill_bytes: int = 0
    decode_bytes: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)  # prefill's last, then every step

    def overheads(self) -> list[float]:
        """Per decode step, per stage: time not spent computing blocks on the nodes. Measured for
        the whole route (a relayed step has no per-stage times on the client)."""
        return [(t - b) / self.stages for t, b in zip(self.route_seconds, self.route_busy)]


def stage_connections(stage: Stage) -> list[PeerConnection]:
    if isinstance(stage, RemoteLayerStage):
        return [stage.conn]
    if isinstance(stage, HeadGroupStage):
        return [conn for conn, _ in stage.members]
    return []


def _connections(session: InferenceSession) -> list[PeerConnection]:
    return [c for s in session.stages for c in stage_connections(s)]


def wire_bytes(session: InferenceSession) -> int:
    """Bytes of message frames sent and received so far over the session's connections."""
    return sum(c.bytes_sent + c.bytes_received for c in _connections(session))


def node_busy(session: InferenceSession) -> dict[PeerConnection, float]:
    """Compute each of the session's nodes has reported so far (busy_us of its replies), seconds."""
    return {c: c.busy_seconds for c in _connections(session)}


def busy_since(session: InferenceSession, before: dict[PeerConnection, float]) -> float:
    """The compute on the route's critical path since `before`: per stage, its slowest node (a
    head group's members compute side by side), summed over the stages. A relayed step reports
    every hop's compute in its last hop's reply, which this sums the same way."""
    return sum(max((c.busy_seconds - before.get(c, 0.0) for c in stage_connections(s)), default=0.0)
               for s in session.stages)


def node_stats(conn: PeerConnection) -> dict:
    """The node's counters from `info` (empty for a node that does not report them)."""
    try:
        return conn.request("info", timeout=10.0).fields.get("stats") or {}
    except PeerError as e:
        log.warning("no stats from %s: %s", conn.address, e)
        return {}


def settle_threads(conns: list[PeerConnection], timeout: float = 6.0) -> None:
    """Wait, at most `timeout` seconds, until every node computes with its own torch threads
    again: one that found the cores contended (a run of independent clients) computes with fewer
    for a while after (node/threads.py), and the next run would measure that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = [conn.request("info", timeout=10.0).fields.get("threads") for conn in conns]
        except PeerError as e:
            log.warning("no thread counts from the nodes: %s", e)
            return
        if all(not isinstance(t, dict) or t.get("now") == t.get("own") for t in states):
            return
        if time.monotonic() > deadline:
            log.warning("nodes still compute with fewer threads than their own: %s", states)
            return
        time.sleep(0.25)


def _next_token(client: ClientModel, hidden: torch.Tensor, keep: list | None) -> int:
    logits = client.logits(hidden)
    if keep is not None:
        keep.append(logits)
    return int(torch.argmax(logits))  # what greedy sampling costs


def run_round(client: ClientModel, session: InferenceSession, ids: list[int], prompt_len: int,
              steps: int, keep_logits: bool = False) -> RoundResult:
    """Prefill ids[:prompt_len], then `steps` decode steps on the following ids. The prefill
    follows the session's opening at once, as in `generate`: collect garbage before opening (a
    collection between the two is a pause no user has, and a swarm pays more for a pause than
    one process does: docs/performance.md)."""
    if len(ids) < prompt_len + steps:
        raise ValueError(f"need {prompt_len + steps} ids, got {len(ids)}")
    keep: list | None = [] if keep_logits else None
    b0 = wire_bytes(session)
    t0 = time.perf_counter()
    _next_token(client, session.step(client.embed(ids[:prompt_len], 0), last=1), keep)
    prefill = time.perf_counter() - t0
    b1 = wire_bytes(session)
    step_seconds, route_seconds, route_busy = [], [], []
    for pos in range(prompt_len, prompt_len + steps):
        busy = node_busy(session)
        t = time.perf_counter()
        hidden = client.embed([ids[pos]], pos)
        r = time.perf_counter()
        hidden = session.step(hidden)
        route_seconds.append(time.perf_counter() - r)
        _next_token(client, hidden, keep)
        step_seconds.append(time.perf_counter() - t)
        route_busy.append(busy_since(session, busy))
    return RoundResult(prefill, step_seconds, route_seconds, route_busy, len(session.stages), b1 - b0,
                       wire_bytes(session) - b1, keep or [])


def run_concurrent(client: ClientModel, sessions: list[InferenceSession], prompts: list[list[int]],
                   steps: int, on_start: Callable[[], None] | None = None) -> dict:
    """One thread per session, all decoding at once after their prefills; tokens/s in total.
    `on_start` runs after the prefills, before the decoding starts."""
    n = len(sessions)
    for session, prompt in zip(sessions, prompts):
        session.step(client.embed(prompt, 0), last=1)
    if on_start is not None:
        on_start()
    start = threading.Barrier(n + 1)
    ends = [0.0] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        session, token = sessions[i], prompts[i][-1]
        start.wait()
        try:
            for _ in range(steps):
                token = _next_token(client, session.step(client.embed([token], session.pos)), None)
        except BaseException as e:  # re-raised in the caller
            errors.append(e)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    gc.collect()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(ends) - t0
    return {"sessions": n, "tokens": n * steps, "seconds": wall, "aggregate_tps": n * steps / wall,
            "per_session_tps": statistics.mean(steps / (e - t0) for e in ends)}


def run_lockstep(client: ClientModel, sessions: list[InferenceSession], prompts: list[list[int]],
                 steps: int, on_start: Callable[[], None] | None = None) -> dict:
    """One client drives all sessions in step, as SwarmModel.generate_batch does: a thread a
    session (each session here has a Swarm, so links, of its own), and ln_f + lm_head run once
    for all of them each token (client/batch.py), after which every session's next step
    leaves at once and reaches each node with the others' (a client serving several users).
    The steps go through InferenceSession.step, failover and relay included."""
    n = len(sessions)
    for session, prompt in zip(sessions, prompts):
        session.step(client.embed(prompt, 0), last=1)
    if on_start is not None:
        on_start()
    batch = HeadBatch(client)
    members = [batch.member(k, joined=True) for k in range(n)]  # each counted from the start: in step at once
    start = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        session, member, token = sessions[k], members[k], prompts[k][-1]
        start.wait()
        try:
            for _ in range(steps):
                token = int(member.logits(session.step(client.embed([token], session.pos))).argmax())
        except BaseException as e:  # re-raised in the caller
            errors.append(e)
            batch.stop()
        finally:
            member.leave()

    workers = [Worker(lambda k=k: run(k), f"nanoswarm-bench-{k}") for k in range(n)]
    for worker in workers:
        worker.start()
    gc.collect()
    start.wait()
    t0 = time.perf_counter()
    try:
        join_all(workers)
    except BaseException:  # Ctrl-C: the sessions stop after their steps under way
        stop_and_wait(batch, workers)
        raise
    wall = time.perf_counter() - t0
    if errors:
        raise next((e for e in errors if not isinstance(e, BatchStopped)), errors[0])
    return {"sessions": n, "tokens": n * steps, "seconds": wall, "aggregate_tps": n * steps / wall,
            "per_session_tps": steps / wall}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]
