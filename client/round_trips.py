"""Asking many peers at once: one request to each, the replies read within one wait (`ask_all`),
and the round trip of each peer measured that way (`measure_round_trips` over a swarm's links,
`time_records` over links of its own)."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from nanoswarm.keys.records import record_contact
from nanoswarm.keys.table import RecordTable
from nanoswarm.protocol.messages import REPLY_TYPES, Message

from .peer_errors import PeerError, PeerTimeout
from .transport import MAX_TAKE_READS, PeerConnection

if TYPE_CHECKING:
    from .swarm import Swarm

log = logging.getLogger(__name__)

PROBE_PEERS = 32  # peers a connect times itself (measure_round_trips; of more, a sample)
BACKGROUND_PEERS = 128  # peers a background read of a table times (time_records), and peers that went a read asks
PROBE_SECONDS = 2.0  # the most a timing waits, handshakes and answers together
# Requests a peer is timed by, the fastest kept: one alone, on a fresh link, came out 2-5x the
# round trip and noisy on loopback, enough to part like peers (review103).
PROBE_ROUNDS = 3
RETIME_SECONDS = PROBE_SECONDS / 4  # a round trip this long may have been a late answer: timed again
# Seconds a round trip is kept before a long-lived client's background read times it again: a
# peer whose network changed (a laptop that moved, a congested link) kept its first one for good.
TIMING_LIFE = 300.0


def measure_round_trips(swarm: Swarm, contacts: list[str], timeout: float) -> None:
    """Time each of `contacts` (peers known from their records) not timed before, over the
    swarm's links once their handshakes are done, all at once within one `timeout`: at a
    connect (nothing waits on a session yet). Every peer of a bootstrap's table had the
    bootstrap's round trip, so a route could not tell a peer across an ocean from one next door.
    At most PROBE_PEERS (a sample of more: a background read times the rest). One silent in time
    counts as slow as the wait (`PeerTable.rtt_of`) until a background read times it, and its
    link is closed. Links that sessions use are not asked: a drop report read here would be lost
    to them (review103)."""
    todo = [c for c in _untimed(contacts, swarm.timed, PROBE_PEERS) if not swarm.held(c)]
    conns: dict[str, PeerConnection] = {}
    for contact in todo:
        swarm.timed[contact] = None  # tried
        with contextlib.suppress(PeerError):  # (the route's open says why)
            conns[contact] = swarm.connection(contact)
    rtts = time_links(conns, timeout)
    for contact in todo:
        swarm.timed[contact], swarm.timed_at[contact] = rtts.get(contact), time.monotonic()
        if contact in swarm.peers:
            swarm.peers[contact].rtt = swarm.rtt_of(contact, swarm.peers[contact].rtt)
        if contact not in rtts:
            swarm._close_link(contact)  # a fresh one if a route takes it: no stale drop to report
    if todo:
        log.info("round trips of %d peer%s measured, %d in time: %s", len(todo), "s" * (len(todo) != 1), len(rtts),
                 ", ".join(f"{c[:40]} {1e3 * t:.2f} ms" for c, t in sorted(rtts.items(), key=lambda x: x[1])[:8]))


def time_records(table: RecordTable, model_id: str, timed: Collection[str], timeout: float,
                 client_keys: tuple[bytes, bytes] | None, insecure: bool) -> dict[str, float | None]:
    """`time_links` to the peers of `table`'s records of `model_id` not among `timed` (at most
    BACKGROUND_PEERS), over links of its own, closed after (None: no answer in time): for a read
    on a thread other than the swarm's, whose links are not this thread's to use."""
    keys = {record_contact(r): None if r.insecure else r.curve_key for r in table.records(model_id)
            if insecure or not r.insecure}
    conns: dict[str, PeerConnection] = {}
    try:
        for contact in _untimed(keys, timed, BACKGROUND_PEERS):
            with contextlib.suppress(ValueError, zmq.ZMQError):  # a contact ZeroMQ cannot connect to
                conns[contact] = PeerConnection(contact, timeout, server_key=keys[contact], client_keys=client_keys)
        return {**dict.fromkeys(conns), **time_links(conns, timeout)}
    finally:
        for conn in conns.values():
            conn.close()


def _untimed(contacts: Iterable[str], timed: Collection[str], most: int) -> list[str]:
    """Those of `contacts` not among `timed`: at most `most`, a sample of more."""
    todo = [c for c in dict.fromkeys(contacts) if c not in timed]
    return random.sample(todo, most) if len(todo) > most else todo


def time_links(conns: dict[str, PeerConnection], timeout: float) -> dict[str, float]:
    """The round trip in seconds of each of `conns` that answers `info` within `timeout`: the
    fastest of PROBE_ROUNDS, timed once its handshake is done (review99). Each link is asked as
    soon as its own handshake is done and again as soon as it answers: waiting for all at each
    step, one frozen peer left every other untimed, and one that never answered left the others
    a single sample (review104). A link that floods (MAX_TAKE_READS messages, none its answer)
    is timed no more: its flood would delay the reading, and so inflate the timing, of
    every other reply (and one that flooded and answered fast would look the nearest)."""
    deadline = time.monotonic() + timeout
    rtts: dict[str, float] = {}
    rounds = dict.fromkeys(conns, 0)
    shaking = dict(conns)  # handshake not done yet
    asked: dict[str, tuple[int, float]] = {}  # contact -> (request id, when it was sent)
    strays = {contact: conn.strays for contact, conn in conns.items()}

    def ask(contact: str) -> None:
        sent = time.perf_counter()  # before send(): the request may be on its way before it returns
        try:
            asked[contact] = (conns[contact].send("info", timeout=0), sent)
        except PeerError as e:  # gone meanwhile: nothing to time
            conns[contact].put_back(e)

    while True:
        for contact, conn in list(shaking.items()):
            if conn.wait_handshake(0):
                del shaking[contact]
                ask(contact)
            elif conn.dropped or conn.socket.closed:  # never came up (nothing listens): nothing to time
                del shaking[contact]
        for contact, (req_id, sent) in list(asked.items()):
            conn = conns[contact]
            try:
                reply = conn.take(req_id, "info_reply")
            except PeerError as e:
                conn.put_back(e)  # a drop is the sessions' over the link to read (review106)
                reply = None
            else:
                if reply is None and conn.strays - strays[contact] < MAX_TAKE_READS:
                    continue  # not come yet
            del asked[contact]
            if reply is None:  # an error, or a flood
                rtts.pop(contact, None)
                continue
            took = time.perf_counter() - sent
            rtts[contact], rounds[contact] = min(took, rtts.get(contact, took)), rounds[contact] + 1
            if rounds[contact] < PROBE_ROUNDS:
                ask(contact)
        left = deadline - time.monotonic()
        if left <= 0 or not (shaking or asked):
            return rtts
        poller = zmq.Poller()
        for contact in [*shaking, *asked]:
            conns[contact].register(poller)
        poller.poll(max(1, int(min(left, 0.05) * 1000)))


@dataclass
class Asked:
    """Requests of one type sent at once (`send_all`), read by `take_all`."""
    msg_type: str
    pending: dict[str, tuple[PeerConnection, int]]  # contact -> (its link, the request's id)
    failed: dict[str, PeerError]  # contacts the request could not be queued to
    sent: float  # perf_counter, once all were queued


def send_all(conns: dict[str, PeerConnection], msg_type: str,
             fields: Mapping[str, dict[str, Any]] | None = None) -> Asked:
    """Queue `msg_type` on every connection (with the `fields` of its contact, if any), without
    waiting: `take_all` reads the replies. Requests of several types queued one after another are
    answered within one round trip (a `--peers` connect asks `info` and `records` so)."""
    asked = Asked(msg_type, {}, {}, 0.0)
    for contact, conn in conns.items():
        try:
            asked.pending[contact] = (conn, conn.send(msg_type, (fields or {}).get(contact), timeout=0))
        except PeerError as e:
            conn.put_back(e)
            asked.failed[contact] = e
    asked.sent = time.perf_counter()
    return asked


def take_all(asked: Asked, timeout: float, took: dict[str, float] | None = None,
             only: Collection[str] | None = None) -> dict[str, Message | PeerError]:
    """The replies to `asked` (of the contacts in `only`, if given), read within one `timeout`:
    each contact's reply, or the PeerError it failed with (PeerTimeout: none in time). `took`,
    if given, gets the seconds each reply took since it was sent (a fresh link's handshake
    included)."""
    out: dict[str, Message | PeerError] = {c: e for c, e in asked.failed.items() if only is None or c in only}
    waiting = {c: p for c, p in asked.pending.items() if only is None or c in only}
    deadline = time.monotonic() + timeout
    while waiting:
        for contact, (conn, req_id) in list(waiting.items()):
            try:
                reply: Message | PeerError | None = conn.take(req_id, REPLY_TYPES[asked.msg_type])
            except PeerError as e:
                conn.put_back(e)  # a drop is the sessions' over the link to read (review106)
                reply = e
            if reply is not None:
                out[contact] = reply
                del waiting[contact]
                if took is not None:
                    took[contact] = time.perf_counter() - asked.sent
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        poller = zmq.Poller()
        for conn, _ in waiting.values():
            conn.register(poller)
            left = conn.poll_limit(left)
        poller.poll(max(1, int(left * 1000)))
    out.update((contact, PeerTimeout(conn.address, timeout)) for contact, (conn, _) in waiting.items())
    return out


def ask_all(conns: dict[str, PeerConnection], msg_type: str, timeout: float,
            took: dict[str, float] | None = None,
            fields: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Message | PeerError]:
    """Send `msg_type` on every connection at once and read the replies within one `timeout`
    (`send_all`, `take_all`). Asked in turn, each contact that drops packets cost the others'
    wait its whole timeout."""
    return take_all(send_all(conns, msg_type, fields), timeout, took)
