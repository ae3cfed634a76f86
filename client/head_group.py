"""A head group: peers whose head ranges partition every head of blocks [start, stop), met as
one stage. Its members all-reduce their partial sums (node/all_reduce.py), or, where they cannot,
the client fans each block's phases out to them and adds the partials itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import zmq

from nanoswarm.protocol.errors import shown
from nanoswarm.protocol.messages import Message

from .peer_errors import PeerError
from .stages import (
    BUSY_RETRIES,
    Stage,
    busy_pause,
    check_magnitude,
    check_reply,
    open_fields,
    piece_last,
    positions_per_request,
    reply_tensors,
    stated_idle_timeout,
    takes_input,
)
from .transport import PeerConnection

if TYPE_CHECKING:
    from .verify import FanOutRecord

log = logging.getLogger(__name__)


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
    the outputs differed or were absurd): the group's sessions may hold the step in part, so the
    step goes on by fan-out with its first phase step rewinding each member (HeadGroupStage,
    `_fan_out_in_place`), or at the session's first step, or with a member of an earlier version,
    the group is reopened (InferenceSession); its members are met by the client from then on,
    where each answers for its own partials."""


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
        self.epoch = 0  # the sessions' latest rewind by all-reduce (its steps say it: send_all_reduce)

    def open(self, max_length: int) -> None:
        if self.record is not None:
            self.record.reset()
        self._open(max_length)
        self.max_length, self.epoch = max_length, 0
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

    @property
    def takes_rewind(self) -> bool:
        """Whether the group's next step can rewind its members' sessions, as it goes now: a
        fan-out's on its first block's attention (`head_rewind`), an all-reduce step whole, ending
        one still running (`group_rewind`). Members of an earlier version refuse it. A step cut
        short is then redone in place, where the group was reopened and replayed
        (InferenceSession._settle)."""
        flag = "group_rewind" if self.all_reduce else "head_rewind"
        return bool(self.limits) and all(fields.get(flag) is True for fields in self.limits)

    @property
    def _fan_out_in_place(self) -> bool:
        """Whether, after an all-reduce failed with no member at fault, the step goes on by fan-out
        on the same sessions: every member's first phase step rewinds, ending its all-reduce step
        where it still runs (`group_rewind`: sixty-eighth session). Members of an earlier version
        would refuse that phase step (the step still running): the session reopens the group and
        replays its history instead."""
        return bool(self.limits) and all(fields.get("group_rewind") is True and fields.get("head_rewind") is True
                                         for fields in self.limits)

    def _fan_out(self, hidden: torch.Tensor, pos: int, phase: str, block: int, rewind: bool = False) -> torch.Tensor:
        partials: list[torch.Tensor | None] = [None] * len(self.members)
        waiting = list(range(len(self.members)))
        sent = self.asking()  # every member's session has had a request since
        fields = {"phase": phase, "block": block, "wire": self.wire, **({"rewind": True} if rewind else {})}
        for retry in range(BUSY_RETRIES + 1):
            ids = {k: self.members[k][0].send("step", {"session": self.sessions[k], "pos": pos, **fields},
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

    def step(self, hidden: torch.Tensor, pos: int, rewind: bool = False, last: int | None = None) -> torch.Tensor:
        """With `last`, an all-reduce step's members answer fewer rows where they all say they can
        (`last_positions`), as RemoteLayerStage.step: the rows returned end with the output's last
        `last` positions. (The fan-out's partials are every row's: the block's next phase needs them.)
        With `rewind` (after a step cut short, in a group whose members all `takes_rewind`), the
        members drop what they hold from `pos` on first: the first piece's all-reduce step, or its
        first block's attention, rewinds."""
        # Never part of a relayed step. Positions go in pieces every member takes: halving after a
        # refusal (as a layer stage does) cannot work here, because the members that took the
        # first block have stored it.
        # (a group that cannot was reopened instead, holding `pos`: _settle)
        rewind = rewind and self.takes_rewind
        if self.record is not None:  # every piece of the step is kept: a check covers them all
            if rewind:
                self.record.truncate(pos)
            self.record.begin(hidden.shape[1])
        if not all(fields.get("last_positions") is True for fields in self.limits):
            last = None
        T = hidden.shape[1]
        n = min(positions_per_request(fields, hidden.shape[2]) for fields in self.limits)
        if T <= n:  # a decode step: no copy
            return self._step_piece(hidden, pos, last, rewind)
        return torch.cat([self._step_piece(hidden[:, i:i + n], pos + i, piece_last(last, T, min(i + n, T)),
                                           rewind and i == 0)
                          for i in range(0, T, n)], dim=1)

    def _step_piece(self, hidden: torch.Tensor, pos: int, last: int | None = None,
                    rewind: bool = False) -> torch.Tensor:
        if self.all_reduce:
            try:
                return self._all_reduce(hidden, pos, last, rewind)
            except AllReduceFailed as e:
                if pos and not self._fan_out_in_place:  # the session reopens the group and replays what it holds
                    raise
                log.info("%s; the group's members are met one by one from now on", e)
                if pos:  # each member drops what it holds of the step, ending it where it still runs
                    rewind = True
                else:
                    try:
                        self.close()  # nothing held yet: new sessions here, and the fan-out
                        self.open(self.max_length)
                        rewind = False
                    except PeerError as again:  # the session reopens it, and strikes only a fault (review130)
                        raise AllReduceFailed(again.address, again.code, f"reopening the group after an "
                                              f"all-reduce failed: {again.message}") from again
        for block in range(self.start, self.stop):
            hidden = self._fan_out(hidden, pos, "attn", block, rewind and block == self.start)
            hidden = self._fan_out(hidden, pos, "mlp", block)
        return hidden

    def _all_reduce(self, hidden: torch.Tensor, pos: int, last: int | None = None,
                    rewind: bool = False) -> torch.Tensor:
        if last is not None and last >= hidden.shape[1]:
            last = None
        return self.all_reduce_result(self.send_all_reduce(hidden, pos, last, rewind), hidden, last)

    def send_all_reduce(self, hidden: torch.Tensor, pos: int, last: int | None = None,
                        rewind: bool = False) -> tuple[float, list[int]]:
        """Send one step by all-reduce to every member, naming the group (and with `last`, from 1
        to T - 1, asking for the output's last rows only); `all_reduce_result` reads it, with the
        same `last` (a client stepping several sessions at once sends all first: bench/measure.py).
        With `rewind` each member first ends the step it may still run (cut short here) and drops
        what it holds from `pos` on; the step names a new epoch, as its partials will, so that a
        member refuses the late partials of the steps rewound (node/all_reduce.py)."""
        sent = self.asking()
        fields = {"group": self.group, "wait": all_reduce_wait(self.timeout)}
        if rewind:  # (counted first: a step cut short while sent may have reached some members)
            self.epoch += 1
            fields["rewind"] = True
        if self.epoch:
            fields["epoch"] = self.epoch
        if last is not None:
            fields["last"] = last
        # In float32 whatever the wire, and answered so: the members start from the residual the
        # client keeps, as a fan-out's sums do (review129: on a float16 wire the all-reduce began
        # from a rounded residual, and its tokens differed from the fan-out's at a near tie).
        # The wire is the partials' between members.
        return sent, [conn.send("step", {"session": self.sessions[k], "pos": pos, "wire": self.wire,
                                         "member": k, **fields}, [hidden], "float32", timeout=self.timeout)
                      for k, (conn, _) in enumerate(self.members)]

    def all_reduce_result(self, asked: tuple[float, list[int]], hidden: torch.Tensor,
                          last: int | None = None) -> torch.Tensor:
        """The output of the all-reduce step `asked` (send_all_reduce) of input `hidden`: every
        member's, which must agree. The first error ends it: a member's fault raises as it is,
        any other (NO_FAULT) AllReduceFailed, with the all-reduce off for good."""
        sent, ids = asked
        replies: list[Message | None] = [None] * len(ids)
        try:
            self._answers(ids, replies)
        except PeerError as e:
            if e.code == "bad_value" and not takes_input(hidden, self.wire):
                # The caller's own input, NaN, Inf, past HIDDEN_LIMIT or past the wire: the
                # session says so, CallerError (review146: the group went by fan-out for it, and
                # the swarm's new sessions for 2 minutes). The other members may still be running
                # the step, waiting for the refusing one's partial: their answers first, or the
                # session's next step finds one "still running" and bans it (a flaky test's cause).
                self._drain(ids, [r is not None or conn.address == e.address
                                  for (conn, _), r in zip(self.members, replies)])
                raise
            if e.code not in NO_FAULT:
                raise
            self._fan_out_from_now(e.code)
            raise AllReduceFailed(e.address, e.code, f"all-reduce through {len(self.members)} members failed "
                                  f"({e.message})") from e
        self.sent_at = sent
        # A result of the wrong shape is its member's own; NaN too (every member checks its own
        # sums before it sends them: PeerConnection reads replies with finite=True).
        outputs = [reply_tensors(conn, msg, hidden, 1, last)[0] for (conn, _), msg in zip(self.members, replies)]
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

    def _answers(self, ids: list[int], replies: list[Message | None]) -> list[Message]:
        """The members' `result`s to requests `ids`, read into `replies` as they come within one
        timeout; the first error raises (AllReduceFailed when some have not answered in time)."""
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

    def _drain(self, ids: list[int], done: list[bool]) -> None:
        """Read what the members not `done` still owe for requests `ids` (results or errors alike),
        within the step's timeout: each waits at most the step's `wait` for a partial that will
        not come."""
        deadline = time.monotonic() + (self.timeout or 30.0)
        while not all(done) and time.monotonic() < deadline:
            for k, (conn, _) in enumerate(self.members):
                if not done[k]:
                    try:
                        done[k] = conn.take(ids[k], "result") is not None
                    except PeerError:
                        done[k] = True
            if not all(done):
                time.sleep(0.005)

    def close(self) -> None:
        while self.sessions:  # one at a time: a close cut short leaves the rest to a second call
            conn, _ = self.members[len(self.sessions) - 1]
            conn.close_session(self.sessions[-1])
            self.sessions.pop()

    @property
    def closed(self) -> bool:
        return len(self.sessions) < len(self.members)

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
