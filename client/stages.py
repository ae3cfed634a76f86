"""Stages: the steps of a route. Every stage runs blocks [start, stop) on the hidden states of
new positions and keeps its own KV cache (remote or local); all expose the same interface. A
head group, a stage of several peers, is in head_group.py."""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

import torch

from nanoswarm.protocol.messages import Message
from nanoswarm.protocol.tensors import WIRE_MAX, abs_max
from nanoswarm.shards.model import Blocks

from .link_sessions import idle_clock
from .peer_errors import PeerError
from .transport import MAX_FRAME_BYTES, PeerConnection

if TYPE_CHECKING:
    pass


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
    # timeout, so a `session_closed` to a request sent sooner is a fault (Reopening._takes_reclaim).
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
    def closed(self) -> bool:
        """Whether this stage holds no session on its nodes (closed, or a failover closed it)."""
        return False

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


def takes_input(hidden: torch.Tensor, wire: str) -> bool:
    """Whether honest nodes compute from the caller's `hidden`: finite, within `wire`'s range and
    not past HIDDEN_LIMIT. Past it is no model's hidden state, and from ~1e19 on a float32
    LayerNorm makes NaN of it: the node refuses `bad_value`, and the fault is the caller's."""
    return abs_max(hidden) <= min(HIDDEN_LIMIT, WIRE_MAX.get(wire, math.inf))  # (NaN compares False)


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


def check_reply(conn: PeerConnection, msg: Message, like: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """A peer's tensor must have the shape we sent (its last `last` positions, if asked so), and
    a magnitude an honest block could give (check_magnitude; `like` is what we sent): peers are
    untrusted. (Finiteness was checked when the reply was read: PeerConnection._read decodes with
    finite=True.)"""
    y = reply_tensors(conn, msg, like, 1, last)[0]
    check_magnitude(conn.address, like, y)
    return y


def reply_tensors(conn: PeerConnection, msg: Message, like: torch.Tensor, count: int,
                  last: int | None = None) -> list:
    """The `count` tensors of a reply, each of `like`'s shape (the last one's `last` rows only,
    if given), in `like`'s dtype and device. All but the last come as functions that make the
    tensor: a relayed step's outputs of its earlier hops are kept for failover replay only, so
    they need not cost torch calls now."""
    shape = tuple(like.shape)
    shapes = [shape] * (count - 1) + [shape if last is None else (shape[0], last, *shape[2:])]
    if [s for _, s in msg.specs] != shapes:
        raise PeerError(conn.address, "bad_reply", f"expected tensors {[list(s) for s in shapes]}, "
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


def piece_last(last: int | None, T: int, end: int) -> int | None:
    """The rows to ask of the piece of a T-position step that ends at `end`, when the caller keeps
    the step's last `last`: those of its own in that tail, and one at least (a reply has rows)."""
    return None if last is None else max(1, last - (T - end))


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

    def step(self, hidden: torch.Tensor, pos: int, rewind: bool = False, last: int | None = None) -> torch.Tensor:
        """With `last`, the node answers fewer rows where it says it can (`last_positions`): a
        prompt whose next token the caller samples needs 3 KB back, not T times that. The rows
        returned then end with the output's last `last` positions; the caller keeps those."""
        T = hidden.shape[1]
        if T > 1 and T > (n := positions_per_request(self.opened, hidden.shape[-1])):
            # Pieces the node's stated limits take (`opened`), not a refusal per halving: a
            # 500-token prompt to a node taking 100 was sent 7 times before (a review).
            return torch.cat([self.step(hidden[:, a:a + n], pos + a, rewind, piece_last(last, T, min(a + n, T)))
                              for a in range(0, T, n)], dim=1)
        try:
            return self._step(hidden, pos, rewind,
                              last if last is not None and last < T and self.opened.get("last_positions") is True
                              else None)
        except PeerError as e:
            if e.code != "too_large" or T < 2:
                raise
            # The node takes fewer positions a step (its --max-tokens-per-step, or its message
            # limit): a refusal leaves the session as it was, so send the positions in halves.
            h = T // 2
            first = self.step(hidden[:, :h], pos, rewind, piece_last(last, T, h))
            return torch.cat([first, self.step(hidden[:, h:], pos + h, rewind, last)], dim=1)

    def _step(self, hidden: torch.Tensor, pos: int, rewind: bool, last: int | None = None) -> torch.Tensor:
        fields = {"session": self.session, "pos": pos, "wire": self.wire}
        if rewind:
            fields["rewind"] = True
        if last is not None:
            fields["last"] = last
        sent = self.asking()
        reply = self.conn.request("step", fields, [hidden], self.wire, timeout=self.timeout)
        self.sent_at = sent
        return check_reply(self.conn, reply, hidden, last)

    def close(self) -> None:
        if self.session is not None:
            self.conn.close_session(self.session)
            self.session = None

    @property
    def closed(self) -> bool:
        return self.session is None

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
