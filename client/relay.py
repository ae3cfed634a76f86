"""One step through a chain of layer stages by node-to-node relay (node/relay.py has the node's
side): the client sends the step to the chain's first node with the rest of the chain, each node
sends it on to the next, and the last node returns the result, for a short step together with
the output of every hop before it (its `trail`; a long prefill goes without). A stage boundary
then costs one link instead of a reply plus a new request, and the client sleeps until the token
is through: on cores shared with the nodes, a client woken at every hop takes them from the node
computing next.

The hops' outputs are what failover needs: every stage's input for every position
(client/failover.py replays them into a replacement). When a relayed step breaks off, the session
finishes it one stage at a time, and the stages, which may hold the position already, redo it
(`rewind`).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import zmq

from nanoswarm.keys.contact import endpoint_of
from nanoswarm.protocol.messages import MAX_HOPS

from .peer_errors import PeerError, PeerTimeout
from .stages import RemoteLayerStage, check_magnitude, positions_per_request, reply_tensors
from .transport import next_request_id

log = logging.getLogger(__name__)


class ChainBroken(Exception):
    """A relayed step did not come back: `error` says why, and names the peer that said so."""

    def __init__(self, error: PeerError):
        super().__init__(f"relayed step broke off: {error}")
        self.error = error


class Chain:
    """Consecutive layer stages run by relayed steps. Made once per route (the session keeps it
    until a stage changes): its poller and hop list are the same for every step."""

    def __init__(self, stages: list[RemoteLayerStage]):
        self.stages = stages
        # Its relayed steps in a row that timed out while every hop answered (RELAY_STALLS). Per
        # chain: a route of two chains reset one count with the other's steps (a review).
        self.stalls = 0
        self.next = [[stage.relay_name, stage.session] for stage in stages[1:]]
        self.poller = zmq.Poller()
        for stage in stages:  # any hop may answer with an error; a dropped link shows on its monitor
            stage.conn.register(self.poller)

    def endpoints(self) -> str:
        """The chain's peers for a log line: endpoints, without their 64-digit keys."""
        return ", ".join(endpoint_of(p) for s in self.stages for p in s.peers)

    def max_untrailed(self, width: int) -> int:
        """The most positions one relayed step without trail may carry: what every node of the
        chain takes; 0 if one of them does not know such steps (an earlier version)."""
        if not all(stage.opened.get("trail_optional") is True for stage in self.stages):
            return 0
        return min(positions_per_request(stage.opened, width) for stage in self.stages)

    def keeps(self) -> bool:
        """Whether every node of the chain takes `last` (an earlier version would ignore it,
        and its whole answer would be refused as the wrong shape)."""
        return all(stage.opened.get("last_positions") is True for stage in self.stages)

    def max_trailed(self, width: int) -> int:
        """The most positions one relayed step with its trail may carry: what every node of the
        chain takes, in a message that holds up to one output of each hop."""
        return min(positions_per_request(stage.opened, width * len(self.stages)) for stage in self.stages)

    def step(self, hidden: torch.Tensor, pos: int, timeout: float, trail: bool = True,
             last: int | None = None) -> list[torch.Tensor]:
        """Positions pos.. of `hidden` through every stage; returns each stage's output (the
        last one a tensor, the others read from the reply's frames when first used), or with
        `trail` off only the last stage's: the nodes pass on only their own output. With `last`
        (from 1 to T - 1; `keeps` says whether the chain takes it) the last stage's output comes
        back as its last `last` positions only (the earlier hops' whole: they are the history)."""
        first, end = self.stages[0], self.stages[-1]
        rid = next_request_id()
        deadline = time.monotonic() + timeout
        fields = {"session": first.session, "pos": pos, "wire": first.wire, "reply": rid, "next": self.next}
        if not trail:
            fields["trail"] = False
        if last is not None:
            fields["last"] = last
        sent = [stage.asking() for stage in self.stages]  # each before its hop's request arrives
        try:
            first.conn.send("step", fields, [hidden], first.wire, req_id=rid, timeout=timeout)
            while True:
                msg = end.conn.take(rid, "result")  # an error reply, or a dropped link, raises PeerError
                if msg is not None:
                    outputs = reply_tensors(end.conn, msg, hidden, len(self.stages) if trail else 1, last)
                    # Which hop grew it is unknown: the chain's step goes stage by stage, where
                    # each stage's output is checked (a `bad_reply`: _chain_broken).
                    check_magnitude(end.conn.address, hidden, outputs[-1])
                    for stage, at in zip(self.stages, sent):
                        stage.sent_at = at
                    return outputs
                for stage in self.stages[:-1]:  # the hops before answer only to refuse
                    if stage.conn.take(rid, "result") is not None:
                        raise PeerError(stage.conn.address, "bad_reply", "a reply from the middle of a relayed step")
                left = deadline - time.monotonic()
                if left <= 0:  # which hop holds the step is unknown: the caller finds out stage by stage
                    raise PeerTimeout(end.conn.address, timeout)
                self.poller.poll(max(1, int(left * 1000)))
        except PeerError as e:
            raise ChainBroken(e) from e


def relays(before: object, after: object, no_relay: set) -> bool:
    """Whether a relayed step may pass from stage `before` to stage `after`: both run whole
    blocks, `before` has not refused to relay, and if `after`'s node checks who relays to it,
    so does `before`'s (a node of an earlier version does not say which session it relays, and
    an --insecure one relays with a key of the moment: neither can be pinned)."""
    return (isinstance(before, RemoteLayerStage) and isinstance(after, RemoteLayerStage) and before not in no_relay
            and (after.opened.get("admits") is not True
                 or before.opened.get("admits") is True and before.conn.server_key is not None))


def pin_route(stages: list, no_relay: set, timeout: float) -> tuple[RemoteLayerStage, PeerError] | None:
    """Pin every session of the route whose node checks senders (`admits`) to the hops its
    relayed steps may come from and go on to: the stages before and after it, where a step may
    pass between them (`relays`), else none. Such a node takes a relayed step only from the hop
    before (its CURVE key, relaying its session) and passes it only to the hop after or back to
    the client (node/handler.py), so an earlier hop reaches a later session only along this
    route, every result going to the client. Asked only where the pins changed (a new route, a
    replaced or reopened stage: one whose old peer keeps no way in), all at once, within one
    `timeout`. Returns the first stage that did not take them, with why (the others' are taken).
    A drop read here is put back on its link (PeerConnection.put_back): the sessions over it, this
    one's or another's, find it at their next step, not after its timeout (review106)."""
    asked, deadline, failed = [], time.monotonic() + timeout, None
    for k, stage in enumerate(stages):
        if not isinstance(stage, RemoteLayerStage) or stage.opened.get("admits") is not True:
            continue
        before, after = stages[k - 1] if k else None, stages[k + 1] if k + 1 < len(stages) else None
        pins = ([before.conn.server_key.decode(), before.session] if relays(before, stage, no_relay)
                else None,
                [after.relay_name, after.session] if relays(stage, after, no_relay) else None)
        if pins == stage.pins:
            continue
        stage.pins = None  # unknown until the node says it took them: asked again next time
        try:
            sent = stage.asking()
            rid = stage.conn.send("admit", {"session": stage.session, "relay_from": pins[0], "relay_to": pins[1]},
                                  timeout=max(0.0, deadline - time.monotonic()))
            asked.append((stage, pins, rid, sent))
        except PeerError as e:
            stage.conn.put_back(e)
            failed = failed or (stage, e)
    for stage, pins, rid, sent in asked:  # every answer read, so that each stage's pins are known
        try:
            stage.conn.recv(rid, "admitted", max(0.0, deadline - time.monotonic()))
            stage.pins, stage.sent_at = pins, sent
        except PeerError as e:
            stage.conn.put_back(e)
            failed = failed or (stage, e)
    return failed


# Rounds in a row of pinning relayed steps (pin_route; one at open, then at most one a step) that
# fail before a session stops relaying: each step's rest goes stage by stage, and a timed-out round
# costs the timeout.
PIN_TRIES = 3
UNPIN_SECONDS = 1.0  # for dropping the pins when a session stops relaying
# Relayed steps in a row that time out while every hop answers before a chain stops relaying for
# the session: one is a stall (a loaded machine), two a hop that does not pass steps on, or a
# chain too slow for one timeout.
RELAY_STALLS = 2
# A hop that did not know the next (not_served) is asked to relay again after this, doubled at each
# refusal up to RELAY_AGAIN_MAX_SECONDS: a refusal costs a round trip, the compute of the hops before
# it (redone stage by stage) and a pin round (review119: 7 refusals in a 127-token session).
RELAY_AGAIN_SECONDS = 2.0
RELAY_AGAIN_MAX_SECONDS = 120.0


class SessionRelay:
    """What one session relays: which boundaries of its route pass steps on (`relays`), the chains
    of stages that one relayed step runs, and the route's pins (pin_route), kept current. The
    session asks `chain` before each stage of a step, and tells it which hop refused to relay
    (`refused`) and where the route changed (`retry_before`, `forget_chains`)."""

    def __init__(self, on: bool, timeout: float):
        self.on = on  # off for good once PIN_TRIES rounds of pinning in a row failed
        self.timeout = timeout
        self.no_relay: set = set()  # stages whose node would not relay to the next
        self._again: dict = {}  # stage -> (when it is asked to relay again, refusals so far): `refused`
        self._chains: dict[tuple, Chain] = {}  # by their stages
        self._pinned: tuple | None = None  # the route (stages, sessions, no_relay) last pinned
        self._failures = 0  # rounds of pinning in a row that failed
        self.changed = False  # stages were reopened or replaced this step (pin_changed)
        self._failed_this_step = False

    def new_step(self) -> None:
        self._failed_this_step = False  # pinning is tried at most once a step
        now = time.monotonic()
        for stage, (when, refusals) in self._again.items():
            if when <= now:
                self.no_relay.discard(stage)
                self._again[stage] = (math.inf, refusals)  # once a refusal; kept for the next one's wait

    def refused(self, stage: object, code: str = "") -> None:
        """`stage`'s node would not relay to the next (not_served, relay_failed): not asked again,
        but for `not_served`, the node not knowing the next hop: that one is asked again
        RELAY_AGAIN_SECONDS on, doubled at each refusal, since the client has it told of the
        others meanwhile (Swarm.introduce_soon; a node restarted without a bootstrap knows no one)."""
        self.no_relay.add(stage)
        if code != "not_served":
            self._again.pop(stage, None)
        else:
            refusals = self._again.get(stage, (0.0, 0))[1] + 1
            wait = min(RELAY_AGAIN_SECONDS * 2 ** (refusals - 1), RELAY_AGAIN_MAX_SECONDS)
            self._again[stage] = (time.monotonic() + wait, refusals)

    def retry_before(self, stages: list, i: int) -> None:
        """Stage i is new (replaced, or a reopened session): the hop before may have refused to
        relay to the old one, which was not its fault; if it was for another reason, one relayed
        step finds that out again."""
        if i > 0:
            self.no_relay.discard(stages[i - 1])
        self.changed = True

    def forget_chains(self) -> None:
        self._chains = {}  # after stages were reopened: the chains name their old session ids
        self.changed = True

    def pin_changed(self, stages: list) -> None:
        """At the end of a step that reopened or replaced stages: pin the new route now, while
        its sessions are fresh. Pinned at the next step instead, after a reader's pause past the
        idle timeout, the pin found them reclaimed, and three such pauses stopped the session's
        relaying (a review); a `session_closed` to a pin is a failed round like any other."""
        if self.on and self.changed:
            self.changed = False
            self.pin(stages)

    def chain(self, stages: list, i: int) -> Chain | None:
        """Stages i.. that one relayed step can run (consecutive layer stages, none leaving, each
        passing steps to the next), if there are two or more; the route pinned first (`pin`)."""
        run: list[RemoteLayerStage] = []
        for k in range(i, len(stages)):
            stage = stages[k]
            if not isinstance(stage, RemoteLayerStage) or stage.leaving:
                break
            run.append(stage)
            if len(run) == MAX_HOPS + 1:  # the most one relayed step names; the next chain goes on
                break
            if not relays(stage, stages[k + 1] if k + 1 < len(stages) else None, self.no_relay):
                break
        if not self.pin(stages) or len(run) < 2:
            return None
        key = tuple(run)
        if key not in self._chains:
            current = set(stages)  # forget chains with a stage that failover replaced
            self._chains = {k: c for k, c in self._chains.items() if current.issuperset(k)}
            self._chains[key] = Chain(run)
        return self._chains[key]

    def pin(self, stages: list) -> bool:
        """Pin the route's sessions to the hops their relayed steps come from and go to, where the
        route changed since (pin_route: a replaced or reopened stage's old peer loses its way in).
        False if a node did not take it: the rest of this step goes stage by stage, and the next
        step asks again; after PIN_TRIES such rounds in a row (the one at open counts) the session
        stops relaying and drops its pins (a stage in trouble shows it when stepped alone, and is
        failed over then; one whose connection dropped meanwhile too: pin_route put the drop back
        on its link)."""
        route = tuple((s, getattr(s, "session", None)) for s in stages), frozenset(self.no_relay)
        if route == self._pinned:
            return True
        if self._failed_this_step:
            return False
        refused = pin_route(stages, self.no_relay, self.timeout)
        if refused is None:
            self._pinned, self._failures = route, 0
            return True
        self._failed_this_step, self._failures = True, self._failures + 1
        log.info("pinning relayed steps on %s: %s", ", ".join(refused[0].peers), refused[1])
        if self._failures >= PIN_TRIES:
            log.warning("this session stops relaying: %d rounds in a row could not pin its relayed steps",
                        self._failures)
            self.on = False
            # Best effort: pinned hops keep no way in (a hop that steps the next session while the
            # client does not relay makes the client's next step there fail as the node's fault).
            pin_route(stages, set(stages), UNPIN_SECONDS)
        return False


STALL_SECONDS = 1.0  # a stage that answers `info` within this (or 3x its slowest sibling) is alive


def stalled_stage(stages: list[RemoteLayerStage], timeout: float) -> tuple[RemoteLayerStage, PeerError] | None:
    """The stage of a timed-out relayed step that is stuck, with why; None if all answer.

    Every stage is asked for `info` at once. A stuck node never answers; a busy machine makes
    healthy ones slow too, so the wait is STALL_SECONDS or three times the slowest answer so far,
    and while several are silent, up to `timeout`: a slow first hop is not taken for the frozen
    one after it. Any answer, an error reply too, shows a node alive; a dropped connection does not."""
    asked: dict[RemoteLayerStage, int] = {}
    for stage in stages:
        try:
            asked[stage] = stage.conn.send("info", timeout=min(STALL_SECONDS, timeout))
        except PeerError as e:
            return stage, e
    t0 = time.monotonic()
    wait = min(STALL_SECONDS, timeout)
    while asked:
        for stage, req_id in list(asked.items()):
            try:
                answered = stage.conn.take(req_id, "info_reply") is not None
            except PeerError as e:
                if e.code == "disconnected":
                    return stage, e
                answered = True  # an error reply: the node is there to send it
            if answered:
                del asked[stage]
                wait = min(max(wait, 3 * (time.monotonic() - t0)), timeout)
        left = t0 + (wait if len(asked) == 1 else timeout) - time.monotonic()
        if asked and left <= 0:
            stage = next(s for s in stages if s in asked)  # the first in the chain that is silent
            return stage, PeerTimeout(stage.conn.address, time.monotonic() - t0,
                                      "no answer to info after a step timed out")
        if asked:
            # Only the silent hops: an answered one may get more (the late step, a notice), and
            # a level-triggered poll on it would spin.
            poller = zmq.Poller()
            for stage in asked:
                stage.conn.register(poller)
                left = stage.conn.poll_limit(left)
            poller.poll(max(1, int(left * 1000)))
    return None
