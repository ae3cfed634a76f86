"""A stage's session opened again on the same peers and replayed from the history the session
kept, no one struck (Failover's base class; client/failover.py replaces stages on other peers).

A node reclaims a session idle past its timeout: the client then reopens it (`_reopen`) rather
than failing the stage over, unless the `session_closed` came too soon for a reclaim
(`_takes_reclaim`). A head group's failed all-reduce and a step cut short (Ctrl-C) are mended the
same way. In a checking session (client/verify.py) replays matter twice: a stage is judged on
the history its predecessor's replay left, so stages whose caches were built on other inputs are
reopened from it (`_diverged`, `_reopen_from`), and a reclaimed stage's replay is held against
its own earlier outputs (`_contradicts`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .history import History
from .peer_errors import CANNOT_TAKE, PeerError
from .relay import SessionRelay
from .stages import RemoteLayerStage, Stage, idle_clock
from .swarm import Swarm
from .transport import PeerConnection
from .verify import WIRE_TOLERANCE, SpotChecker

log = logging.getLogger(__name__)

# After a failover or a reopen in a checking session, replayed outputs that differ from what the
# next stage was sent by more than this (relative, as spot checks measure) or a tenth of the
# wire's tolerance, whichever is larger, mean the stages after it hold caches built on other
# inputs: they are rebuilt (Failover._replace, Reopening._reopen). Float32 replays of the same
# blocks differ by ~1e-7 to 1e-6 (on a float16 wire, up to ~5e-4: one rounding step); another
# dtype, or a lie, by more.
DIVERGED = 1e-5


# A `session_closed` to a request sent sooner than this after the stage's last answered one, or
# sooner than the idle timeout its node stated when it opened the session, is taken as a fault,
# not as the node reclaiming an idle session (Reopening._takes_reclaim): a node could otherwise
# have the client replay the whole history into it on every other step, and never be struck.
# Nodes whose --idle-timeout is shorter than this reclaim sessions of clients that are merely slow.
RECLAIM_MIN_IDLE = 1.0
# A node may reclaim a session while the request for it waits in its queue (behind another
# session's long batch): the idle time a request saw counts the time its answer took, up to this
# share of the idle timeout (a liar that answers late gains no more), and clocks' drift too.
RECLAIM_SLACK, CLOCK_DRIFT = 0.1, 1e-3


class Reopening:
    """Reopening stages, the base of Failover (whose `_replace`, `_recover_for` and `_replay` it
    uses) and so of InferenceSession. It works on the session's state, set by
    InferenceSession.__init__:"""

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

    def _reopen(self, i: int, reclaimed: bool = True) -> PeerError | None:
        """A new session for stage i on the same peers, replayed from its history; None if that
        worked, else why not (the caller then replaces the stage). `reclaimed`: the node reclaimed
        the old session and the history is the one the stage was stepped with; otherwise the
        history changed (the stage before was redone: `_reopen_from`) and the caller reopens the
        stages after, or the group's all-reduce failed (Mending._after_error), or a step
        was cut short (Mending._settle: its `_unsettled` says which of the two the
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

    def _dtype_of(self, conn: PeerConnection) -> str | None:
        """The dtype a peer states (None: it answered without one, or with one that makes no
        sense; its check gets float32's slack, the strictest: a liar that left it out went
        unchecked). Raises PeerError when it did not answer."""
        known = self.swarm.peers.get(conn.address)
        conn.drain_events()  # (a connection made since the last read: another process, maybe)
        return self.checker.dtype_of(conn.peer_process, known.extra if known else {},
                                     lambda: conn.request("info", timeout=self.swarm.options.timeout).fields)
