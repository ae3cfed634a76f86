"""Stages: the steps of a route. Every stage runs blocks [start, stop) on the hidden states of
new positions and keeps its own KV cache (remote or local); all expose the same interface."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import zmq

from nanoswarm.protocol.errors import shown
from nanoswarm.protocol.messages import Message
from nanoswarm.protocol.tensors import abs_max
from nanoswarm.shards.model import Blocks

from .link_sessions import idle_clock
from .peer_errors import PeerError
from .transport import MAX_FRAME_BYTES, PeerConnection

if TYPE_CHECKING:
    from .verify import FanOutRecord

log = logging.getLogger(__name__)

def open_fields(model_id: str, max_length: int, start: int, stop: int, heads: tuple[int, int] | None = None) -> dict:
    """An `open` request's fields for blocks [start, stop), and the heads the client takes from
    that peer (a head group's member's, or all of them for whole blocks), which the node checks
    (Swarm.open_ahead sends the same)."""
    fields = {"model_id": model_id, "max_length": max_length, "layers": [start, stop]}
    if heads is not None:
        fields["heads"] = list(heads)
    return fields


BUSY_RETRIES = 3  # a `busy` step is retried on the same peer this often (0.1, 0.2, 0.4 s) before failover


def busy_pause(retry: int) -> None:
    """The wait before the `retry`-th (1..BUSY_RETRIES) request to a peer that answered `busy`."""
    time.sleep(0.05 * 2 ** retry)


def step_retrying_busy(stage: Stage, hidden: torch.Tensor, pos: int, rewind: bool = False) -> torch.Tensor:
    """stage.step, asked again after a pause when the peer answers `busy` (it left the session as
    it was), as InferenceSession.step does: a replacement that is briefly overloaded while it is
    replayed into is not banned for it."""
    retry = 0
    while True:
        try:
            # A retry may redo positions: a step split after `too_large` can be refused `busy` in
            # its second half, its first half stored. A layer stage drops them first (rewind).
            return stage.step(hidden, pos, rewind=(rewind or retry > 0) and isinstance(stage, RemoteLayerStage))
        except PeerError as e:
            retry += 1
            if e.code != "busy" or retry > BUSY_RETRIES or stage.retries_busy:
                raise
            busy_pause(retry)


class Stage:
    start: int
    stop: int
    # A stage whose step is several requests retries a `busy` one itself: the rest of the step
    # has already been stored by its other peers, so asking for the whole step again would fail.
    retries_busy: bool = False
    # idle_clock() when this stage sent the last request its session answered (open, step, a
    # relayed step or `admit`), and when it sent the first one since that is not answered yet (a
    # retry does not move it): a node reclaims a session only when no request came for its idle
    # timeout, so a `session_closed` to a request sent sooner is a fault (Failover._takes_reclaim).
    sent_at: float = 0.0
    asked_at: float = 0.0

    def asking(self) -> float:
        """A request for this stage's session is being sent: the time, noted as `asked_at` unless
        an earlier one is still unanswered. The caller sets `sent_at` to it once answered."""
        now = idle_clock()
        if self.asked_at <= self.sent_at:
            self.asked_at = now
        return now

    def open(self, max_length: int) -> None:
        raise NotImplementedError

    def step(self, hidden: torch.Tensor, pos: int, rewind: bool = False) -> torch.Tensor:
        """Run this stage's blocks on `hidden` ([1, T, C], positions pos..pos+T-1). With `rewind`
        the stage may hold these positions already (a relayed step broke off): it drops them
        first."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def peers(self) -> list[str]:
        return []

    @property
    def leaving_peer(self) -> str | None:
        """The address of a peer of this stage that announced it is leaving, if one did."""
        return None

    @property
    def leaving(self) -> bool:
        return self.leaving_peer is not None

    @property
    def idle_timeout(self) -> float:
        """The shortest idle timeout its peers stated when the session opened (0: none stated)."""
        return 0.0

    def describe(self) -> dict:
        return {"layers": [self.start, self.stop], "peers": self.peers}


class LocalStage(Stage):
    """Blocks run in this process: the single-process reference (`SwarmModel.local`, the bench)."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks
        self.start, self.stop = blocks.start, blocks.stop
        self.cache = None

    def open(self, max_length: int) -> None:
        self.cache = self.blocks.new_cache(max_length, self.stop - self.start)

    def step(self, hidden: torch.Tensor, pos: int, rewind: bool = False) -> torch.Tensor:
        if rewind:
            self.cache.length = pos
        with torch.inference_mode():
            return self.blocks(hidden, [self.cache], self.start, self.stop)

    def describe(self) -> dict:
        return {"layers": [self.start, self.stop], "peers": ["local"]}


def stated_idle_timeout(opened: dict) -> float:
    """The idle timeout an `opened` reply states; 0.0 when it states none that makes sense."""
    t = opened.get("idle_timeout")
    return float(t) if type(t) in (int, float) and 0 < t < float("inf") else 0.0


# Far beyond any honest model's hidden states (GPT-2's largest are a few thousand), far below
# what LayerNorm takes in float32 (~1e19). A stage answering 1e20s made the honest stage after it
# compute NaN, refuse `bad_value` and be banned, while the liar was never blamed (a review).
HIDDEN_LIMIT = 1e15


def check_magnitude(address: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """A stage's output `y` (or a head-group member's partial sum) for input `x` may not pass
    HIDDEN_LIMIT + 2 |x|: an honest block adds to its input what its weights make of the
    LayerNorm of it, bounded whatever the input, so only a stage that lies grows it so. (Relative
    to the input, so that an honest stage handed values near the limit by a liar before it is
    not the one blamed.) Costs one pass over `y`; `x` is read only when `y` passes the limit."""
    m = abs_max(y)
    if m > HIDDEN_LIMIT and m > HIDDEN_LIMIT + 2 * (mx := abs_max(x)):
        raise PeerError(address, "bad_reply", f"answered hidden states of magnitude {m:.3g} for an input of "
                        f"{mx:.3g}: no honest block grows them so")


def check_reply(conn: PeerConnection, msg: Message, like: torch.Tensor) -> torch.Tensor:
    """A peer's tensor must have the shape we sent, and a magnitude an honest block could give
    (check_magnitude; `like` is what we sent): peers are untrusted. (Finiteness was checked when
    the reply was read: PeerConnection._read decodes with finite=True.)"""
    y = reply_tensors(conn, msg, like, 1)[0]
    check_magnitude(conn.address, like, y)
    return y


def reply_tensors(conn: PeerConnection, msg: Message, like: torch.Tensor, count: int) -> list:
    """The `count` tensors of a reply, each of `like`'s shape, in `like`'s dtype and device. All
    but the last come as functions that make the tensor: a relayed step's outputs of its earlier
    hops are kept for failover replay only, so they need not cost torch calls now."""
    shape = tuple(like.shape)
    if len(msg.specs) != count or any(s != shape for _, s in msg.specs):
        raise PeerError(conn.address, "bad_reply", f"expected {count} tensors {list(shape)}, "
                        f"got {[list(s) for _, s in msg.specs]}")

    def tensor(i: int) -> torch.Tensor:
        y = msg.tensor(i)  # on the CPU: made from the frame's bytes
        return y if y.dtype is like.dtype and like.is_cpu else y.to(like.device, like.dtype)

    return [functools.partial(tensor, i) for i in range(count - 1)] + [tensor(count - 1)]


# Room for a step's header and the frames' framing within a node's message limit.
HEADER_ROOM = 64 * 1024


def positions_per_request(opened: dict, width: int) -> int:
    """The most positions of `width`-wide float32 (the widest wire) hidden states one request to
    a peer may carry, from the limits its `opened` reply states; at least one."""
    n = opened.get("max_tokens_per_step")
    n = n if isinstance(n, int) and n > 0 else 1 << 30
    size = opened.get("max_message_bytes")
    # A reply has the request's shape: it must also fit the frames this client accepts.
    size = min(size, MAX_FRAME_BYTES) if isinstance(size, int) and size > 0 else MAX_FRAME_BYTES
    n = min(n, (size - HEADER_ROOM) // (4 * width))
    return max(1, n)


class RemoteLayerStage(Stage):
    """One peer running whole blocks [start, stop) in a session on its side."""

    def __init__(self, conn: PeerConnection, start: int, stop: int, model_id: str,
                 wire: str = "float32", timeout: float | None = None, relay_name: str | None = None,
                 heads: tuple[int, int] | None = None):
        self.conn, self.start, self.stop = conn, start, stop
        self.heads = heads  # all of the model's, named at open: a head shard at that address refuses it
        self.model_id, self.wire, self.timeout = model_id, wire, timeout
        # The contact relayed steps name this stage's peer by: the one its signed record names,
        # which the hop before knows it by (PeerInfo.relay_name); its link's address by default.
        self.relay_name = relay_name or conn.address
        self.session: str | None = None
        self.pins: tuple | None = (None, None)  # its relayed steps' hops before and after (client/relay.py)

    def open(self, max_length: int) -> None:
        reply = self.conn.open_session(open_fields(self.model_id, max_length, self.start, self.stop, self.heads),
                                       timeout=self.timeout)
        self.session, self.pins, self.sent_at = reply.fields["session"], (None, None), self.conn.open_sent
        self.opened = reply.fields  # its limits: positions_per_request

    def step(self, hidden: torch.Tensor, pos: int, rewind: bool = False) -> torch.Tensor:
        T = hidden.shape[1]
        if T > 1 and T > (n := positions_per_request(self.opened, hidden.shape[-1])):
            # Pieces the node's stated limits take (`opened`), not a refusal per halving: a
            # 500-token prompt to a node taking 100 was sent 7 times before (a review).
            return torch.cat([self.step(hidden[:, a:a + n], pos + a, rewind) for a in range(0, T, n)], dim=1)
        try:
            return self._step(hidden, pos, rewind)
        except PeerError as e:
            T = hidden.shape[1]
            if e.code != "too_large" or T < 2:
                raise
            # The node takes fewer positions a step (its --max-tokens-per-step, or its message
            # limit): a refusal leaves the session as it was, so send the positions in halves.
            h = T // 2
            first = self.step(hidden[:, :h], pos, rewind)
            return torch.cat([first, self.step(hidden[:, h:], pos + h, rewind)], dim=1)

    def _step(self, hidden: torch.Tensor, pos: int, rewind: bool) -> torch.Tensor:
        fields = {"session": self.session, "pos": pos, "wire": self.wire}
        if rewind:
            fields["rewind"] = True
        sent = self.asking()
        reply = self.conn.request("step", fields, [hidden], self.wire, timeout=self.timeout)
        self.sent_at = sent
        return check_reply(self.conn, reply, hidden)

    def close(self) -> None:
        if self.session is not None:
            self.conn.close_session(self.session)
            self.session = None

    @property
    def peers(self) -> list[str]:
        return [self.conn.address]

    @property
    def idle_timeout(self) -> float:
        return stated_idle_timeout(self.opened) if self.session is not None else 0.0

    @property
    def leaving_peer(self) -> str | None:
        # Set when a `leaving` notice was read; notices arrive before the replies that follow them,
        # so one that came while we were idle is seen with the next step's reply (the node still
        # serves during its grace period), and the session moves on before the step after.
        return self.conn.address if self.conn.leaving else None


def check_heads_served(conn: PeerConnection, heads: tuple[int, int], timeout: float | None) -> None:
    """A member of an earlier version does not check the heads an `open` names (node/handler.py
    `_check_heads`), so its `info` is asked instead, at each open: review122 saw one restarted at
    its address and key with other heads summed for its old ones for ~53 s, every output wrong.
    PeerError `not_served` if it names others."""
    served = conn.request("info", timeout=timeout).fields.get("heads")
    if served != list(heads):
        raise PeerError(conn.address, "not_served", f"its info names heads {shown(served, 20)}, not "
                        f"{heads[0]}:{heads[1]} (a node of an earlier version, which does not check them at open)")


class AllReduceFailed(PeerError):
    """A head group's all-reduce step failed with no member known to be at fault (one could not
    send to another, was busy, its sums overflowed, the step ran past the client's timeout, or
    the outputs differed or were absurd): the group's sessions may hold the step in part, so it
    is reopened (InferenceSession), its members met by the client from then on, where each answers
    for its own partials."""


# Answers of a member to an all-reduce step that blame no one: it could not send to another member
# (not_served, relay_failed), had no room for the step now (busy), or its sums overflowed
# (bad_value: another member's partial may have been NaN or absurd, which the fan-out shows).
NO_FAULT = ("relay_failed", "not_served", "busy", "bad_value")


def all_reduce_wait(timeout: float | None) -> float:
    """How long a member waits for another's partial: well within the client's own wait for the
    step, so that a member that stopped is the one that times out here."""
    return min(10.0, max(0.1, (timeout or 30.0) / 4))


class HeadGroupStage(Stage):
    """Peers whose head ranges partition all heads of blocks [start, stop).

    Per block the hidden states fan out to every member twice: after attention and after the
    MLP the members' partial sums are added to the residual here. The member holding head 0
    carries the output biases, so the plain sum is the block's exact output.

    With `all_reduce` (every member says it takes them at open, and no spot check needs the
    partials), a step goes to every member once, naming the others (`names`: the contacts they
    know each other by), and the members exchange their partial sums themselves
    (node/all_reduce.py): one round trip a step instead of two a block. Every member answers with
    the output, and they must agree. Where that fails with no member at fault, the group goes
    back to the fan-out for good.
    """

    retries_busy = True

    def __init__(self, members: list[tuple[PeerConnection, tuple[int, int]]], start: int, stop: int,
                 model_id: str, wire: str = "float32", timeout: float | None = None,
                 names: dict[str, str] | None = None, all_reduce: bool = False):
        self.members = sorted(members, key=lambda m: m[1][0])  # fixed order: same sums every time
        self.start, self.stop, self.model_id = start, stop, model_id
        self.wire, self.timeout = wire, timeout
        self.names = names or {}  # member address -> the contact the others know it by
        self.sessions: list[str] = []
        self.limits: list[dict] = []  # the members' `opened` replies
        self.record: FanOutRecord | None = None  # what members were sent and answered, if spot-checked
        self.wants_all_reduce = all_reduce  # off for good once an all-reduce failed with no one at fault
        self.all_reduce = False  # whether this session's steps go by all-reduce
        self.on_fan_out: Callable[[str], None] | None = None  # told why, when an all-reduce failed
        self.max_length = 0
        self.group: list[list[str]] = []  # set at open (send_all_reduce)

    def open(self, max_length: int) -> None:
        if self.record is not None:
            self.record.reset()
        self._open(max_length)
        self.max_length = max_length
        self.all_reduce = (self.wants_all_reduce and self.record is None and len(self.members) > 1
                           and all(fields.get("all_reduce") is True for fields in self.limits))
        # what an all-reduce step names: each member's contact (as the others know it) and session
        self.group = [[self.names.get(conn.address, conn.address), sid]
                      for (conn, _), sid in zip(self.members, self.sessions)]

    def _open(self, max_length: int) -> None:
        self.sessions, self.limits = [], []
        sent = []
        for conn, heads in self.members:
            reply = conn.open_session(open_fields(self.model_id, max_length, self.start, self.stop, heads),
                                      timeout=self.timeout)
            self.sessions.append(reply.fields["session"])
            self.limits.append(reply.fields)
            sent.append(conn.open_sent)  # earlier than now for an open sent ahead (Swarm.open_ahead)
            if "heads" not in reply.fields:  # a node of an earlier version: it did not check them
                check_heads_served(conn, heads, self.timeout)
        self.sent_at = min(sent)

    def _fan_out(self, hidden: torch.Tensor, pos: int, phase: str, block: int) -> torch.Tensor:
        partials: list[torch.Tensor | None] = [None] * len(self.members)
        waiting = list(range(len(self.members)))
        sent = self.asking()  # every member's session has had a request since
        for retry in range(BUSY_RETRIES + 1):
            ids = {k: self.members[k][0].send("step", {"session": self.sessions[k], "pos": pos, "phase": phase,
                                                       "block": block, "wire": self.wire},
                                              [hidden], self.wire, timeout=self.timeout)
                   for k in waiting}
            busy = []
            for k in waiting:
                conn = self.members[k][0]
                try:
                    partials[k] = check_reply(conn, conn.recv(ids[k], "result", self.timeout), hidden)
                except PeerError as e:
                    # An overloaded member left its session as it was, while the others have
                    # stored this block: ask it alone again, a little later.
                    if e.code != "busy" or retry == BUSY_RETRIES:
                        raise
                    busy.append(k)
            if not busy:
                break
            waiting = busy
            busy_pause(retry + 1)
        self.sent_at = sent
        if self.record is not None:  # once every member took it (a refused input is stored nowhere)
            self.record.sent(block, phase, hidden)
            self.record.answered(block, phase, partials)
        total = hidden
        for partial in partials:  # in member order: the same sums every time
            total = total + partial
        return total

    def step(self, hidden: torch.Tensor, pos: int, rewind: bool = False) -> torch.Tensor:
        # Never part of a relayed step, so never holds a position it is asked for. Positions go in
        # pieces every member takes: halving after a refusal (as a layer stage does) cannot work
        # here, because the members that took the first block have stored it.
        if self.record is not None:  # every piece of the step is kept: a check covers them all
            self.record.begin(hidden.shape[1])
        n = min(positions_per_request(fields, hidden.shape[2]) for fields in self.limits)
        if hidden.shape[1] <= n:  # a decode step: no copy
            return self._step_piece(hidden, pos)
        return torch.cat([self._step_piece(hidden[:, i:i + n], pos + i) for i in range(0, hidden.shape[1], n)], dim=1)

    def _step_piece(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        if self.all_reduce:
            try:
                return self._all_reduce(hidden, pos)
            except AllReduceFailed as e:
                if pos:  # the session reopens the group and replays what it holds
                    raise
                log.info("%s; the group's members are met one by one from now on", e)
                try:
                    self.close()  # nothing held yet: new sessions here, and the fan-out
                    self.open(self.max_length)
                except PeerError as again:  # the session reopens it, and strikes only a fault (review130)
                    raise AllReduceFailed(again.address, again.code, f"reopening the group after an all-reduce "
                                          f"failed: {again.message}") from again
        for block in range(self.start, self.stop):
            hidden = self._fan_out(hidden, pos, "attn", block)
            hidden = self._fan_out(hidden, pos, "mlp", block)
        return hidden

    def _all_reduce(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        return self.all_reduce_result(self.send_all_reduce(hidden, pos), hidden)

    def send_all_reduce(self, hidden: torch.Tensor, pos: int) -> tuple[float, list[int]]:
        """Send one step by all-reduce to every member, naming the group; `all_reduce_result`
        reads it (a client stepping several sessions at once sends all first: bench/measure.py)."""
        sent = self.asking()
        # In float32 whatever the wire, and answered so: the members start from the residual the
        # client keeps, as a fan-out's sums do (review129: on a float16 wire the all-reduce began
        # from a rounded residual, and its tokens differed from the fan-out's at a near tie).
        # The wire is the partials' between members.
        return sent, [conn.send("step", {"session": self.sessions[k], "pos": pos, "wire": self.wire,
                                         "group": self.group, "member": k, "wait": all_reduce_wait(self.timeout)},
                                [hidden], "float32", timeout=self.timeout)
                      for k, (conn, _) in enumerate(self.members)]

    def all_reduce_result(self, asked: tuple[float, list[int]], hidden: torch.Tensor) -> torch.Tensor:
        """The output of the all-reduce step `asked` (send_all_reduce) of input `hidden`: every
        member's, which must agree. The first error ends it: a member's fault raises as it is,
        any other (NO_FAULT) AllReduceFailed, with the all-reduce off for good."""
        sent, ids = asked
        try:
            replies = self._answers(ids)
        except PeerError as e:
            if e.code not in NO_FAULT:
                raise
            self._fan_out_from_now(e.code)
            raise AllReduceFailed(e.address, e.code, f"all-reduce through {len(self.members)} members failed "
                                  f"({e.message})") from e
        self.sent_at = sent
        # A result of the wrong shape is its member's own; NaN too (every member checks its own
        # sums before it sends them: PeerConnection reads replies with finite=True).
        outputs = [reply_tensors(conn, msg, hidden, 1)[0] for (conn, _), msg in zip(self.members, replies)]
        first = self.members[0][0].address
        if any(not torch.equal(outputs[0], y) for y in outputs[1:]):
            # One sent the others a partial it did not keep, or one's output is a lie: the fan-out
            # shows every partial (and spot checks, which member).
            self._fan_out_from_now("bad_reply")
            raise AllReduceFailed(first, "bad_reply", "the members of a head group answered different outputs "
                                  "for one all-reduce step")
        try:
            check_magnitude(first, hidden, outputs[0])
        except PeerError as e:  # some member's partial made it so: the fan-out shows whose
            self._fan_out_from_now(e.code)
            raise AllReduceFailed(first, e.code, f"the all-reduce step's output: {e.message}") from e
        return outputs[0]

    def _fan_out_from_now(self, why: str) -> None:
        """This stage meets its members itself from now on; the swarm hears why (`on_fan_out`)."""
        self.wants_all_reduce = self.all_reduce = False
        if self.on_fan_out is not None:
            self.on_fan_out(why)

    def _answers(self, ids: list[int]) -> list[Message]:
        """The members' `result`s to requests `ids`, read as they come within one timeout; the
        first error raises (AllReduceFailed when some have not answered in time)."""
        replies: list[Message | None] = [None] * len(ids)
        deadline = time.monotonic() + (self.timeout or 30.0)
        while True:
            for k, (conn, _) in enumerate(self.members):
                if replies[k] is None:
                    replies[k] = conn.take(ids[k], "result")
            waiting = [conn for (conn, _), r in zip(self.members, replies) if r is None]
            left = deadline - time.monotonic()
            if not waiting:
                return replies
            if left <= 0:
                # Not the member's own fault, as far as anyone knows: each waits for the others'
                # partials, so one slow member makes all late (review128: the first was banned for
                # another's slowness). The group goes back to the fan-out, where each phase has
                # its own timeout; a member that is gone fails its open there.
                self._fan_out_from_now("timeout")
                raise AllReduceFailed(waiting[0].address, "timeout", f"no answer to an all-reduce step within "
                                      f"{self.timeout or 30.0:g}s from {len(waiting)} of {len(ids)} members")
            poller = zmq.Poller()
            for conn in waiting:
                conn.register(poller)
                left = conn.poll_limit(left)
            poller.poll(max(1, int(left * 1000)))

    def close(self) -> None:
        while self.sessions:  # one at a time: a close cut short leaves the rest to a second call
            conn, _ = self.members[len(self.sessions) - 1]
            conn.close_session(self.sessions[-1])
            self.sessions.pop()

    @property
    def peers(self) -> list[str]:
        return [conn.address for conn, _ in self.members]

    @property
    def idle_timeout(self) -> float:
        return min((stated_idle_timeout(fields) for fields in self.limits), default=0.0)

    @property
    def leaving_peer(self) -> str | None:  # the member that is leaving, not the group's first
        return next((conn.address for conn, _ in self.members if conn.leaving), None)

    def describe(self) -> dict:
        return {"layers": [self.start, self.stop], "peers": self.peers,
                "heads": [list(h) for _, h in self.members], "all_reduce": self.all_reduce}
