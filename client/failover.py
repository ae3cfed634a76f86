"""Failover: a session's stages rebuilt on other peers from the history it kept (client/session.py
drives it).

For every stage an InferenceSession keeps the hidden states it sent (one row per position so
far). When a stage fails (error reply, disconnect, timeout), announces that it is leaving, or is
found wrong by a spot check, `_replace` bans its peer, plans a replacement for exactly that
stage's blocks (one peer or several) and replays the history into them to rebuild their KV
caches. A session a node reclaimed after its idle timeout is opened again on the same peers and
replayed, with no ban (client/reopen.py, the base class).

Positions a relayed prefill did not bring back (history.Unkept) are recomputed by the stage
before when a failover needs them (`_recover`).
"""

from __future__ import annotations

import logging
import time

import torch

from nanoswarm.protocol.tensors import WIRE_MAX, abs_max

from .head_group import HeadGroupStage
from .history import History
from .peer_errors import CANNOT_TAKE, LinkClosed, PeerError
from .reopen import Reopening
from .route import RouteError, StagePlan
from .stages import RemoteLayerStage, Stage, step_retrying_busy

log = logging.getLogger(__name__)

# Positions per replay step: half the default --max-tokens-per-step. A stage cuts it further to
# the limits its node stated at open (RemoteLayerStage.step), or, refused too_large, in halves.
REPLAY_CHUNK = 512


class SessionError(Exception):
    pass


class CallerError(SessionError, ValueError):
    """A step the caller got wrong (past the session's max_length, or hidden states that hold NaN
    or Inf, values past HIDDEN_LIMIT, or do not fit the wire): no peer is blamed, and the session
    goes on. A ValueError, as the other arguments a node would refuse are."""


def past_float16(hidden: torch.Tensor) -> bool:
    """Whether hidden states pass float16's range, which a float16 node cannot take (its
    `bad_value` for them is a refusal, not a fault)."""
    return abs_max(hidden) > WIRE_MAX["float16"]


class Failover(Reopening):
    """The failover half of InferenceSession (its base class): replacing stages and recovering
    their histories; reopening them on the same peers is its base's (`Reopening`)."""

    def _replace(self, i: int, error: PeerError, strike: bool = True, reopen_after: bool = True) -> int:
        """Swap stage i for fresh stages over the same blocks, rebuilt from its history; returns
        the index of the first of them. Without `strike` the peer that said `error` is only left
        out of this replacement (it could not take the session: CANNOT_TAKE). In a checking
        session whose replacement's outputs differ from what the next stage was sent (`DIVERGED`:
        the old peer ran another dtype, or lied unseen), the stages after it are reopened from the
        new outputs unless `reopen_after` is off: judged on outputs they were never sent, honest
        ones were banned as wrong."""
        old = self.stages[i]
        refused: dict[str, str] = dict(self._left_out)  # peers that cannot take this session's inputs
        try:
            old.close()  # before the ban closes its socket: a live peer frees the KV cache at once
        finally:  # struck even if the close is cut short (Ctrl-C): a liar would go on unbanned (review166)
            if strike:
                self._strike(error)
            else:
                refused[error.address] = f"{error.code}: {error.message}"
        t0 = time.perf_counter()
        self._recover_for(old)
        i = self.stages.index(old)
        while True:
            try:
                plans = self.swarm.plan(old.start, old.stop, self.max_length, refused)
            except RouteError as e:
                raise SessionError(f"{e} (after {error.address} failed: {error.code})") from e
            try:
                new_stages, new_history, out = self._rebuild(plans, self.history[i])
                self.stages[i:i + 1] = new_stages
                self.history[i:i + 1] = new_history
                self._building.clear()  # (`_rebuild`)
                break
            except PeerError as e:  # the replacement failed or refused too: plan again without it
                if e.code == "bad_value" and self.history[i].positions and past_float16(self.history[i].tensor()):
                    refused[e.address] = self._left_out[e.address] = f"{e.code}: {e.message}"
                else:
                    self._refused_or_strike(e, refused)
        k = i + len(new_stages)
        diverged = reopen_after and self._diverged(k, out)
        if diverged:  # (reopened below: `_reopen_after`; cut short, at the next step)
            self._unsettled.update(dict.fromkeys(self.stages[k:], False))
        self._replayed_outputs(k, out)
        self.relaying.retry_before(self.stages, i)
        ms = (time.perf_counter() - t0) * 1000
        heads = next((f" heads {h[0]}:{h[1]}" for conn, h in getattr(old, "members", ())
                      if conn.address == error.address), "")  # a head group's member: which heads it held
        notice = (f"failover: {error.address} (layers {old.start}:{old.stop}{heads}) {error.code} ({error.message}); "
                  f"replayed {self.pos} positions to {', '.join(p for s in new_stages for p in s.peers)} "
                  f"in {ms:.0f} ms")
        self._announce(notice)
        if diverged:
            self._reopen_after(k)
        return i

    def _replace_unreopened(self, i: int, failed: PeerError, error: PeerError) -> int:
        """Replace stage i, whose reclaimed session (`error`) could not be reopened (`failed`). A
        peer that filled up meanwhile (CANNOT_TAKE) is not struck, once a session: one that keeps
        reclaiming and refusing is a fault after that (two such peers would pass the stage back
        and forth without end). One whose replay contradicted its earlier outputs is struck for
        that (`wrong_result`)."""
        if failed.code in CANNOT_TAKE and failed.address not in self._moved_unstruck:
            self._moved_unstruck.add(failed.address)
            return self._replace(i, failed, strike=False)
        if self._moved(failed):
            return self._replace(i, failed, strike=False)
        return self._replace(i, failed if failed.code == "wrong_result" else error)

    def _rebuild(self, plans: list[StagePlan],
                 history: History) -> tuple[list[Stage], list[History], torch.Tensor | None]:
        """New stages for `plans`, each replayed into from `history`; with the last one's output
        for every position (None when there are none). Till the caller puts them on the route
        they are `_building`: a failover cut short (Ctrl-C) right after this returns has them
        closed at the next step (`Mending._settle`) or at `close` (review164)."""
        hidden = history.tensor() if history.positions else None
        histories = []
        stages = self._building  # (one list, kept: the session's finalizer holds it too)
        stages.clear()
        try:
            for plan in plans:
                stage = self.swarm.make_stage(plan)
                stages.append(stage)
                stage.open(self.max_length)
                histories.append(History.of(hidden))
                if hidden is not None:
                    hidden = self._replay(stage, hidden)
        except BaseException:  # a refusal, or Ctrl-C: each holds a KV reservation on its node
            for stage in stages:
                stage.close()
            stages.clear()
            raise
        return list(stages), histories, hidden

    def _strike(self, e: PeerError) -> None:
        self.failovers += 1
        if self.failovers > self.max_failovers:
            raise SessionError(f"gave up after {self.max_failovers} failovers; last: {e}") from e
        ban = self.swarm.bans.get(e.address)
        if ban is not None and ban.until > time.monotonic() or isinstance(e, LinkClosed):
            return  # banned already (another session's failover dropped the link): one fault, one strike
        self.swarm.ban(e.address, f"{e.code}: {e.message}", e.code)

    def _refused_or_strike(self, e: PeerError, refused: dict[str, str]) -> None:
        """A peer that cannot take this session now (CANNOT_TAKE: full, or too short), or that serves
        other blocks or heads than the table said (`_moved`), is left out of this planning, with no ban
        and no failover counted: it is honest, and other sessions may still use it. Anything else is a
        fault (_strike), announced as every failover is (a peer killed while the session opened was
        counted in `failovers` but never named)."""
        if e.address not in refused and (e.code in CANNOT_TAKE or self._moved(e)):
            refused[e.address] = f"{e.code}: {e.message}"
            log.info("peer %s", e)
        else:
            self._strike(e)
            # with why: the one line the user sees of a peer that cost the session's start its wait
            self._announce(f"failover: {e.address} {e.code} before it served this session a step ({e.message}); "
                           "planned without it")

    def _moved(self, e: PeerError) -> bool:
        """Whether `e`, an answer to an `open`, says only that the peer serves other blocks, heads
        or model than the table said (PeerTable.moved), which is no fault of its own: it restarted
        with others (review120: struck, such a member stayed banned while it served the wanted
        heads again)."""
        return self.swarm.moved(e)

    def _announce(self, notice: str) -> None:
        if self.on_failover:  # the user's own notice (the CLI's stderr line): not logged twice
            log.info(notice)
            self.on_failover(notice)
        else:
            log.warning(notice)

    def _recover_for(self, stage: Stage) -> None:
        """Make `stage`'s history whole (_recover). An earlier stage that fails meanwhile is failed
        over like any other (that may replace stages before `stage` and change its index)."""
        reopened = set()
        while True:
            i = self.stages.index(stage)
            try:
                return self._recover(i)
            except PeerError as e:
                j = next((k for k in range(i) if e.address in self.stages[k].peers), None)
                if j is None:
                    raise
                failing = self.stages[j]
                if e.code == "session_closed" and self._takes_reclaim(failing, e, reopened):
                    failed = self._reopen(j)
                    if failed is None:
                        continue
                    self._replace_unreopened(self.stages.index(failing), failed, e)  # a failed reopen may move it
                    continue
                self._replace(self.stages.index(failing), e)

    def _recover(self, i: int) -> None:
        """Recompute the positions of stage i's history that a relayed prefill did not bring back
        (history.Unkept). The stage before holds them: it is asked for them again from the first
        one on (rewind: it drops them and computes the same values again), after its own history
        is made whole. Raises PeerError when that stage fails."""
        start = self.history[i].first_unkept()
        if start is None:
            return
        before = self.stages[i - 1] if i > 0 else None
        if not isinstance(before, RemoteLayerStage):  # unkept positions come only from relayed steps
            raise SessionError(f"internal: stage {i} has unkept positions but no layer stage before it")
        self._recover(i - 1)
        t0 = time.perf_counter()
        try:
            out = self._replay(before, self.history[i - 1].tensor()[:, start:], start, rewind=True)
        except PeerError:
            raise
        except BaseException:
            # Cut short (Ctrl-C): the stage before holds part of the replay, and would refuse the
            # next step `bad_position` (review164): stage i is reopened at the next step (`_settle`),
            # which recovers its history again first. (A closed one is a failover's, which the
            # next step goes on with: reopened, it would fail and count the failover twice.)
            if not self.stages[i].closed:
                self._unsettled.setdefault(self.stages[i], False)
            raise
        self.history[i].recovered(start, out)
        log.info("recomputed positions %d.. of layers %d:%d on %s in %.0f ms", start, before.start, before.stop,
                 before.conn.address, (time.perf_counter() - t0) * 1000)

    @staticmethod
    def _replay(stage: Stage, hidden: torch.Tensor, start: int = 0, rewind: bool = False) -> torch.Tensor:
        """Positions start.. of `hidden` into `stage`, in pieces; its output. With `rewind` the stage
        drops what it holds from `start` on first. A head group is replayed by fan-out: an
        all-reduce that failed midway would blame no one, and leave the replay's new stage to be
        struck for it (review128); it all-reduces again from the next step."""
        fan_out = isinstance(stage, HeadGroupStage) and stage.all_reduce
        if fan_out:
            stage.all_reduce = False
        try:
            outs = [step_retrying_busy(stage, hidden[:, a:a + REPLAY_CHUNK], start + a, rewind)
                    for a in range(0, hidden.shape[1], REPLAY_CHUNK)]
        finally:
            if fan_out:
                stage.all_reduce = stage.wants_all_reduce
        return torch.cat(outs, dim=1)

    def _after(self, block: int) -> int | None:
        """The index of the stage that starts at `block`, None past the last block."""
        return next((k for k, s in enumerate(self.stages) if s.start == block), None)

    def _at(self, block: int) -> int:
        """The index of the stage that starts at `block` (failover may have changed indices)."""
        return next(k for k, s in enumerate(self.stages) if s.start == block)
