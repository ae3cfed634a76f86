"""Failover: a session's stages rebuilt from the history it kept (client/session.py drives it).

For every stage an InferenceSession keeps the hidden states it sent (one row per position so
far). When a stage fails (error reply, disconnect, timeout), announces that it is leaving, or is
found wrong by a spot check, `_replace` bans its peer, plans a replacement for exactly that
stage's blocks (one peer or several) and replays the history into them to rebuild their KV
caches. A session a node reclaimed after its idle timeout is opened again on the same peers and
replayed (`_reopen`), with no ban.

Positions a relayed prefill did not bring back (history.Unkept) are recomputed by the stage
before when a failover needs them (`_recover`).

In a checking session (client/verify.py) replays matter twice: a stage is judged on the history
its predecessor's replay left, so stages whose caches were built on other inputs are reopened
from it (`_diverged`, `_reopen_from`), and a reclaimed stage's replay is held against its own
earlier outputs (`_contradicts`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from nanoswarm.protocol.tensors import WIRE_MAX, abs_max

from .head_group import HeadGroupStage
from .history import History
from .peer_errors import LinkClosed, PeerError
from .relay import SessionRelay
from .route import RouteError, StagePlan
from .stages import RemoteLayerStage, Stage, idle_clock, step_retrying_busy
from .swarm import Swarm
from .transport import PeerConnection
from .verify import WIRE_TOLERANCE, SpotChecker

log = logging.getLogger(__name__)

# Positions per replay step: half the default --max-tokens-per-step. A stage cuts it further to
# the limits its node stated at open (RemoteLayerStage.step), or, refused too_large, in halves.
REPLAY_CHUNK = 512
# After a failover or a reopen in a checking session, replayed outputs that differ from what the
# next stage was sent by more than this (relative, as spot checks measure) or a tenth of the
# wire's tolerance, whichever is larger, mean the stages after it hold caches built on other
# inputs: they are rebuilt (Failover._replace, _reopen). Float32 replays of the same blocks differ
# by ~1e-7 to 1e-6 (on a float16 wire, up to ~5e-4: one rounding step); another dtype, or a lie,
# by more.
DIVERGED = 1e-5


# A `session_closed` to a request sent sooner than this after the stage's last answered one, or
# sooner than the idle timeout its node stated when it opened the session, is taken as a fault,
# not as the node reclaiming an idle session (Failover._takes_reclaim): a node could otherwise
# have the client replay the whole history into it on every other step, and never be struck.
# Nodes whose --idle-timeout is shorter than this reclaim sessions of clients that are merely slow.
RECLAIM_MIN_IDLE = 1.0
# A node may reclaim a session while the request for it waits in its queue (behind another
# session's long batch): the idle time a request saw counts the time its answer took, up to this
# share of the idle timeout (a liar that answers late gains no more), and clocks' drift too.
RECLAIM_SLACK, CLOCK_DRIFT = 0.1, 1e-3


class SessionError(Exception):
    pass


class CallerError(SessionError, ValueError):
    """A step the caller got wrong (past the session's max_length, or hidden states that hold NaN
    or Inf, values past HIDDEN_LIMIT, or do not fit the wire): no peer is blamed, and the session
    goes on. A ValueError, as the other arguments a node would refuse are."""


# Answers to `open`, or to the replay into a new stage or a reopened one, that say a peer cannot
# take this session now (at its session count or KV budget, or a session longer than it takes),
# not that it failed. (`leaving` is not one: that peer is going, and is banned like one that went.)
CANNOT_TAKE = ("busy", "too_large")


def past_float16(hidden: torch.Tensor) -> bool:
    """Whether hidden states pass float16's range, which a float16 node cannot take (its
    `bad_value` for them is a refusal, not a fault)."""
    return abs_max(hidden) > WIRE_MAX["float16"]


class Failover:
    """The failover half of InferenceSession (its base class): replacing, reopening and
    recovering stages. It works on the session's state, set by InferenceSession.__init__:"""

    stages: list[Stage]
    history: list[History]  # per stage, what it was sent
    outputs: History  # the last stage's outputs (checking sessions only)
    swarm: Swarm
    checker: SpotChecker | None
    relaying: SessionRelay
    max_length: int
    pos: int
    failovers: int
    max_failovers: int
    wrong_results: int
    on_failover: Callable[[str], None] | None
    _moved_unstruck: set[str]
    _left_out: dict[str, str]
    _unsettled: dict[Stage, bool]  # stage -> whether its history is the one it was stepped with
    _building: list[Stage]

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
        closed at the next step (`InferenceSession._settle`) or at `close` (review164)."""
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

    def _reopen(self, i: int, reclaimed: bool = True) -> PeerError | None:
        """A new session for stage i on the same peers, replayed from its history; None if that
        worked, else why not (the caller then replaces the stage). `reclaimed`: the node reclaimed
        the old session and the history is the one the stage was stepped with; otherwise the
        history changed (the stage before was redone: `_reopen_from`) and the caller reopens the
        stages after, or the group's all-reduce failed (InferenceSession._after_error), or a step
        was cut short (InferenceSession._settle: its `_unsettled` says which of the two the
        history is), whose history did not change. In a checking session a reclaimed stage's
        replay is held against what it returned before, for the same inputs: differing beyond its
        dtype's and the wire's slack,
        it lied on one of them (else a liar could erase the record of its lies by answering
        `session_closed`), and the error is `wrong_result`; differing at all (`_diverged`), the
        stages after it are reopened too (their caches hold results of its old outputs)."""
        stage = self.stages[i]
        self._recover_for(stage)
        i = self.stages.index(stage)
        diverged = False
        # Until its replay is whole: cut short (Ctrl-C), it is reopened at the next step (`_settle`).
        self._unsettled[stage] = reclaimed and self._unsettled.get(stage, True)
        try:
            stage.close()  # whatever of the old session is left (a head group's other members)
            stage.open(self.max_length)
            if self.history[i].positions:
                out = self._replay(stage, self.history[i].tensor())
                if reclaimed and (diverged := self._diverged(i + 1, out)):
                    wrong = self._contradicts(stage, i + 1, out)
                    if wrong is not None:
                        self.wrong_results += 1
                        self._unsettled.pop(stage, None)  # replaced by the caller
                        return wrong
                    self._unsettled.update(dict.fromkeys(self.stages[i + 1:], False))  # (`_reopen_after` below)
                self._replayed_outputs(i + 1, out)
        except PeerError as e:
            log.info("reopening a session on %s failed: %s", ", ".join(stage.peers), e)
            self._unsettled.pop(stage, None)  # replaced by the caller
            return e
        self._unsettled.pop(stage, None)
        self.relaying.forget_chains()  # they name the old session ids
        self.relaying.retry_before(self.stages, i)
        log.info("reopened a session on %s (%d positions replayed)", ", ".join(stage.peers), self.pos)
        if diverged:
            self._reopen_after(i + 1)
        return None

    def _takes_reclaim(self, stage: Stage, error: PeerError, reopened: set[Stage]) -> bool:
        """Whether `stage`'s `session_closed` (`error`) is taken as its node having reclaimed an
        idle session, to be reopened on the same peers with no strike: once a step (a second
        one in the same step is a fault), and only when the request it answered was sent
        RECLAIM_MIN_IDLE and the idle timeout its node stated after the last one it answered
        (give or take the slack above). Otherwise the caller fails the stage over."""
        if stage in reopened:
            return False
        keeps = max(RECLAIM_MIN_IDLE, stage.idle_timeout)
        idle = stage.asked_at - stage.sent_at  # not until the answer came: a liar could take its time
        slack = min(idle_clock() - stage.asked_at, RECLAIM_SLACK * keeps) + CLOCK_DRIFT * keeps
        if idle + slack < keeps:
            log.info("%s answered session_closed to a request sent %.2f s after its last one (it keeps idle "
                     "sessions %.0f s): a fault, not a reclaim", error.address, idle, keeps)
            return False
        reopened.add(stage)
        return True

    def _contradicts(self, stage: Stage, k: int, out: torch.Tensor) -> PeerError | None:
        """The error for layer stage `stage` if its replayed outputs `out` differ from the ones it
        returned before (stage k's history) by more than its dtype and the wire explain. Not for
        a head group: its sums do not say which member lied, and its checks cover one step, so
        there is no record of earlier lies for a reclaim to erase."""
        if not isinstance(stage, RemoteLayerStage):
            return None
        dtype = self._dtype_of(stage.conn)  # a PeerError: the reopen failed
        slack = self.checker.tolerance(dtype, self.swarm.options.wire)
        diff = self.checker.difference(self.history[k].tensor(), out)
        if diff <= slack:
            return None
        return PeerError(stage.conn.address, "wrong_result",
                         f"layers {stage.start}:{stage.stop} replayed after a reclaimed session differ from what "
                         f"they returned before by {diff:.3g} of their scale (at most {slack:.3g} for the same inputs)")

    def _reopen_after(self, k: int) -> None:
        log.info("a replay's outputs differ from what layers %d: were sent: reopening the stages from there",
                 self.stages[k].start)
        self._reopen_from(k)

    def _reopen_from(self, k: int | None) -> None:
        """Reopen stage k and every stage after it, each replayed from its history (each one's
        outputs become the next one's history), failing over any that fails meanwhile: their
        caches were built on inputs other than the ones their histories now hold."""
        self.relaying.forget_chains()  # they name the old session ids
        if k is not None:  # cut short (Ctrl-C), the rest are reopened at the next step (`_settle`)
            self._unsettled.update(dict.fromkeys(self.stages[k:], False))
        while k is not None:  # each one reopened here: none of them reopens those after it
            stop = self.stages[k].stop
            self._reopen_or_replace(k, reopen_after=False)  # failed: rebuilt elsewhere from the same history
            k = self._after(stop)

    def _reopen_or_replace(self, i: int, reclaimed: bool = False, reopen_after: bool = True) -> int:
        """New sessions for stages[i] on the same peers, replayed from its history (`reclaimed`:
        `_reopen`), no one struck; a peer that fails the reopen is failed over (`reopen_after`:
        `_replace`). The index of the stage to ask next."""
        stage = self.stages[i]
        failed = self._reopen(i, reclaimed=reclaimed)
        if failed is None:
            return self._at(stage.start)
        return self._replace(self.stages.index(stage), failed, reopen_after=reopen_after,
                             strike=failed.code not in CANNOT_TAKE and not self._moved(failed))

    def _diverged(self, k: int, out: torch.Tensor | None) -> bool:
        """Whether `out`, the replayed outputs of the stage before stage k (a replacement, or a
        reopened session) for every position, differ from what stage k was sent, in a checking
        session (checks would judge stage k on them)."""
        if self.checker is None or out is None or k >= len(self.stages):
            return False
        sent = self.history[k]
        if sent.positions != out.shape[1] or sent.first_unkept() is not None:
            return False
        wire = self.swarm.options.wire  # a 16-bit wire rounds values ~1e-7 apart to a step apart
        return self.checker.difference(sent.tensor(), out) > max(DIVERGED, WIRE_TOLERANCE.get(wire, 0.1) / 10)

    def _replayed_outputs(self, i: int, out: torch.Tensor | None) -> None:
        """`out`, the outputs of a replay into the stage before stage i (a replacement, or a
        reopened session), for every position: stage i's history takes them (what it did not
        keep need not be recomputed), and so do the last stage's outputs (self.outputs) when
        there is no stage i. Spot checks compare a stage with these: after a failover they are
        the new peer's own (a check had judged an honest replacement on the old peer's)."""
        if out is None:
            return
        if i < len(self.stages):
            if out.shape[1] == self.history[i].positions:
                self.history[i] = History.of(out)
            elif self.history[i].first_unkept() is not None:
                self.history[i].recovered(0, out)
        elif self.checker is not None and out.shape[1] == self.outputs.positions:
            self.outputs = History.of(out)

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

    def _dtype_of(self, conn: PeerConnection) -> str | None:
        """The dtype a peer states (None: it answered without one, or with one that makes no
        sense; its check gets float32's slack, the strictest: a liar that left it out went
        unchecked). Raises PeerError when it did not answer."""
        known = self.swarm.peers.get(conn.address)
        return self.checker.dtype_of(conn.address, known.extra if known else {},
                                     lambda: conn.request("info", timeout=self.swarm.options.timeout).fields)

    def _after(self, block: int) -> int | None:
        """The index of the stage that starts at `block`, None past the last block."""
        return next((k for k, s in enumerate(self.stages) if s.start == block), None)

    def _at(self, block: int) -> int:
        """The index of the stage that starts at `block` (failover may have changed indices)."""
        return next(k for k, s in enumerate(self.stages) if s.start == block)
