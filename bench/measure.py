"""Timed generation rounds: prefill then teacher-forced decode through a session's stages.

The same code times the local reference (one LocalStage) and a swarm (remote stages): the
client embeds, runs the session, applies ln_f + lm_head and takes the argmax, as generation does.
Decode feeds fixed token ids rather than the argmax, so every run sees the same inputs and the
logits of two runs can be compared position by position.
"""

from __future__ import annotations

import gc
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoswarm.client.generate import ClientModel
from nanoswarm.client.session import InferenceSession
from nanoswarm.client.stages import HeadGroupStage, RemoteLayerStage, Stage, check_reply
from nanoswarm.client.transport import PeerConnection, PeerError

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    prefill_seconds: float
    step_seconds: list[float]
    stage_seconds: list[list[float]]        # per stage: wall time of each decode step
    stage_busy: list[list[float | None]]    # per stage: node compute in each decode step (busy_us)
    prefill_bytes: int = 0
    decode_bytes: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)  # prefill's last, then every step

    def overheads(self) -> list[list[float]]:
        """Per stage, per decode step: time not spent computing blocks on the node(s)."""
        return [[t - b for t, b in zip(times, busy) if b is not None]
                for times, busy in zip(self.stage_seconds, self.stage_busy)]


def stage_connections(stage: Stage) -> list[PeerConnection]:
    if isinstance(stage, RemoteLayerStage):
        return [stage.conn]
    if isinstance(stage, HeadGroupStage):
        return [conn for conn, _ in stage.members]
    return []


def wire_bytes(stages: list[Stage]) -> int:
    """Bytes of message frames sent and received so far over these stages' connections."""
    return sum(c.bytes_sent + c.bytes_received for s in stages for c in stage_connections(s))


def node_stats(conn: PeerConnection) -> dict:
    """The node's counters from `info` (empty for a node that does not report them)."""
    try:
        return conn.request("info", timeout=10.0).fields.get("stats") or {}
    except PeerError as e:
        log.warning("no stats from %s: %s", conn.address, e)
        return {}


class _StageTimer:
    """Records each stage step's wall time and the compute its node(s) reported (`busy_us` of
    every reply, summed over a head group's fan-outs). Wraps stage.step and the connections'
    recv on the instances (the session calls them); the wrappers are removed on exit."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.times: list[list[float]] = [[] for _ in stages]
        self.busy: list[list[float | None]] = [[] for _ in stages]
        self._acc: list[float | None] = [0.0] * len(stages)

    def __enter__(self) -> _StageTimer:
        for i, stage in enumerate(self.stages):
            stage.step = self._wrap_step(stage.step, i)  # type: ignore[method-assign]
            for conn in stage_connections(stage):
                conn.recv = self._wrap_recv(conn.recv, i)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        for stage in self.stages:
            del stage.step  # back to the class's methods
            for conn in stage_connections(stage):
                del conn.recv

    def _wrap_step(self, step: Callable, i: int) -> Callable:
        def timed(hidden: torch.Tensor, pos: int) -> torch.Tensor:
            self._acc[i] = 0.0
            t0 = time.perf_counter()
            y = step(hidden, pos)
            self.times[i].append(time.perf_counter() - t0)
            self.busy[i].append(self._acc[i])
            return y
        return timed

    def _wrap_recv(self, recv: Callable, i: int) -> Callable:
        def counted(req_id: int, timeout: float | None = None):
            msg = recv(req_id, timeout)
            busy = msg.fields.get("busy_us")
            acc = self._acc[i]
            self._acc[i] = acc + busy / 1e6 if isinstance(busy, int) and acc is not None else None
            return msg
        return counted

    def reset(self) -> None:
        for t, b in zip(self.times, self.busy):
            t.clear()
            b.clear()


def _next_token(client: ClientModel, hidden: torch.Tensor, keep: list | None) -> int:
    logits = client.logits(hidden)
    if keep is not None:
        keep.append(logits)
    return int(torch.argmax(logits))  # what greedy sampling costs


def run_round(client: ClientModel, session: InferenceSession, ids: list[int], prompt_len: int,
              steps: int, keep_logits: bool = False) -> RoundResult:
    """Prefill ids[:prompt_len], then `steps` decode steps on the following ids."""
    if len(ids) < prompt_len + steps:
        raise ValueError(f"need {prompt_len + steps} ids, got {len(ids)}")
    stages = list(session.stages)
    keep: list | None = [] if keep_logits else None
    gc.collect()
    with _StageTimer(stages) as timer:
        b0 = wire_bytes(stages)
        t0 = time.perf_counter()
        _next_token(client, session.step(client.embed(ids[:prompt_len], 0)), keep)
        prefill = time.perf_counter() - t0
        b1 = wire_bytes(stages)
        timer.reset()
        step_seconds = []
        for pos in range(prompt_len, prompt_len + steps):
            t = time.perf_counter()
            _next_token(client, session.step(client.embed([ids[pos]], pos)), keep)
            step_seconds.append(time.perf_counter() - t)
        b2 = wire_bytes(stages)
    return RoundResult(prefill, step_seconds, [list(t) for t in timer.times], [list(b) for b in timer.busy],
                       b1 - b0, b2 - b1, keep or [])


def run_concurrent(client: ClientModel, sessions: list[InferenceSession], prompts: list[list[int]],
                   steps: int, on_start: Callable[[], None] | None = None) -> dict:
    """One thread per session, all decoding at once after their prefills; tokens/s in total.
    `on_start` runs after the prefills, before the decoding starts."""
    n = len(sessions)
    for session, prompt in zip(sessions, prompts):
        session.step(client.embed(prompt, 0))
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
    """One client drives all sessions in step: each stage gets every session's step at once (sent
    back to back, replies collected after), and ln_f + lm_head run once for all sessions, as a
    client serving several users would. Layer stages only (a head group fans out per block)."""
    n = len(sessions)
    for session, prompt in zip(sessions, prompts):
        session.step(client.embed(prompt, 0))
    if on_start is not None:
        on_start()
    tokens = [p[-1] for p in prompts]
    n_stages = len(sessions[0].stages)
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(steps):
        hidden = [client.embed([tok], s.pos) for tok, s in zip(tokens, sessions)]
        for j in range(n_stages):
            stages = [s.stages[j] for s in sessions]
            if not all(isinstance(st, RemoteLayerStage) for st in stages):
                raise ValueError("lockstep runs drive layer stages only")
            sent = [st.conn.send("step", {"session": st.session, "pos": s.pos, "wire": st.wire}, [h], st.wire)
                    for st, s, h in zip(stages, sessions, hidden)]
            hidden = [check_reply(st.conn, st.conn.recv(req_id, st.timeout), h)
                      for st, req_id, h in zip(stages, sent, hidden)]
        with torch.inference_mode():
            logits = client.head(torch.cat(hidden))[:, -1]
        tokens = logits.argmax(dim=-1).tolist()
        for s in sessions:
            s.pos += 1
    wall = time.perf_counter() - t0
    return {"sessions": n, "tokens": n * steps, "seconds": wall, "aggregate_tps": n * steps / wall,
            "per_session_tps": steps / wall}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]
