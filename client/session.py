"""An inference session: hidden states through a route's stages, with failover.

For every stage the session keeps the hidden states it sent (one row per position so far). When a
stage fails (error reply, disconnect, timeout) or announces that it is leaving, the session bans
its peer, plans a replacement for exactly that stage's blocks (one peer or several), replays the
history into them to rebuild their KV caches, and carries on with the same step. Positions and
sampling state live outside the stages, so the tokens are those of a run without the failure.

Consecutive layer stages are driven by relay (client/relay.py): one request, the nodes pass the
step along, and the result of a decode step carries every hop's output for the history. A
prefill's does not (it would cross every link again): those positions are recomputed by the stage
before when a failover needs them (`_recover`). A relayed step that breaks off is done again one
stage at a time, the stages redoing the position if they hold it.

With spot checks on (client/verify.py) the session does not relay, and after a share of the steps
redoes one stage's work itself (`_spot_check`); a stage found wrong is failed over and every stage
after it rebuilt from the client's own outputs. Replays then matter twice: a stage is judged on
the history its predecessor's replay left, so stages whose caches were built on other inputs are
reopened from it (`_diverged`), and a reclaimed stage's replay is held against its own earlier
outputs (`_reopen`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from nanoswarm.protocol.tensors import fits_wire

from .history import History, Unkept
from .relay import Chain, ChainBroken, SessionRelay, stalled_stage
from .route import RouteError
from .stages import BUSY_RETRIES, HeadGroupStage, RemoteLayerStage, Stage, busy_pause, step_retrying_busy
from .swarm import Swarm
from .transport import PeerConnection, PeerError
from .verify import WIRE_TOLERANCE

log = logging.getLogger(__name__)

# A relayed step of up to this many positions brings back every hop's output (client/relay.py):
# 3 KB a hop for a decode step of the GPT-2-small shape. A longer one (a prefill) brings back only
# the last: 384 KB a hop for a 128-token prompt, re-encrypted at every link, made prefill through
# 4 relayed stages slower than stage by stage (docs/performance.md).
TRAIL_MAX_POSITIONS = 32
# Positions per replay step: half the default --max-tokens-per-step; a node with a lower limit
# refuses the step too_large and it is sent again in halves.
REPLAY_CHUNK = 512
# After a failover or a reopen in a checking session, replayed outputs that differ from what the
# next stage was sent by more than this (relative, as spot checks measure) or a tenth of the
# wire's tolerance, whichever is larger, mean the stages after it hold caches built on other
# inputs: they are rebuilt (InferenceSession._replace, _reopen). Float32 replays of the same
# blocks differ by ~1e-7 to 1e-6 (on a float16 wire, up to ~5e-4: one rounding step); another
# dtype, or a lie, by more.
DIVERGED = 1e-5


class SessionError(Exception):
    pass


# Answers to `open`, or to the replay into a new stage or a reopened one, that say a peer cannot
# take this session now (at its session count or KV budget, or a session longer than it takes),
# not that it failed. (`leaving` is not one: that peer is going, and is banned like one that went.)
CANNOT_TAKE = ("busy", "too_large")


class InferenceSession:
    def __init__(self, stages: list[Stage], max_length: int, swarm: Swarm | None = None,
                 max_failovers: int = 8, on_failover: Callable[[str], None] | None = None):
        self.stages = stages
        self.max_length = max_length
        self.swarm = swarm
        self.max_failovers = max_failovers
        self.on_failover = on_failover  # callable(str) for the user's one-line notice
        self.history: list[History] = [History() for _ in stages]  # per stage, what it was sent
        self.pos = 0
        self.failovers = 0
        # Spot checks need every stage's outputs from the stage itself: a relayed step brings the
        # earlier hops' outputs back through the later hops, which could alter them (and so have
        # an honest node blamed), and a relayed prompt's not at all (client/verify.py).
        self.relaying = SessionRelay(swarm is not None and swarm.options.relay and swarm.checker is None,
                                     swarm.options.timeout if swarm is not None else 0.0)
        self._moved_unstruck: set[str] = set()  # peers replaced without a strike (_replace_unreopened)
        self.checker = swarm.checker if swarm is not None else None
        if swarm is not None and swarm.options.verify and self.checker is None:
            raise ValueError("SwarmOptions.verify needs the client's own blocks: connect with SwarmModel.connect")
        self.outputs = History()  # the last stage's outputs, for spot checks of it (client/verify.py)
        self.spot_checks = 0
        self.wrong_results = 0  # spot checks a stage failed (each failed over)

    @classmethod
    def open(cls, swarm: Swarm, max_length: int, **kwargs) -> InferenceSession:
        """Open a session on a route over all blocks; a peer that cannot take it (CANNOT_TAKE) is
        left out, one that fails is banned, and the rest of the route is planned again without it."""
        session = cls([], max_length, swarm, **kwargs)
        try:
            session._open_route(max_length)
            if session.relay:
                session.relaying.pin(session.stages)  # now, not in the prompt's step
        except BaseException:  # close what was opened: each holds a KV reservation on its node
            session.close()
            raise
        return session

    def _open_route(self, max_length: int) -> None:
        pos, refused = 0, {}
        while pos < self.swarm.n_layer:
            plan = self.swarm.plan(pos, max_length=max_length, refused=refused)[0]
            stage = None
            try:
                stage = self.swarm.make_stage(plan)
                stage.open(max_length)
            except PeerError as e:  # planned again without that peer
                if stage is not None:
                    stage.close()
                self._refused_or_strike(e, refused)
                continue
            self.stages.append(stage)
            self.history.append(History())
            pos = plan.stop

    def _refused_or_strike(self, e: PeerError, refused: dict[str, str]) -> None:
        """A peer that cannot take this session now (CANNOT_TAKE: full, or too short) is left out
        of this planning, with no ban and no failover counted: it is honest, and other sessions
        may still use it. Anything else is a fault (_strike)."""
        if e.code in CANNOT_TAKE and e.address not in refused:
            refused[e.address] = f"{e.code}: {e.message}"
            log.info("peer %s", e)
        else:
            self._strike(e)

    def _strike(self, e: PeerError) -> None:
        self.failovers += 1
        if self.failovers > self.max_failovers:
            raise SessionError(f"gave up after {self.max_failovers} failovers; last: {e}") from e
        ban = self.swarm.bans.get(e.address)
        if ban is not None and ban.until > time.monotonic():
            return  # banned already (another session's failover dropped the link): one fault, one strike
        self.swarm.ban(e.address, f"{e.code}: {e.message}")

    @property
    def relay(self) -> bool:
        """Whether consecutive layer stages pass this session's steps on (client/relay.py)."""
        return self.relaying.on

    def describe(self) -> list[dict]:
        return [s.describe() for s in self.stages]

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Positions pos..pos+T-1 through every stage; returns the last stage's output."""
        T = hidden.shape[1]
        if self.pos + T > self.max_length:
            raise SessionError(f"session is full: {self.pos + T} positions > max_length {self.max_length}")
        if T > 1 and self.swarm is not None and not fits_wire(hidden, self.swarm.options.wire):
            # Checked first for a step a stage may send in pieces (a refused half, a head group's
            # pieces): a bad later piece would leave an earlier one stored. A one-position step
            # (the per-token path) is checked only if a node refuses it, below.
            raise SessionError(self._unfit(self.stages[0]))
        i, busy_retries, reopened = 0, 0, set()
        relay, rewind = self.relay, set()  # rewind: stages that may hold this position already
        self.relaying.new_step()
        while i < len(self.stages):
            stage = self.stages[i]
            if self.relaying.dropped is not None:  # a stage's connection dropped while pinning
                (dropped, error), self.relaying.dropped = self.relaying.dropped, None
                if dropped in self.stages:
                    self._replace(self.stages.index(dropped), error)
                    i = self._at(stage.start)  # a replacement starts where the stage it replaced did
                continue
            if self.swarm is not None and stage.leaving:
                i = self._replace(i, PeerError(stage.leaving_peer, "leaving", "peer announced it is leaving"))
                continue
            chain = self.relaying.chain(self.stages, i) if relay else None
            if chain is not None and T > TRAIL_MAX_POSITIONS and T > chain.max_untrailed(hidden.shape[2]):
                chain = None  # a node takes fewer positions a step: stage by stage, in pieces
            if chain is not None:
                trail = T <= TRAIL_MAX_POSITIONS
                # A prefill's hops each compute for a while: each gets the time a stage step gets.
                timeout = self.swarm.options.timeout * (1 if trail else len(chain.stages))
                try:
                    outputs = chain.step(hidden, self.pos, timeout, trail)
                except ChainBroken as e:
                    relay = False  # the rest of this step one stage at a time
                    rewind.update(chain.stages)
                    self._chain_broken(chain, e.error)
                    i = self._at(stage.start)  # failover may have replaced stages before it too
                    continue
                self.history[i].append(hidden, T)
                for k in range(1, len(chain.stages)):
                    self.history[i + k].append(outputs[k - 1] if trail else Unkept(T), T)
                hidden, i = outputs[-1], i + len(chain.stages)
                continue
            try:
                out = stage.step(hidden, self.pos, rewind=stage in rewind)
            except PeerError as e:
                if self.swarm is None:
                    raise
                if e.code == "bad_value" and not fits_wire(hidden, self.swarm.options.wire):
                    # The caller's input, not the peer: nothing to fail over, and the node left the
                    # session as it was.
                    raise SessionError(f"{self._unfit(stage)} ({e.message})") from e
                if e.code == "busy" and busy_retries < BUSY_RETRIES and not stage.retries_busy:
                    # An overloaded peer left the session as it was: wait a little and ask again
                    # before giving its blocks to someone else.
                    busy_retries += 1
                    busy_pause(busy_retries)
                    if isinstance(stage, RemoteLayerStage):
                        rewind.add(stage)  # a split step's first half may be stored (step_retrying_busy)
                    continue
                if e.code == "session_closed" and stage not in reopened:
                    # The node reclaimed our session after its idle timeout (the reader paused):
                    # nothing failed. Open a new one there, rebuilt from the history, no strike.
                    reopened.add(stage)
                    failed = self._reopen(i)
                    if failed is None:
                        i = self._at(stage.start)
                        continue
                    # A failed reopen may have replaced stages before this one: its index moved.
                    i = self._replace_unreopened(self.stages.index(stage), failed, e)
                    continue
                i = self._replace(self.stages.index(stage), e)
                continue
            self.history[i].append(hidden, T)
            hidden = out
            i += 1
        self.pos += T
        if self.checker is not None:
            self.outputs.append(hidden, T)
            try:
                if self.checker.due():
                    hidden = self._spot_check(T, hidden)
            finally:
                for stage in self.stages:  # a step's partials serve only its own check
                    if isinstance(stage, HeadGroupStage) and stage.record is not None:
                        stage.record.drop_step()
        return hidden

    def _spot_check(self, T: int, hidden: torch.Tensor) -> torch.Tensor:
        """Redo one random stage's work here (client/verify.py): a layer stage's for every position
        so far, a head group's members' for this step. Returns this step's output, redone from
        that stage on if the stage's was wrong."""
        checkable = [k for k, s in enumerate(self.stages) if isinstance(s, RemoteLayerStage)
                     or isinstance(s, HeadGroupStage) and s.record is not None and s.record.has_step]
        if not checkable:
            return hidden
        stage = self.stages[self.checker.pick(checkable)]
        group = isinstance(stage, HeadGroupStage)
        try:  # the tolerance follows the dtypes the peers state
            dtypes = [self._dtype_of(conn) for conn in ([c for c, _ in stage.members] if group else [stage.conn])]
        except PeerError as e:
            # A peer that does not answer (or answers with an error) is failed over like one whose
            # step failed. Judged on float32's slack instead, an honest bfloat16 node was banned as
            # wrong (a review); left unchecked, a liar that never answers `info` would never be checked.
            self._replace(self.stages.index(stage), e)
            return self.outputs.tensor()[:, -T:]  # redone if the replacement's outputs differ
        self._recover_for(stage)  # its inputs, whole
        i = self.stages.index(stage)
        reference = None  # the stage's right outputs for every position, once computed
        if group:
            error = self.checker.wrong_member(stage, dtypes, self.swarm.options.wire)
        else:
            error, reference = self._wrong_layers(i, stage, dtypes[0])
            if stage not in self.stages:  # it failed while its outputs were recovered, and was failed over
                return hidden
            i = self.stages.index(stage)
        self.spot_checks += 1
        if error is None:
            return hidden
        self.wrong_results += 1
        if reference is None:
            reference = self.checker.reference(stage.start, stage.stop, self.history[i].tensor())
        return self._redo_after_wrong(i, error, reference)[:, -T:]

    def _wrong_layers(self, i: int, stage: RemoteLayerStage,
                      dtype: str | None) -> tuple[PeerError | None, torch.Tensor | None]:
        """Stage i's outputs for every position so far against the client's own: the error to fail
        it over with if they differ beyond what its `dtype` and the wire explain, and the client's."""
        last = i + 1 == len(self.stages)
        if not last:
            self._recover_for(self.stages[i + 1])  # its outputs, whole (asked of the stage itself)
            if stage not in self.stages:
                return None, None
            i = self.stages.index(stage)
        reference = self.checker.reference(stage.start, stage.stop, self.history[i].tensor())
        got = self.outputs.tensor() if last else self.history[i + 1].tensor()
        return self.checker.judge(stage.conn.address, f"layers {stage.start}:{stage.stop}", dtype,
                                  self.swarm.options.wire, self.checker.difference(reference, got)), reference

    def _dtype_of(self, conn: PeerConnection) -> str | None:
        """The dtype a peer states (None: it answered without one, or with one that makes no
        sense; its check gets float32's slack, the strictest: a liar that left it out went
        unchecked). Raises PeerError when it did not answer."""
        known = self.swarm.peers.get(conn.address)
        return self.checker.dtype_of(conn.address, known.extra if known else {},
                                     lambda: conn.request("info", timeout=self.swarm.options.timeout).fields)

    def _redo_after_wrong(self, i: int, error: PeerError, reference: torch.Tensor) -> torch.Tensor:
        """Stage i computed wrong: ban its peer, give its blocks to others, and rebuild every stage
        after it from the right inputs (the client's own `reference`; their caches hold the wrong
        ones), failing over any that fails meanwhile. Returns the last stage's output for every
        position."""
        stop = self.stages[i].stop
        self._replace(i, error, reopen_after=False)  # reopened here, from the client's own outputs
        k = self._after(stop)
        if k is None:
            return reference
        self.history[k] = History.of(reference)
        self._reopen_from(k)
        return self.outputs.tensor()

    def _reopen_from(self, k: int | None) -> None:
        """Reopen stage k and every stage after it, each replayed from its history (each one's
        outputs become the next one's history), failing over any that fails meanwhile: their
        caches were built on inputs other than the ones their histories now hold."""
        self.relaying.forget_chains()  # they name the old session ids
        while k is not None:  # each one reopened here: none of them reopens those after it
            stage = self.stages[k]
            failed = self._reopen(k, reclaimed=False)
            if failed is not None:  # its blocks to other peers, rebuilt from the same history
                self._replace(self.stages.index(stage), failed, strike=failed.code not in CANNOT_TAKE,
                              reopen_after=False)
            k = self._after(stage.stop)

    def _after(self, block: int) -> int | None:
        """The index of the stage that starts at `block`, None past the last block."""
        return next((k for k, s in enumerate(self.stages) if s.start == block), None)

    def _at(self, block: int) -> int:
        """The index of the stage that starts at `block` (failover may have changed indices)."""
        return next(k for k, s in enumerate(self.stages) if s.start == block)

    def _chain_broken(self, chain: Chain, error: PeerError) -> None:
        """A relayed step did not come back; its stages will be asked one by one. A node that will
        not relay is not asked again (not_served: it does not know the next hop; relay_failed: it
        could not reach it). A dropped stage is replaced now (its drop was seen once, while
        waiting for the chain); after a timeout, the stage that does not answer `info` is
        (stalled_stage).
        Other errors show again when the stage is asked alone, and are handled there."""
        by = next((s for s in chain.stages if error.address in s.peers), None)
        if error.code in ("relay_failed", "not_served") and by is not None:
            self.relaying.refused(by)
        elif error.code == "disconnected" and by is not None:
            self._replace(self.stages.index(by), error)
        elif error.code == "timeout":
            stalled = stalled_stage(chain.stages, self.swarm.options.timeout)
            if stalled is not None:
                self._replace(self.stages.index(stalled[0]), stalled[1])

    def _unfit(self, stage: Stage) -> str:
        return (f"hidden states for layers {stage.start}:{stage.stop} hold NaN or Inf, or do not fit the "
                f"{self.swarm.options.wire} wire")

    def _reopen(self, i: int, reclaimed: bool = True) -> PeerError | None:
        """A new session for stage i on the same peers, replayed from its history; None if that
        worked, else why not (the caller then replaces the stage). `reclaimed`: the node reclaimed
        the old session and the history is the one the stage was stepped with; otherwise the
        history changed (the stage before was redone: `_reopen_from`) and the caller reopens the
        stages after. In a checking session a reclaimed stage's replay is held against what it
        returned before, for the same inputs: differing beyond its dtype's and the wire's slack,
        it lied on one of them (else a liar could erase the record of its lies by answering
        `session_closed`), and the error is `wrong_result`; differing at all (`_diverged`), the
        stages after it are reopened too (their caches hold results of its old outputs)."""
        stage = self.stages[i]
        self._recover_for(stage)
        i = self.stages.index(stage)
        diverged = False
        try:
            stage.close()  # whatever of the old session is left (a head group's other members)
            stage.open(self.max_length)
            if self.history[i].positions:
                out = self._replay(stage, self.history[i].tensor())
                if reclaimed and (diverged := self._diverged(i + 1, out)):
                    wrong = self._contradicts(stage, i + 1, out)
                    if wrong is not None:
                        self.wrong_results += 1
                        return wrong
                self._replayed_outputs(i + 1, out)
        except PeerError as e:
            log.info("reopening a session on %s failed: %s", ", ".join(stage.peers), e)
            return e
        self.relaying.forget_chains()  # they name the old session ids
        self.relaying.retry_before(self.stages, i)
        log.info("reopened a session on %s (%d positions replayed)", ", ".join(stage.peers), self.pos)
        if diverged:
            self._reopen_after(i + 1)
        return None

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

    def _replace_unreopened(self, i: int, failed: PeerError, error: PeerError) -> int:
        """Replace stage i, whose reclaimed session (`error`) could not be reopened (`failed`). A
        peer that filled up meanwhile (CANNOT_TAKE) is not struck, once a session: one that keeps
        reclaiming and refusing is a fault after that (two such peers would pass the stage back
        and forth without end). One whose replay contradicted its earlier outputs is struck for
        that (`wrong_result`)."""
        if failed.code in CANNOT_TAKE and failed.address not in self._moved_unstruck:
            self._moved_unstruck.add(failed.address)
            return self._replace(i, failed, strike=False)
        return self._replace(i, failed if failed.code == "wrong_result" else error)

    def _replace(self, i: int, error: PeerError, strike: bool = True, reopen_after: bool = True) -> int:
        """Swap stage i for fresh stages over the same blocks, rebuilt from its history; returns
        the index of the first of them. Without `strike` the peer that said `error` is only left
        out of this replacement (it could not take the session: CANNOT_TAKE). In a checking
        session whose replacement's outputs differ from what the next stage was sent (`DIVERGED`:
        the old peer ran another dtype, or lied unseen), the stages after it are reopened from the
        new outputs unless `reopen_after` is off: judged on outputs they were never sent, honest
        ones were banned as wrong."""
        old = self.stages[i]
        old.close()  # before the ban closes its socket: a live peer frees the KV cache at once
        refused: dict[str, str] = {}
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
                break
            except PeerError as e:  # the replacement failed or refused too: plan again without it
                self._refused_or_strike(e, refused)
        self.stages[i:i + 1] = new_stages
        self.history[i:i + 1] = new_history
        k = i + len(new_stages)
        diverged = reopen_after and self._diverged(k, out)
        self._replayed_outputs(k, out)
        self.relaying.retry_before(self.stages, i)
        ms = (time.perf_counter() - t0) * 1000
        notice = (f"failover: {error.address} (layers {old.start}:{old.stop}) {error.code}; "
                  f"replayed {self.pos} positions to {', '.join(p for s in new_stages for p in s.peers)} "
                  f"in {ms:.0f} ms")
        if self.on_failover:  # the user's own notice (the CLI's stderr line): not logged twice
            log.info(notice)
            self.on_failover(notice)
        else:
            log.warning(notice)
        if diverged:
            self._reopen_after(k)
        return i

    def _reopen_after(self, k: int) -> None:
        log.info("a replay's outputs differ from what layers %d: were sent: reopening the stages from there",
                 self.stages[k].start)
        self._reopen_from(k)

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

    def _rebuild(self, plans, history: History) -> tuple[list[Stage], list[History], torch.Tensor | None]:
        """New stages for `plans`, each replayed into from `history`; with the last one's output
        for every position (None when there are none)."""
        hidden = history.tensor() if history.positions else None
        stages, histories = [], []
        try:
            for plan in plans:
                stage = self.swarm.make_stage(plan)
                stages.append(stage)
                stage.open(self.max_length)
                histories.append(History.of(hidden))
                if hidden is not None:
                    hidden = self._replay(stage, hidden)
        except PeerError:
            for stage in stages:
                stage.close()
            raise
        return stages, histories, hidden

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
                if e.code == "session_closed" and failing not in reopened:
                    reopened.add(failing)
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
        out = self._replay(before, self.history[i - 1].tensor()[:, start:], start, rewind=True)
        self.history[i].recovered(start, out)
        log.info("recomputed positions %d.. of layers %d:%d on %s in %.0f ms", start, before.start, before.stop,
                 before.conn.address, (time.perf_counter() - t0) * 1000)

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

    @staticmethod
    def _replay(stage: Stage, hidden: torch.Tensor, start: int = 0, rewind: bool = False) -> torch.Tensor:
        """Positions start.. of `hidden` into `stage`, in pieces; its output. With `rewind` the stage
        drops what it holds from `start` on first."""
        outs = [step_retrying_busy(stage, hidden[:, a:a + REPLAY_CHUNK], start + a, rewind)
                for a in range(0, hidden.shape[1], REPLAY_CHUNK)]
        return torch.cat(outs, dim=1)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
