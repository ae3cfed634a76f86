"""What a peer link knows of its connection's drops: the monitor's events read into a drop to
report (once, to the request that may have lost something), held back while an idle link
reconnects, and forgiven when the peer is back. PeerConnection's other half (client/transport.py)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import parse_monitor_message

from nanoswarm.keys.contact import endpoint_of

from .frames import recv_whole
from .peer_errors import HANDSHAKE_FAILURES, LinkDropped, PeerError, handshake_why, unreachable_why

if TYPE_CHECKING:
    from .transport import PeerConnection

# A request on a swarm's link whose drop lost nothing (forgive_idle_drops) waits this long for
# the link to come back before the drop is reported: a peer whose reconnect hangs (a machine that
# left the network: no answer to the SYN) or never finishes its handshake (a frozen process)
# would otherwise cost the request its whole timeout (a review). A reconnect and its CURVE
# handshake are ~5 round trips (1.5 s at a 300 ms RTT): a hold of 1 s got a healthy node that
# restarted while its clients sat idle banned by each of them on such a link (review92).
HOLD_SECONDS = 2.5  # ~5 round trips of 300 ms, or one SYN lost (Linux sends it again after 1 s) and a few of 200 ms


class LinkDrops:
    """PeerConnection's drops: what its monitor said (`drain_events`), the drop to report
    (`_dropped`, raised once by take() or send()), one held back while an idle link reconnects
    (`_held_drop`), and what a link that replaces this one takes over (`unreported_drop`)."""

    def _init_drops(self, heartbeat: float | None, forgive_idle_drops: bool) -> None:
        self.heartbeat = heartbeat  # seconds of silence after which the link counts as dropped
        self._connected = False  # once: a later refusal is a drop, reported as one
        self._started = time.monotonic()  # when the first connect began
        self._handshaken = False  # the current connection finished its handshake: heartbeats run
        self._ever_handshaken = False  # some connection did: a drop in a later handshake is no refusal
        self.handshakes = 0  # connections that finished their handshake: each may be another process
        self._handshake_failed: tuple[int, int] | None = None  # the current connection's: (event, value)
        self._dropped: tuple[str, str] | None = None  # what the monitor said, until take() reports it
        # With `forgive_idle_drops` (a swarm's links, where a reported drop strikes the peer), a
        # drop that lost nothing (no session open over the link, no reply awaited) is held back
        # while the link reconnects, reported if the peer is not back (a refused reconnect, a
        # second drop, or HOLD_SECONDS that a request waited), and forgotten when it is
        # (drain_events, take).
        self.forgive_idle_drops = forgive_idle_drops
        self._held_drop: tuple[str, str] | None = None
        self._retries = 0  # reconnects tried since the held drop
        self._hold_until = math.inf  # when a request waits for it: HOLD_SECONDS after that request
        self._harmless = False  # the drop held or to report lost nothing
        # `_dropped` came before the next request (a replaced link's, or one put back): send() reports it
        self._report_at_send = False

    def _drops_before_send(self: PeerConnection) -> None:
        """What send() does first about drops: one from before this request that lost something
        fails it before it goes out; one read as harmless is held for it while the link reconnects."""
        if self._report_at_send:
            # A drop that lost something, from before this request (a replaced link's, or one put
            # back), fails this request before it goes out: its reply, come before take() looked,
            # let the drop go unreported (under load) and fail some later, unrelated request.
            self._report_at_send = False
            if self._dropped is not None and not self._harmless:
                raise self._report_drop()
        if self.forgive_idle_drops:  # drops from before this request, read as such
            self.drain_events()
            if self._dropped is not None and self._harmless:
                # Reported while idle (the peer was down then), but it may be back, with libzmq's
                # next reconnect up to RECONNECT_MAX_MS away: a restarted node was banned while
                # it served (a review). Reconnect now; the drop is held for this request.
                self._held_drop, self._dropped, self._retries, self._hold_until = self._dropped, None, 0, math.inf
                if self._connected:  # (a link's first connect, under way, is not begun again)
                    self.socket.disconnect(self._endpoint)
                    self.socket.connect(self._endpoint)
            if self._held_drop is not None:  # this request waits a little for the link to come back
                self._hold_until = min(self._hold_until, time.monotonic() + HOLD_SECONDS)

    def _due_drop(self: PeerConnection) -> LinkDropped | None:
        """The drop take() reports now, if any: the one the monitor read, or a held one whose
        HOLD_SECONDS a request waited out."""
        if self._held_drop is not None and time.monotonic() >= self._hold_until:
            (code, why), self._held_drop = self._held_drop, None  # not back in time
            self._dropped = (code, f"{why}; not back within {HOLD_SECONDS:g}s")
        return None if self._dropped is None else self._report_drop()

    def poll_limit(self: PeerConnection, seconds: float) -> float:
        """`seconds`, cut to when take() must look again: a held drop is reported when its hold
        ends, with no event to wake a poll then. Callers that poll this link themselves take it."""
        if self._held_drop is None:
            return seconds
        return max(0.0, min(seconds, self._hold_until - time.monotonic()))

    def _report_drop(self: PeerConnection) -> LinkDropped:
        """The drop the monitor read, as the error to raise: reported once."""
        (code, message), harmless, self._dropped, self._harmless = self._dropped, self._harmless, None, False
        return LinkDropped(self.address, code, message, harmless)

    def put_back(self: PeerConnection, error: PeerError) -> None:
        """Report `error` again, if it is this link's drop: read by something other than the
        sessions over the link (a pin of another session's route, an early open's answer), the
        one report was used up, and their next step waited out its whole timeout (review106).
        On a link that holds nothing now (no session, no open sent ahead) the drop lost nothing
        that anyone still holds: forgotten if the link is back already (a restarted peer, struck
        and banned when it was reported: review107), else held while the link reconnects, as
        the drop of an idle link is (send)."""
        if self._rearm(error) and self._ever_handshaken and self._holds_nothing():
            if self._handshaken:
                self._dropped = None
            else:
                self._harmless = True

    def _rearm(self: PeerConnection, error: PeerError) -> bool:
        if isinstance(error, LinkDropped) and error.address == self.address and self._dropped is None:
            self._dropped, self._harmless = (error.code, error.message), error.harmless
            self._report_at_send = True  # (review147: put back after send() raised it, it was lost again)
            return True
        return False

    def forgive_if_back(self: PeerConnection) -> None:
        """Forget a drop not reported yet on a link that holds no session and no open sent ahead
        any more, and that has come back since (a restarted peer): its last session closed, it
        lost nothing that anyone still holds (reported, it struck and banned the healthy peer:
        review107). At a close, and when the link comes back while no reply is awaited
        (drain_events). One not back is reported as it is: held while the link reconnected, it
        cost the next open on a frozen or vanished peer 2.5 s (review108)."""
        if self._dropped is not None and self._handshaken and self._holds_nothing():
            self._dropped = None

    def _holds_nothing(self: PeerConnection) -> bool:
        """Whether a drop now would lose nothing anyone holds (with `forgive_idle_drops`): no
        session open over the link, no open sent ahead (a session coming)."""
        return self.forgive_idle_drops and not (self.sessions or self._early)

    def wait_handshake(self: PeerConnection, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the connection's handshake (reading the monitor);
        True once it is done, False on a drop (the next request reports it) or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain_events()
            if self._handshaken or self._dropped is not None or self.socket.closed:
                return self._handshaken
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.monitor.poll(max(1, int(min(left, 0.1) * 1000)))

    def drain_events(self: PeerConnection, awaiting: bool = False) -> None:
        """Read the monitor's events, keeping a drop for take() to report (`awaiting`: take()'s,
        a reply is awaited, which the drop may have lost). Holders of connections that may sit
        unused call this now and then: unread events fill the monitor's queue, and then libzmq's
        I/O thread blocks (RECONNECT_MAX_MS)."""
        if self.socket.closed:
            return
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            said = parse_monitor_message(recv_whole(self.monitor, copy=True))
            event = said["event"]
            if event == zmq.EVENT_CONNECTED:
                self._connected, self._handshake_failed = True, None
            elif event & HANDSHAKE_FAILURES:  # the drop that follows says why (_why_dropped)
                self._handshake_failed = (event, said["value"])
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = self._ever_handshaken = True
                self.handshakes += 1
                if self._harmless:  # back, and the drop lost nothing: no failure to report
                    # (Reported, it struck and banned a healthy peer that restarted, or that a
                    # pause of either side cut off, while the client sat idle: a review. A notice
                    # of leaving came over the connection before: the peer may be a new process.)
                    self._dropped = self._held_drop = None
                    self._harmless = self.leaving = False
                elif not awaiting:  # back after the last session it lost was closed (review109)
                    self.forgive_if_back()
            elif event == zmq.EVENT_CONNECT_RETRIED:
                if not self._connected and self._dropped is None:  # never reached: nothing listens there
                    # libzmq says the same after CONNECT_TIMEOUT (the heartbeat) as after a refusal:
                    # told apart by when (a refusal comes at once; one read a heartbeat late reads as a timeout)
                    timed_out = self.heartbeat is not None and time.monotonic() - self._started >= 0.9 * self.heartbeat
                    self._dropped = ("unreachable", unreachable_why(endpoint_of(self.address),
                                                                    self.heartbeat if timed_out else None))
                elif self._held_drop is not None:
                    # libzmq reports one retry as it starts reconnecting after a drop, and one
                    # for each connect refused after that: the peer is not back at once.
                    self._retries += 1
                    if self._retries > 1:
                        self._dropped, self._held_drop = self._held_drop, None
            else:  # a drop: the first until reported (reconnects to a frozen peer drop again, in the handshake)
                why, self._handshaken = ("disconnected", self._why_dropped()), False
                idle = self._ever_handshaken and not awaiting and self._holds_nothing()
                if self._dropped is None and self._held_drop is None:
                    self._harmless = idle
                    if idle:
                        self._held_drop, self._retries, self._hold_until = why, 0, math.inf
                        continue
                self._harmless = self._harmless and idle
                self._dropped, self._held_drop = self._dropped or self._held_drop or why, None

    def _why_dropped(self: PeerConnection) -> str:
        if self._handshaken:
            if self.heartbeat is None:
                return "connection closed by the peer"
            return f"connection lost: closed by the peer, or no answer to heartbeats for {self.heartbeat:g}s"
        event, status = self._handshake_failed or (None, 0)
        return handshake_why(event, status, self.server_key is not None, self.heartbeat, self.node_side)

    @property
    def peer_process(self: PeerConnection) -> tuple[str, int, int]:
        """The peer process this link last reached, as far as the link can tell: its address, the
        link's serial and its connections so far (read after `drain_events`). A peer restarted at
        its address is reached by a new connection (or a new link), so by another value."""
        return self.address, self.serial, self.handshakes

    @property
    def dropped(self: PeerConnection) -> bool:
        """Whether the monitor said the connection dropped (or never came up), not yet reported."""
        return self._dropped is not None

    @property
    def down(self: PeerConnection) -> bool:
        """Whether the link holds a drop (or a connect that never came up) not reported yet, held
        back or not; one reported since is not counted (its reader handled it)."""
        return self._dropped is not None or self._held_drop is not None

    def unreported_drop(self: PeerConnection) -> tuple[tuple[str, str], bool] | None:
        """The drop not reported yet (held back or not) and whether it lost nothing: what a link
        that replaces this one reports in its place (`take_over_drop`)."""
        if self._dropped is not None:
            return self._dropped, self._harmless
        return None if self._held_drop is None else (self._held_drop, True)

    def take_over_drop(self: PeerConnection, drop: tuple[tuple[str, str], bool]) -> None:
        """Report, as this link's, the drop of the link to the same peer that this one replaces
        (`unreported_drop`): one that lost something at its first request, one that lost nothing
        only if the peer is not back within HOLD_SECONDS of it (`send`). (Swarm.connection
        passes an old drop on as one that lost nothing: the old link would have been back by
        then, and forgiven it.)"""
        self._dropped, self._harmless = drop
        self._report_at_send = True

    @property
    def drop_reason(self: PeerConnection) -> str | None:
        """What the monitor said of a drop not yet reported ("unreachable: connection refused: ..."),
        or None; unlike take(), it leaves the drop to be reported."""
        return None if self._dropped is None else ": ".join(self._dropped)
