"""An inference session: hidden states through a route's stages, with failover.

For every stage the session keeps the hidden states it sent (one row per position so far). When a
stage fails (error reply, disconnect, timeout) or announces that it is leaving, the session bans
its peer, has a replacement for exactly that stage's blocks rebuilt from that history
(client/failover.py), and carries on with the same step. Positions and sampling state live
outside the stages, so the tokens are those of a run without the failure.

Consecutive layer stages are driven by relay (client/relay.py): one request, the nodes pass the
step along, and the result of a step of up to TRAIL_MAX_POSITIONS positions (a decode step, a
short prompt) carries every hop's output for the history. A longer prefill's does not (it would
cross every link again): those positions are recomputed by the stage before when a failover
needs them. A relayed step that breaks off is done again one stage at a
time, the stages redoing the position if they hold it.

With spot checks on (client/verify.py) the session does not relay, and after a share of the steps
redoes one stage's work itself (client/spot_checks.py); a stage found wrong is failed over and
every stage after it rebuilt from the client's own outputs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable

import torch

from nanoswarm.protocol.bounds import MAX_SECONDS

from .failover import CANNOT_TAKE, CallerError, SessionError
from .head_group import HeadGroupStage
from .history import History, Unkept
from .mending import Mending
from .peer_errors import PeerError
from .relay import Chain, ChainBroken, SessionRelay
from .stages import RemoteLayerStage, Stage, takes_input
from .swarm import Swarm

log = logging.getLogger(__name__)

__all__ = ["CANNOT_TAKE", "TRAIL_MAX_POSITIONS", "CallerError", "InferenceSession", "SessionError"]

# A relayed step of up to this many positions brings back every hop's output (client/relay.py):
# 3 KB a hop for a decode step of the GPT-2-small shape. A longer one (a prefill) brings back only
# the last: 384 KB a hop for a 128-token prompt, re-encrypted at every link, made prefill through
# 4 relayed stages slower than stage by stage (docs/performance.md).
TRAIL_MAX_POSITIONS = 32

# The stages whose step takes `last` (the route's last one is asked for a prompt's last rows only).
CUTS_LAST = (RemoteLayerStage, HeadGroupStage)


class InferenceSession(Mending):
    """One generation's KV caches on a route: its stages, what each was sent, and how many
    positions are in. `step` sends the next positions through every stage; its base classes mend
    what goes wrong (client/mending.py), check stages' work (client/spot_checks.py), and rebuild
    stages that fail, leave or are found wrong (client/failover.py, client/reopen.py)."""

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
        self._left_out: dict[str, str] = {}  # peers that cannot take this session's inputs: why
        self.checker = swarm.checker if swarm is not None else None
        if swarm is not None and swarm.options.verify and self.checker is None:
            raise ValueError("SwarmOptions.verify needs the client's own blocks: connect with SwarmModel.connect")
        self.outputs = History()  # the last stage's outputs, for spot checks of it (client/verify.py)
        self.spot_checks = 0
        self.wrong_results = 0  # spot checks a stage failed (each failed over)
        self.width: int | None = None  # the model's n_embd, when known: a step's input is checked here
        # The swarm's sockets are one thread's at a time: SwarmModel.session gives its sessions the
        # model's lock, so hand-stepped sessions take turns with other threads' generations.
        self.lock: threading.RLock | contextlib.nullcontext = contextlib.nullcontext()
        self.closed = False
        self.failed: str | None = None  # why this session cannot go on, once it cannot (`step`)
        self._rewind_next = False  # a step was cut short: its stages may hold it (`step`)
        # stages to reopen before the next step (`_settle`): whether each one's history is the one
        # it was stepped with (a reopen then holds its replay against its earlier outputs)
        self._unsettled: dict[Stage, bool] = {}
        self._building: list[Stage] = []  # a failover's new stages, not on the route yet (`_rebuild`)
        self._finalizer: weakref.finalize | None = None  # set by `open`

    @classmethod
    def open(cls, swarm: Swarm, max_length: int, max_failovers: int | None = None,
             on_failover: Callable[[str], None] | None = None) -> InferenceSession:
        """Open a session on a route over all blocks; a peer that cannot take it (CANNOT_TAKE) is
        left out, one that fails is banned, and the rest of the route is planned again without it.
        It gives up after `max_failovers` failovers (default: the swarm's `SwarmOptions`)."""
        if max_failovers is None:
            max_failovers = swarm.options.max_failovers
        session = cls([], max_length, swarm, max_failovers=max_failovers, on_failover=on_failover)
        # A session dropped without `close` gets its stages closed all the same (Swarm.abandon).
        session._finalizer = weakref.finalize(session, swarm.abandon, session.stages, session._building)
        try:
            try:  # then the opens sent ahead that no stage took (a plan that changed, a refusal)
                session._open_route(max_length)
            except BaseException as e:
                swarm.settle_early(wait=not isinstance(e, KeyboardInterrupt))
                raise
            swarm.settle_early()
            if session.relay:
                session.relaying.pin(session.stages)  # now, not in the prompt's step
        except BaseException:  # close what was opened: each holds a KV reservation on its node
            session.close()
            raise
        return session

    def _open_route(self, max_length: int) -> None:
        self.swarm.refresh_stale()
        pos, refused = 0, {}
        while pos < self.swarm.n_layer:
            plans = self.swarm.plan(pos, max_length=max_length, refused=refused)
            self.swarm.connect_ahead(p.address for plan in plans for p in plan.peers)
            self.swarm.open_ahead(plans, max_length)
            plan, stage = plans[0], None
            try:
                stage = self.swarm.make_stage(plan)
                stage.open(max_length)
            except PeerError as e:  # planned again without that peer
                if stage is not None:
                    stage.close()
                self._refused_or_strike(e, refused)
                continue
            except BaseException:  # Ctrl-C: a head group's members opened so far are closed too
                if stage is not None:
                    stage.close()
                raise
            self.stages.append(stage)
            self.history.append(History())
            pos = plan.stop

    @property
    def relay(self) -> bool:
        """Whether consecutive layer stages pass this session's steps on (client/relay.py)."""
        return self.relaying.on

    def describe(self) -> list[dict]:
        return [s.describe() for s in self.stages]

    def step(self, hidden: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Positions pos..pos+T-1 through every stage; returns the last stage's output, or with
        `last` only its last `last` positions (all a caller that samples the next token needs:
        the route's last node then sends those alone, where it can). Every stage stores all T."""
        self._check_input(hidden)
        if last is not None and (type(last) is not int or last < 1):
            raise ValueError(f"last must be a positive int or None, got {last!r}")
        with self.lock:
            if self.closed:
                raise RuntimeError("this session is closed")
            if self.swarm is not None and self.swarm.closed:  # its links are: a failover would make new ones
                raise RuntimeError("this session's SwarmModel is closed")
            if self.failed is not None:
                raise SessionError(f"this session cannot go on: {self.failed}")
            pos = self.pos
            try:
                out = self._step(hidden, last if last is not None and last < hidden.shape[1] else None)
            except BaseException as e:
                if isinstance(e, CallerError) and not self._sent_past(pos):
                    raise  # the session as it was
                if isinstance(e, SessionError) and not isinstance(e, CallerError):
                    # A failover that gave up may leave a stage closed on its node: stepped again,
                    # it would send a step of no session, and its honest node would be banned
                    # for the `malformed` answer (review160).
                    self.failed = str(e)
                else:
                    self._undo_step(pos)
                raise
            return out if last is None else out[:, -last:]

    def _sent_past(self, pos: int) -> bool:
        """Whether some stage was sent positions from `pos` on (a step that did not complete)."""
        return any(h.positions > pos for h in self.history)

    def _check_input(self, hidden: object) -> None:
        """A caller's mistake is the caller's, refused here: sent, a node would refuse it, and its
        peer would be failed over and banned as if it had erred."""
        width = self.width if self.width is not None else "n_embd"
        if not (isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and hidden.dim() == 3
                and hidden.shape[0] == 1 and hidden.shape[1] >= 1
                and (self.width is None or hidden.shape[2] == self.width)):
            got = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"a step takes hidden states of shape [1, positions >= 1, {width}] "
                             f"(floating point), got {got}")

    def _step(self, hidden: torch.Tensor, last: int | None) -> torch.Tensor:
        if self.swarm is not None:
            self.swarm.drain_events()
        T = hidden.shape[1]
        if self.pos + T > self.max_length:
            raise CallerError(f"session is full: {self.pos + T} positions > max_length {self.max_length}")
        if T > 1 and self.swarm is not None and not takes_input(hidden, self.swarm.options.wire):
            # Checked first for a step a stage may send in pieces (a refused half, a head group's
            # pieces): a bad later piece would leave an earlier one stored. A one-position step
            # (the per-token path) is checked only if a node refuses it (_after_error).
            raise CallerError(self._unfit(self.stages[0]))
        if self._rewind_next:
            self._settle()
        i, busy_retries, reopened = 0, 0, set()
        # rewind: stages that may hold this position already (all of them after a step cut short)
        # (after one cut short, not relayed: a relayed step cannot rewind, and its first hop
        # would refuse it `bad_position`, a round trip for nothing: review164)
        relay, rewind = self.relay and not self._rewind_next, set(self.stages) if self._rewind_next else set()
        if self.checker is not None:
            last = None  # a spot check of the last stage compares its whole output
        self.relaying.new_step()
        while i < len(self.stages):
            stage = self.stages[i]
            if self.swarm is not None and stage.leaving:
                i = self._replace(i, PeerError(stage.leaving_peer, "leaving", "peer announced it is leaving"))
                continue
            chain = self.relaying.chain(self.stages, i) if relay else None
            if chain is not None and T > 1 and T > (chain.max_untrailed(hidden.shape[2]) if T > TRAIL_MAX_POSITIONS
                                                    else chain.max_trailed(hidden.shape[2])):
                chain = None  # a node takes fewer positions a step: stage by stage, in pieces
            if chain is not None:
                done = self._step_chain(chain, i, hidden, rewind,
                                        last if i + len(chain.stages) == len(self.stages) and chain.keeps() else None)
                if done is None:  # the chain broke: the rest of this step one stage at a time
                    relay = False
                    i = self._at(stage.start)  # failover may have replaced stages before it too
                else:
                    hidden, i = done
                continue
            try:
                if last is not None and i + 1 == len(self.stages) and isinstance(stage, CUTS_LAST):
                    out = stage.step(hidden, self.pos, rewind=stage in rewind, last=last)
                else:
                    out = stage.step(hidden, self.pos, rewind=stage in rewind)
            except PeerError as e:
                if self.swarm is None:
                    raise
                i, busy_retries = self._after_error(i, stage, e, hidden, rewind, reopened, busy_retries)
                continue
            self.history[i].append(hidden, T)
            hidden = out
            i += 1
        self.relaying.pin_changed(self.stages)
        self.pos += T
        self._rewind_next = False
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

    def _step_chain(self, chain: Chain, i: int, hidden: torch.Tensor, rewind: set[Stage],
                    last: int | None = None) -> tuple[torch.Tensor, int] | None:
        """A relayed step through `chain`, which starts at stages[i]: the last hop's output (its
        last `last` positions, if given) and the index after the chain, or None when the chain
        broke (its stages then failed over where they must, and may hold the position already:
        `rewind`)."""
        T = hidden.shape[1]
        trail = T <= TRAIL_MAX_POSITIONS
        # A prefill's hops each compute for a while: each gets the time a stage step gets.
        timeout = min(MAX_SECONDS, self.swarm.options.timeout * (1 if trail else len(chain.stages)))
        try:
            outputs = chain.step(hidden, self.pos, timeout, trail, last)
        except ChainBroken as e:
            rewind.update(chain.stages)
            self._chain_broken(chain, e.error, hidden)
            return None
        chain.stalls = 0
        self.history[i].append(hidden, T)
        for k in range(1, len(chain.stages)):
            self.history[i + k].append(outputs[k - 1] if trail else Unkept(T), T)
        return outputs[-1], i + len(chain.stages)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            try:
                self._close_building()
                for stage in self.stages:
                    stage.close()
            except BaseException:  # Ctrl-C midway: the stages not closed yet go at the next step
                if self._finalizer is not None:
                    self._finalizer()  # Swarm.abandon(stages): closing a closed stage sends nothing
                raise
            if self._finalizer is not None:
                self._finalizer.detach()

    def abandon(self) -> None:
        """Close it without touching a socket: its stages are closed on their nodes at the
        swarm's next step, session or close (Swarm.abandon), as a dropped session's are. For
        callers that may run as a finalizer, on any thread, even inside another step."""
        self.closed = True
        if self._finalizer is not None:
            self._finalizer()  # Swarm.abandon(stages), once
        else:  # local stages: no sockets
            for stage in self.stages:
                stage.close()
