"""What a step does when something goes wrong (InferenceSession's base class; client/session.py
steps): a stage's error reply or failure (`_after_error`: the caller's input refused, a busy
node asked again, a reclaimed session reopened, else a failover), a relayed step that did not
come back (`_chain_broken`), and a step cut short by Ctrl-C, which did not happen (`_undo_step`)
and is mended before the next one (`_settle`)."""

from __future__ import annotations

import logging

import torch

from nanoswarm.protocol.tensors import fits_wire

from .failover import CallerError, past_float16
from .head_group import AllReduceFailed, HeadGroupStage
from .peer_errors import PeerError
from .relay import RELAY_STALLS, Chain, stalled_stage
from .spot_checks import SpotChecks
from .stages import BUSY_RETRIES, HIDDEN_LIMIT, RemoteLayerStage, Stage, busy_pause, takes_input

log = logging.getLogger(__name__)

# Errors of a relayed step that a hop may cause by what it passes on: a malformed result (the
# client's bad_reply), or a next hop refusing what it got (a bad_value only if the client's own
# input was fine).
PASSED_ON_WRONG = ("bad_reply", "bad_shape", "bad_tensor", "malformed")


class Mending(SpotChecks):
    """A session's steps mended: failed stages handed to failover (the base classes), relayed
    steps that broke done stage by stage, steps cut short undone and settled. Its state is
    InferenceSession's (declared in `Reopening`), and `_rewind_next`: a step was cut short."""

    _rewind_next: bool

    def _undo_step(self, pos: int) -> None:
        """A step cut short (Ctrl-C, a spot check's failover interrupted) did not happen: the
        session is back at `pos`, and the next step asks the stages to drop what they hold from
        there first (`rewind`; head groups that cannot are reopened: `_settle`). Asked again
        without it, they refused it `bad_position` and were failed over (review161); replayed from
        histories past `pos`, a reopened or replacing stage held positions twice (review162)."""
        self._rewind_next = True  # first: a second Ctrl-C below leaves the rest to `_settle`
        self.pos = pos
        self._truncate_histories()

    def _truncate_histories(self) -> None:
        for history in self.history:
            history.truncate(self.pos)
        if self.checker is not None:
            self.outputs.truncate(self.pos)

    def _after_error(self, i: int, stage: Stage, e: PeerError, hidden: torch.Tensor, rewind: set[Stage],
                     reopened: set, busy_retries: int) -> tuple[int, int]:
        """Where a step goes on after `stage` (stages[i]) refused it or failed: the index of the
        stage to ask next, and the busy retries so far. CallerError for the caller's own input;
        SessionError when failover cannot go on."""
        if e.code == "bad_value" and not self._input_fits(hidden, first=i == 0):
            # The caller's input, not the peer: nothing to fail over, and the node left the
            # session as it was.
            raise CallerError(f"{self._unfit(stage)} ({e.message})") from e
        if e.code == "bad_value" and past_float16(hidden):
            # Beyond float16's range: a float16 node cannot take it (a refusal, not its fault).
            # A liar before it that sent 1e6s had this honest node banned (a review); other nodes
            # for its blocks may take the input. Left out for the rest of the session: two such
            # nodes passed the stage back and forth.
            self._left_out[e.address] = f"{e.code}: {e.message}"
            return self._replace(self.stages.index(stage), e, strike=False), busy_retries
        if e.code == "busy" and busy_retries < BUSY_RETRIES and not stage.retries_busy:
            # An overloaded peer left the session as it was: wait a little and ask again before
            # giving its blocks to someone else.
            busy_pause(busy_retries + 1)
            if isinstance(stage, RemoteLayerStage):
                rewind.add(stage)  # a split step's first half may be stored (step_retrying_busy)
            return i, busy_retries + 1
        if isinstance(e, AllReduceFailed):
            # The group's members may hold the step in part: new sessions on them, replayed,
            # met one by one (the stage turned its all-reduce off for good, so this comes once
            # a stage; a group whose members all say `group_rewind` goes on by fan-out in place
            # instead, HeadGroupStage._fan_out_in_place). No one is struck for it.
            reopened.add(stage)
            log.info("%s: reopening the group", e)
            return self._reopen_or_replace(i), busy_retries
        if e.code == "session_closed" and self._takes_reclaim(stage, e, reopened):
            # The node reclaimed our session after its idle timeout (the reader paused): nothing
            # failed. Open a new one there, rebuilt from the history, no strike.
            failed = self._reopen(i)
            if failed is None:
                return self._at(stage.start), busy_retries
            # A failed reopen may have replaced stages before this one: its index moved.
            return self._replace_unreopened(self.stages.index(stage), failed, e), busy_retries
        return self._replace(self.stages.index(stage), e), busy_retries

    def _settle(self) -> None:
        """After a step cut short (Ctrl-C), before the next one, in route order: a head group that
        cannot rewind is reopened (its members may hold the step, or part of it: review161's case,
        where the honest member was refused `bad_position`, banned, and the session ended): one
        with a member of an earlier version (HeadGroupStage.takes_rewind); another's next step
        rewinds instead (an all-reduce step's ends the cut one where a member still runs it: till
        the sixty-eighth session every all-reduce group was reopened). So is a stage whose reopen
        or recomputation was cut short (client/reopen.py `_reopen`, client/failover.py
        `_recover`), and every stage after a replacement whose outputs differed from what they
        were sent (`_reopen_from`, a spot check's redo); a stage that a failover cut short left
        closed is replaced (the failover goes on: stepped, it would send a step of no session, and
        its honest node be banned for the `malformed` answer, review160; till the fifty-ninth
        session the session ended), and the replacements such a failover built and did not put on
        the route are closed (`_building`)."""
        self._truncate_histories()  # (again: a second Ctrl-C may have cut `_undo_step` short)
        self._close_building()
        # (a group that a failover cut short left closed is replaced below, not reopened: the
        # reopen would fail on the member failed over, and count that failover twice: review164)
        for group in self.stages:
            if isinstance(group, HeadGroupStage) and not group.closed and not group.takes_rewind:
                self._unsettled.setdefault(group, False)
        while True:
            for gone in [s for s in self._unsettled if s not in self.stages]:
                del self._unsettled[gone]
            k = next((k for k, s in enumerate(self.stages) if s in self._unsettled or s.closed), None)
            if k is None:
                return
            stage = self.stages[k]
            if stage in self._unsettled:
                self._reopen_or_replace(k, reclaimed=self._unsettled[stage])
            else:  # (peers banned by the failover are left out by the plan)
                self._replace(k, PeerError(", ".join(stage.peers), "interrupted", "the failover cut short goes on"),
                              strike=False)

    def _close_building(self) -> None:
        """Close the stages a failover cut short opened and did not put on the route (`_rebuild`)."""
        while self._building:
            if self._building[-1] not in self.stages:  # (cut short just after it was put on the route)
                self._building[-1].close()
            self._building.pop()

    def _chain_broken(self, chain: Chain, error: PeerError, hidden: torch.Tensor) -> None:
        """A relayed step did not come back; its stages will be asked one by one. A node that will
        not relay is not asked again (relay_failed: it could not reach the next hop), or not for a
        while (not_served: it does not know the next hop, and is told of it: introduce_soon). A
        dropped stage is replaced now (its drop was seen once, while waiting for the chain); after
        a timeout, the stage that does not answer `info` is (stalled_stage). Where every hop answers
        (RELAY_STALLS steps in a row), or the step came back malformed (a hop passed on garbage), the
        chain stops relaying (`_stop_relaying`).
        Other errors show again when the stage is asked alone, and are handled there."""
        by = next((s for s in chain.stages if error.address in s.peers), None)
        if error.code in ("relay_failed", "not_served") and by is not None:
            self.relaying.refused(by, error.code)
            if error.code == "not_served":
                self.swarm.introduce_soon()  # asked to relay again later, once told of the next
        elif error.code == "disconnected" and by is not None:
            self._replace(self.stages.index(by), error)
        elif error.code == "timeout":
            stalled = stalled_stage(chain.stages, self.swarm.options.timeout)
            if stalled is not None:
                self._replace(self.stages.index(stalled[0]), stalled[1])
                return
            chain.stalls += 1
            if chain.stalls >= RELAY_STALLS:
                self._stop_relaying(chain, f"timed out {chain.stalls} times in a row while every hop answers")
            else:
                log.info("a relayed step through %s timed out while every hop answers: done stage by stage, "
                         "relayed again next step", chain.endpoints())
        elif error.code in PASSED_ON_WRONG or (
                error.code == "bad_value" and self._input_fits(hidden, first=chain.stages[0] is self.stages[0])):
            self._stop_relaying(chain, f"came back malformed ({error})")

    def _stop_relaying(self, chain: Chain, why: str) -> None:
        """The chain's relayed step failed though no hop can be blamed: one of them computes but
        does not pass steps on, passes them wrongly or passes on garbage, or the chain is too slow
        for one timeout. Tried again, it would cost every token the timeout (a review): its
        boundaries stop relaying for the session; a stage replaced later is tried again
        (SessionRelay.retry_before)."""
        log.warning("a relayed step through %s %s: these stages go one by one from now on", chain.endpoints(), why)
        for stage in chain.stages[:-1]:
            self.relaying.refused(stage)

    def _input_fits(self, hidden: torch.Tensor, first: bool) -> bool:
        """Whether `hidden`, a stage's input that a node refused `bad_value`, was fit to compute
        from, so that the refusal is no fault of the caller's. The first stage's input is the
        caller's own, held to `takes_input` (past HIDDEN_LIMIT it is no model's). A later stage's
        is an earlier stage's output, stored there already: held to the wire alone, as before
        (calling it the caller's error would leave that position stored, and the next step's
        `bad_position` would ban the honest earlier node: review161)."""
        wire = self.swarm.options.wire
        return takes_input(hidden, wire) if first else fits_wire(hidden, wire)

    def _unfit(self, stage: Stage) -> str:
        return (f"hidden states for layers {stage.start}:{stage.stop} hold NaN or Inf, values past "
                f"{HIDDEN_LIMIT:g} (no model's), or do not fit the {self.swarm.options.wire} wire")
