"""Sessions opened over one peer link (PeerConnection): opened, closed, and the opens whose
answers nobody waits for any more (given up on, or sent early and not claimed), whose sessions
are closed when the answers come."""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import zmq

from nanoswarm.protocol.messages import Message

from .peer_errors import PeerError

if TYPE_CHECKING:
    from .transport import PeerConnection

log = logging.getLogger(__name__)

MAX_ORPHANS = 256  # opens given up on, remembered per connection for their late answers

# Idle times (Reopening._takes_reclaim) run on a clock that counts a suspended machine's sleep
# where there is one (Linux): a laptop that slept past a node's idle timeout was idle that long.
_IDLE_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)


def idle_clock() -> float:
    return time.clock_gettime(_IDLE_CLOCK) if _IDLE_CLOCK is not None else time.monotonic()


def next_request_id() -> int:
    """A request id no peer can predict, unique across all connections of this process (the
    replies of a relayed step arrive on several connections with the id of its first request;
    62 random bits make a repeat among the requests in flight vanishingly unlikely). A counter
    let any node that had seen one id name the client's next: a stranger holding a session id
    could then send a relayed step whose result the client took for its own (a review)."""
    return secrets.randbits(62) + 1


def _open_key(fields: dict[str, Any]) -> tuple:
    return (fields.get("model_id"), fields.get("max_length"), tuple(fields.get("layers") or ()),
            tuple(fields.get("heads") or ()))


class LinkSessions:
    """PeerConnection's sessions: `sessions` (opened and not closed), `_orphans` (request ids of
    opens whose answers nobody awaits), `_early` (opens sent ahead: fields -> (request id,
    idle_clock when sent)) and `_unwanted` (request ids of opens sent ahead that a later plan
    did not want), all set up in PeerConnection.__init__."""

    @property
    def in_use(self: PeerConnection) -> bool:
        """Whether closing the link now would lose what only it can close: a session open over
        it, an open sent ahead, or one given up on whose late answer is to be closed."""
        return bool(self.sessions or self._early or self._orphans or self._unwanted)

    def open_session(self: PeerConnection, fields: dict[str, Any], timeout: float | None = None) -> Message:
        """`open` a session, kept in `sessions` until closed; `open_sent` is when the open that
        it answered went out (idle_clock), earlier than now for one sent ahead (open_early). Once
        the request may have gone out, an open given up on (Ctrl-C, a timeout) is remembered:
        the node may open the session anyway, and only this connection can close it. Its late
        `opened` closes it (take). Left unknown, each such session held its node's cache until
        the idle timeout (a review's interrupts, 32 in 60 interrupted generations)."""
        req_id, sent = self._early.pop(_open_key(fields), (None, None))
        claimed = req_id is not None and self._orphans.pop(req_id, 0) is None  # its answer not read yet
        if not claimed:
            req_id, sent = next_request_id(), idle_clock()
        reply = None
        try:
            reply = (self.recv(req_id, "opened", timeout) if claimed else
                     self.request("open", fields, timeout=timeout, req_id=req_id))
            # A signal that came while the reply was awaited is raised at the first call after it:
            # here, where the session's id is known, so it is closed below (a review's fuzz: 1 in ~200).
            self.sessions.add(reply.fields["session"])
        except BaseException:
            if reply is None and self.last_opened is not None and self.last_opened[0] == req_id:
                # read, and cut short before it came back here; in `sessions` first: a close cut
                # short too (a second Ctrl-C) is sent when the link closes
                self.sessions.add(self.last_opened[1])
                self.close_session(self.last_opened[1])
                raise
            if reply is not None:
                self.close_session(reply.fields["session"])
                raise
            if self.answered != req_id:  # (refused: no session, and no answer to come)
                self._orphan(req_id)
            raise
        self.open_sent = sent
        return reply

    def open_early(self: PeerConnection, wanted: list[dict[str, Any]]) -> None:
        """Queue an `open` for each of `wanted` (its fields) not queued yet, which `open_session`
        with the same fields claims later: the opens of a route's stages then cross the network
        together, one round trip for the route and not one a stage. Those queued before and not
        wanted now are orphans, whose sessions `settle_early` closes (or any read of their
        answers: a link off the route may not be read again for the whole generation, review96)."""
        keys = [_open_key(fields) for fields in wanted]
        for key in [k for k in self._early if k not in keys]:
            self._unwanted.append(self._early.pop(key)[0])
        for key, fields in zip(keys, wanted):
            if key not in self._early:
                req_id, sent = next_request_id(), idle_clock()
                self._orphan(req_id)  # first: a Ctrl-C in the send may come after it went out
                self.send("open", fields, req_id=req_id, timeout=0)
                self._early[key] = req_id, sent

    def settle_early(self: PeerConnection, deadline: float) -> None:
        """Read the answers of opens sent ahead and not claimed, until monotonic `deadline`,
        closing each session they opened; the rest stay orphans, closed when read later. None
        is left to be claimed: an old answer (`busy`, or a session the node has since
        reclaimed) would be taken for a new open's."""
        early = [req_id for req_id, _ in self._early.values()] + self._unwanted
        self._early, self._unwanted = {}, []
        for req_id in early:
            if req_id not in self._orphans:  # read meanwhile, and closed if it opened one
                continue
            try:
                msg = self.recv(req_id, "opened", max(0.0, deadline - time.monotonic()))
            except PeerError as e:  # refused, or not come yet (an orphan still: closed when read)
                if self.answered == req_id:  # refused: nothing more will come for it
                    del self._orphans[req_id]
                self.put_back(e)  # a drop is the sessions' over this link to read (review106)
                continue
            del self._orphans[req_id]
            self.close_session(msg.fields["session"])

    def _orphan(self: PeerConnection, req_id: int) -> None:
        self._orphans[req_id] = None
        while len(self._orphans) > MAX_ORPHANS:  # those never answered: the oldest go
            del self._orphans[next(iter(self._orphans))]

    def _orphan_answered(self: PeerConnection, msg: Message) -> None:
        del self._orphans[msg.id]
        if msg.type == "opened" and isinstance(session := msg.fields.get("session"), str):
            log.debug("%s: closing session %s, opened after its open was given up on", self.address, session[:16])
            self.sessions.add(session)  # first: a close cut short (Ctrl-C) is sent when the link closes
            self._send_close(session)  # (within a take(), whose reply a drop may have lost: none is forgiven)

    def close_session(self: PeerConnection, session: str) -> None:
        """Queue `close` for `session` (best effort: a node reclaims idle sessions anyway). Kept in
        `sessions` until it is queued: a close cut short is sent when the link closes. The last
        one closed, a drop the link has come back from is forgotten (forgive_if_back)."""
        self._send_close(session)
        self.forgive_if_back()

    def _send_close(self: PeerConnection, session: str) -> None:
        try:
            self.send("close", {"session": session}, timeout=0)
            self.closes_queued = True
        except PeerError as e:  # closed, or no room: the node reclaims idle sessions anyway
            self._rearm(e)  # a drop is the other sessions' over this link to read (review106)
        except zmq.ZMQError:
            pass
        self.sessions.discard(session)

    def close_sessions(self: PeerConnection) -> None:
        """Queue `close` for every session still open over this connection."""
        for session in list(self.sessions):
            self.close_session(session)
