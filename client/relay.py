"""One step through a chain of layer stages by node-to-node relay (node/relay.py has the node's
side): the client sends the step to the chain's first node with the rest of the chain, each node
sends it on to the next, and the last node returns the result together with the output of every
hop before it. A stage boundary then costs one link instead of a reply plus a new request, and
the client sleeps until the token is through: on cores shared with the nodes, a client woken at
every hop takes them from the node computing next.

The hops' outputs are what failover needs: every stage's input for every position
(client/session.py replays them into a replacement). When a relayed step breaks off, the session
finishes it one stage at a time, and the stages, which may hold the position already, redo it
(`rewind`).
"""

from __future__ import annotations

import time

import torch
import zmq

from .stages import RemoteLayerStage, positions_per_request, reply_tensors
from .transport import PeerError, PeerTimeout, next_request_id


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
        self.next = [[stage.conn.address, stage.session] for stage in stages[1:]]
        self.poller = zmq.Poller()
        for stage in stages:  # any hop may answer with an error; a dropped link shows on its monitor
            stage.conn.register(self.poller)

    def max_untrailed(self, width: int) -> int:
        """The most positions one relayed step without trail may carry: what every node of the
        chain takes; 0 if one of them does not know such steps (an earlier version)."""
        if not all(stage.opened.get("trail_optional") is True for stage in self.stages):
            return 0
        return min(positions_per_request(stage.opened, width) for stage in self.stages)

    def step(self, hidden: torch.Tensor, pos: int, timeout: float, trail: bool = True) -> list[torch.Tensor]:
        """Positions pos.. of `hidden` through every stage; returns each stage's output (the
        last one a tensor, the others read from the reply's frames when first used), or with
        `trail` off only the last stage's: the nodes pass on only their own output."""
        first, last = self.stages[0], self.stages[-1]
        rid = next_request_id()
        deadline = time.monotonic() + timeout
        fields = {"session": first.session, "pos": pos, "wire": first.wire, "reply": rid, "next": self.next}
        if not trail:
            fields["trail"] = False
        try:
            first.conn.send("step", fields, [hidden], first.wire, req_id=rid, timeout=timeout)
            while True:
                msg = last.conn.take(rid)  # an error reply, or a dropped link, raises PeerError
                if msg is not None:
                    return reply_tensors(last.conn, msg, hidden, len(self.stages) if trail else 1)
                for stage in self.stages[:-1]:  # the hops before answer only to refuse
                    if stage.conn.take(rid) is not None:
                        raise PeerError(stage.conn.address, "bad_reply", "a reply from the middle of a relayed step")
                left = deadline - time.monotonic()
                if left <= 0:  # which hop holds the step is unknown: the caller finds out stage by stage
                    raise PeerTimeout(last.conn.address, timeout)
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
    `timeout`. Returns the first stage that did not take them, with why (the others' are taken)."""
    asked, deadline, failed = [], time.monotonic() + timeout, None
    for k, stage in enumerate(stages):
        if not isinstance(stage, RemoteLayerStage) or stage.opened.get("admits") is not True:
            continue
        before, after = stages[k - 1] if k else None, stages[k + 1] if k + 1 < len(stages) else None
        pins = ([before.conn.server_key.decode(), before.session] if relays(before, stage, no_relay)
                else None,
                [after.conn.address, after.session] if relays(stage, after, no_relay) else None)
        if pins == stage.pins:
            continue
        stage.pins = None  # unknown until the node says it took them: asked again next time
        try:
            rid = stage.conn.send("admit", {"session": stage.session, "relay_from": pins[0], "relay_to": pins[1]},
                                  timeout=max(0.0, deadline - time.monotonic()))
            asked.append((stage, pins, rid))
        except PeerError as e:
            failed = failed or (stage, e)
    for stage, pins, rid in asked:  # every answer read, so that each stage's pins are known
        try:
            stage.conn.recv(rid, max(0.0, deadline - time.monotonic()))
            stage.pins = pins
        except PeerError as e:
            failed = failed or (stage, e)
    return failed


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
                answered = stage.conn.take(req_id) is not None
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
            poller.poll(max(1, int(left * 1000)))
    return None
