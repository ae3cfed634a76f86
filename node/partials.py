"""The partial sums other members of a head group sent this node (node/all_reduce.py), kept until
the phase they belong to is summed, within a bound on their bytes.

A member may be a phase ahead of another, and a partial may come before the step it belongs to,
so partials wait here keyed by session and (position, block, phase, member, epoch: the session's
rewind number, node/all_reduce.py), with when they came and the CURVE key of their sender (checked
against the member's when the step names it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from typing import NamedTuple

import torch

from nanoswarm.protocol.errors import ErrorCode, ProtocolError

from .group_step import MAX_WAIT

# Partials kept for all sessions together, at most, in units of the node's message limit: a
# member's partials wait for its step, or for the next phase, and a peer that knows a session id
# must not fill the node's memory with them (review128). Past it partials are refused `busy`.
KEPT_MESSAGES = 4


class Kept(NamedTuple):
    came: float  # time.monotonic() when it came
    key: str | None  # its sender's CURVE key (None where the node knows no keys)
    partial: torch.Tensor  # float32
    tokens: int  # its positions


class KeptPartials:
    """session id -> {(pos, block, phase, member, epoch): Kept}, and their bytes in all."""

    def __init__(self, n_embd: int):
        self.by_session: dict[str, dict[tuple, Kept]] = {}
        self.bytes = 0
        self._row_bytes = 4 * n_embd  # a kept partial's bytes a position (float32)

    def __bool__(self) -> bool:
        return bool(self.by_session)

    def of(self, sid: str) -> Mapping[tuple, Kept]:
        """What is kept for session `sid` (empty if nothing)."""
        return self.by_session.get(sid, {})

    def add(self, sid: str, k: tuple, key: str | None, tokens: int, max_message_bytes: int,
            partial: Callable[[], torch.Tensor]) -> None:
        """Keep a partial, decoded by `partial()` only once it is taken (ProtocolError: one for
        that phase and member came already, or the KEPT_MESSAGES messages' bytes are reached; a
        refused q80 partial would cost 8x its bytes to decode: review178)."""
        kept = self.by_session.get(sid, {})
        if k in kept:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"member {k[3]}'s partial of this phase came already")
        nbytes = tokens * self._row_bytes
        if self.bytes + nbytes > KEPT_MESSAGES * max_message_bytes:
            raise ProtocolError(ErrorCode.BUSY, "this node keeps as many partials as it takes; again later")
        tensor = partial()
        if tensor.dtype is not torch.float32:  # (a float16, bfloat16 or q80 wire's)
            tensor = tensor.to(torch.float32)
        self.by_session.setdefault(sid, kept)[k] = Kept(time.monotonic(), key, tensor, tokens)
        self.bytes += nbytes

    def pop(self, sid: str, k: tuple) -> Kept:
        entry = self.by_session[sid].pop(k)
        self.bytes -= entry.tokens * self._row_bytes
        return entry

    def forget(self, sid: str, before: int | None = None) -> None:
        """Forget session `sid`'s partials: all, or those of epochs before `before`."""
        kept = self.by_session.get(sid, {})
        for k in [k for k in kept if before is None or k[4] < before]:
            self.pop(sid, k)
        if not kept:
            self.by_session.pop(sid, None)

    def keep_latest(self, sid: str, member: int, epoch: int, after: int) -> None:
        """Before a partial of `epoch` from `member` is kept for a rewound step to come: forget
        those it kept of earlier epochs past `after` (a rewind that was rewound again), or refuse it
        (ProtocolError) where one of a later epoch came already. One a member, whoever sent it."""
        ahead = [k for k in self.of(sid) if k[3] == member and after < k[4]]
        if any(k[4] >= epoch for k in ahead):
            raise ProtocolError(ErrorCode.BAD_POSITION, f"a partial of epoch {epoch} from member {member}: one of "
                                "that epoch or a later one came already")
        for k in ahead:
            if k[4] < epoch:
                self.pop(sid, k)

    def forget_stale(self, open_sessions: Container[str], stepping: Mapping[str, int], now: float) -> None:
        """Forget the partials of sessions that are gone, and those that waited MAX_WAIT for a step
        that never came (its member refused it, say), a rewound one's too (`stepping`: the epoch of
        each session's step under way; kept past it, they would outlive every step)."""
        for sid in list(self.by_session):
            if sid not in open_sessions:
                self.forget(sid)
                continue
            epoch = stepping.get(sid)
            for k in [k for k, entry in self.by_session[sid].items()
                      if now - entry.came > MAX_WAIT and (epoch is None or k[4] > epoch)]:
                self.pop(sid, k)
            if not self.by_session[sid]:
                del self.by_session[sid]

