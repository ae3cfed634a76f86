"""Request handling on a node: decode and admit every message, answer the simple ones (info, open,
close, admit, records) and hand steps and forwards to the StepRunner (node/steps.py), whose checks
(node/step_checks.py) validate them before it computes them. No sockets here, so the fuzz tests can
drive it directly; node/server.py feeds it from the ROUTER socket."""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from nanoswarm.keys.identity import is_z85_key
from nanoswarm.protocol.errors import ErrorCode, ProtocolError, shown
from nanoswarm.protocol.messages import (
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    Message,
    decode,
    encode,
    parse_next,
    parse_range,
    peek_id,
)
from nanoswarm.shards.model import Blocks

from .all_reduce import AllReduces
from .memory import memory_usage
from .seen_ids import SeenIds
from .sessions import DROPPED, NodeLimits, Session, SessionStore
from .step_checks import PendingStep
from .steps import NodeStats, Reply, StepRunner

log = logging.getLogger(__name__)

# Stateless forwards computed in one turn of the server loop, after the turn's steps; the rest
# are refused `busy`. One forward carries at most --max-tokens-per-step rows x positions.
MAX_FORWARDS_PER_BATCH = 2


class RequestHandler:
    def __init__(self, blocks: Blocks, model_id: str, peer_id: str,
                 limits: NodeLimits | None = None):
        self.config = blocks.config
        self.model_id = model_id
        self.peer_id = peer_id
        self.limits = limits or NodeLimits()
        self.sessions = SessionStore(self.limits)
        self._emptied_at = -1  # reserved GPU bytes after the last empty_cache (expire_idle)
        self.stats = NodeStats()
        self.steps = StepRunner(blocks, self.sessions, self.limits, self.stats)
        self.head_shard = self.steps.head_shard
        self.groups = AllReduces(self.steps, self.sessions)  # a head group's all-reduce steps
        self.device, self.dtype = self.steps.device, self.steps.dtype
        self.leaving = False
        self.extra_info: dict[str, Any] = {}  # set by the server: address, keys, records
        # The model's manifest (set by the daemon), sent in `info` to whoever asks for it: its
        # hash is the model id, so an asker without the model's files (`nanoswarm peers`) learns
        # the model's shape from it and can check that it is the model's.
        self.manifest: dict[str, Any] | None = None
        self.on_records = None  # callable(Message) -> records_reply fields, set by the gossip layer
        # callable(contact), set by the server: a pinned next hop's link starts its handshake at
        # `admit`, not at the session's first relayed step (a few round trips each, review92b)
        self.on_relay_to: Callable[[str], None] | None = None
        # callable(frames) -> the sender's CURVE key (z85 text, from ZAP), set by a server with
        # CURVE: relayed steps are then taken only as a session's owner pinned them (`admit`).
        self.sender_key: Callable[[list], str | None] | None = None
        self.seen = SeenIds()  # recent request ids per peer: a duplicate is refused (node/seen_ids.py)

    # ----- entry points -------------------------------------------------------------------
    def handle_batch(self, batch: list[tuple[bytes, list]]) -> list[Reply]:
        """Handle every message of `batch`; decode steps of different sessions run together, and
        then at most MAX_FORWARDS_PER_BATCH stateless forwards (the rest are refused `busy`)."""
        replies: list[Reply] = []
        pending: list[PendingStep] = []
        forwards: list[tuple[bytes, Message]] = []
        per_peer: dict[bytes, int] = defaultdict(int)
        self.steps.begin_batch()
        for peer, frames in batch:
            req_id, to, msg = None, peer, None
            try:
                msg = decode(frames, self.limits.max_message_bytes, types=REQUEST_TYPES)
                to, req_id = self._reply_route(peer, msg, frames)
                self._admit(peer, msg, per_peer, reply_to=to)
                if msg.type == "forward":
                    # Sessions' steps first: a forward is a one-off of any size, a step part of
                    # someone's generation. A flood of forwards from many connections (each within
                    # --max-inflight) made a generation's steps wait behind them until it timed
                    # out, and its client banned the honest node (a review). A forward this node
                    # would refuse anyway is refused as such first: `busy` says "again later".
                    checked = self._check_forward(msg)
                    if len(forwards) >= MAX_FORWARDS_PER_BATCH:
                        raise ProtocolError(ErrorCode.BUSY, "node busy with other stateless forwards; "
                                            "retry the same request later")
                    forwards.append((peer, msg, checked))
                    continue
                if msg.type == "partial":  # another member's partial sum of an all-reduce step
                    self.groups.take(msg, self.sender_key(frames) if self.sender_key is not None else None)
                    continue
                if pending and msg.type in ("step", "close") and any(
                        p.msg.fields["session"] == msg.fields["session"] for p in pending) and (
                        msg.type == "step" or self._owns(peer, msg.fields["session"])):
                    # A pipelined step (or close) of a session already in this batch is only valid
                    # once the earlier step has run.
                    replies.extend(self._run(pending))
                    pending = []
                if msg.type == "step" and msg.get("phase") == "attn" and msg.get("rewind") is True \
                        and self.head_shard and self._owns(peer, msg.fields["session"]):
                    # Its client goes on by fan-out (an all-reduce failed, or a step was cut short):
                    # an all-reduce step still running ends, the session as before it, and no
                    # partial kept for the session is needed (review202: one of the ended step, come
                    # late, was kept 60 s). The phase step is then checked as any.
                    replies.extend(self.groups.end(msg.fields["session"]))
                elif msg.type == "step" and msg.fields["session"] in self.groups.steps \
                        and not (msg.get("group") is not None and msg.get("rewind") is True):  # (which ends it)
                    raise ProtocolError(ErrorCode.BAD_POSITION, "an all-reduce step of this session is still running")
                if msg.type == "step" and msg.get("group") is not None:
                    replies.extend(self.groups.start(peer, msg, self.can_relay))  # computed after the batch's steps
                    continue
                if msg.type == "step":
                    # Steps relayed by the hop before go on only as the owner pinned (`admit`).
                    pinned = to != peer and self.checks_senders
                    pending.append(self.steps.checks.validate((to, req_id), msg, pinned=pinned))
                    pending[-1].sender = peer
                else:
                    replies.append((peer, self._handle_simple(peer, msg)))
            except Exception as e:
                if req_id is None:  # (a relayed step's reply id may be 0)
                    req_id = peek_id(frames[0]) if frames else 0
                replies.append((to, self._refusal(req_id, e, peer, msg)))
        if pending:
            replies.extend(self._run(pending))
        replies.extend(self.groups.advance())
        for peer, msg, checked in forwards:
            try:
                replies.append((peer, self.steps.forward(msg, *checked)))
            except Exception as e:
                replies.append((peer, self._refusal(msg.id, e, peer, msg)))
        return replies

    def _run(self, pending: list[PendingStep]) -> list[Reply]:
        replies = self.steps.run(pending)
        for p in self.steps.take_refused_busy():  # as _refusal does
            self.seen.forget(p.sender, p.msg.id)
        return replies

    def _refusal(self, req_id: int, e: Exception, peer: bytes, msg: Message | None) -> list:
        """The error reply for what handling a request raised: a bug must not take the node down.
        A request refused `busy` is forgotten: "busy" says "send it again", and the same request
        sent again got `duplicate_request` (a review)."""
        if msg is not None and (isinstance(e, torch.cuda.OutOfMemoryError)
                                or isinstance(e, ProtocolError) and e.code is ErrorCode.BUSY):
            self.seen.forget(peer, msg.id)
        if isinstance(e, ProtocolError):
            # -vv shows who was refused what (a review: a misconfigured client was invisible).
            if log.isEnabledFor(logging.DEBUG):  # (its arguments cost a refusal flood otherwise)
                log.debug("refused %s from connection %s: %s: %s", msg.type if msg is not None else "a message",
                          peer.hex()[:16], e.code.value, shown(e.message))
            return self._error(req_id, e.code, e.message)
        if isinstance(e, torch.cuda.OutOfMemoryError):  # copying a step's input to the device, or a forward
            return self._error(req_id, ErrorCode.BUSY, self.steps.out_of_memory())
        log.error("internal error handling a request", exc_info=e)
        self.steps.note_error(e)
        return self._error(req_id, ErrorCode.INTERNAL, type(e).__name__)

    def handle(self, peer: bytes, frames: list) -> list:
        """One message, one reply (tests and the fuzzer)."""
        return self.handle_batch([(peer, frames)])[0][1]

    @property
    def blocks(self) -> Blocks:
        """The blocks this node serves; the rebalancer (node/placement.py) may swap them for others
        of the same model while no session is open."""
        return self.steps.blocks

    @blocks.setter
    def blocks(self, blocks: Blocks) -> None:
        self.steps.blocks = blocks

    @property
    def can_relay(self) -> Callable[[str], bool] | None:
        """callable(contact) -> bool: whether a relayed step may go on to `contact` (node/relay.py);
        set by the gossip layer."""
        return self.steps.checks.can_relay

    @can_relay.setter
    def can_relay(self, fn: Callable[[str], bool] | None) -> None:
        self.steps.checks.can_relay = fn

    # ----- admission ----------------------------------------------------------------------
    @property
    def device_failure(self) -> str | None:
        """Why this node's device can compute no more (a lost CUDA context), if it cannot."""
        return self.steps.device_failure

    @property
    def checks_senders(self) -> bool:
        """Whether this node knows who sent a message (CURVE with ZAP): then a session takes
        relayed steps only as its owner pinned them (`admit`)."""
        return self.sender_key is not None

    def _reply_route(self, peer: bytes, msg: Message, frames: list) -> tuple[bytes, int]:
        """Where the replies to a request go, with which id: to its sender, except for a relayed
        step (one carrying `reply`) of a session we hold that comes from its owner or from the
        hop before that the owner admitted: to the owner, with the id the owner gave the chain
        (node/relay.py). Nobody else can be made to receive them, and a relayed step from anyone
        else is answered to its sender as a step of a session it does not own
        (StepChecks.validate: `unknown_session`)."""
        reply = msg.get("reply")
        # (not a head group's all-reduce step: one is never relayed, and its refusal went with the
        # `reply` id instead of its own: review168)
        if msg.type == "step" and type(reply) is int and 0 <= reply < 2**63 and msg.get("group") is None:
            session = self.sessions.sessions.get(msg.fields["session"])
            if session is not None and (peer == session.peer or self._admitted(session, msg, frames)):
                return session.peer, reply
        return peer, msg.id

    def _owns(self, peer: bytes, session_id: str) -> bool:
        """Whether `peer` opened the session: another peer's `close` of it is a no-op (it must not
        split the batch's forward pass either; closes are not counted toward --max-inflight)."""
        session = self.sessions.sessions.get(session_id)
        return session is not None and session.peer == peer

    def _admitted(self, session: Session, msg: Message, frames: list) -> bool:
        """Whether a relayed step comes from the hop before that the session's owner admitted:
        that peer's CURVE key, relaying that peer's session (`from`), so that a peer on another
        route, or one of its own sessions, cannot pass a step on here. A node without CURVE
        knows no sender's key: there every holder of the session id is admitted."""
        if not self.checks_senders:
            return True
        return (session.relay_from is not None and msg.get("from") == session.relay_from[1]
                and self.sender_key(frames) == session.relay_from[0])

    def _admit(self, peer: bytes, msg: Message, per_peer: dict, reply_to: bytes) -> None:
        self.seen.add(peer, msg.id)
        if msg.type == "partial":
            # Not a request of the peer's own: each other member of each group sends one a phase
            # (review128: a group of 9 tripped the limit), bounded by what a node keeps of them.
            return
        if msg.type == "close":
            # Cheap, and it frees what the limit protects: a client closing more sessions at once
            # than the limit (its closes go out together, their replies unread) had the rest
            # refused `busy`, and their slots and KV budget held until the idle timeout (a review).
            return
        # A relaying node carries the steps of many sessions (not its own; their replies go to
        # their owners: _reply_route): those count per session. A session's owner counts as one
        # peer however it marks its steps.
        key = msg.fields["session"] if reply_to != peer else peer
        per_peer[key] += 1
        if per_peer[key] > self.limits.max_inflight_per_peer:  # (its id is forgotten: _refusal)
            raise ProtocolError(ErrorCode.BUSY, f"more than {self.limits.max_inflight_per_peer} "
                                "requests in flight from this peer")

    def _error(self, req_id: int, code: ErrorCode, message: str) -> list:
        return self.steps.error(req_id, code, message)

    # ----- simple requests ----------------------------------------------------------------
    def _handle_simple(self, peer: bytes, msg: Message) -> list:
        if msg.type == "info":
            info = self.info()
            if msg.get("manifest") is True:  # asked for (its sha256 is the model id)
                info["manifest"] = self.manifest
            return encode("info_reply", msg.id, info)
        if msg.type == "open":
            return self._open(peer, msg)
        if msg.type == "close":
            # Only the client that opened a session closes it; to anyone else, an id that is not
            # theirs looks like one that does not exist (closing those is a no-op).
            self.sessions.close(msg.fields["session"], peer=peer)
            return encode("closed", msg.id, {"session": msg.fields["session"]})
        if msg.type == "admit":
            return self._admit_relays(peer, msg)
        if msg.type == "records":
            if self.on_records is None:
                raise ProtocolError(ErrorCode.NOT_SERVED, "this node keeps no swarm table")
            return encode("records_reply", msg.id, self.on_records(msg))
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unhandled type {msg.type!r}")

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id, "model_id": self.model_id, "protocol": PROTOCOL_VERSION,
            "layers": [self.blocks.start, self.blocks.stop],
            "heads": list(self.blocks.heads) if self.head_shard else None,
            "config": self.config.to_dict(),
            "throughput": self.stats.throughput,
            "load": self.stats.load(),  # busy fraction over about the last minute
            "sessions": len(self.sessions.sessions),
            "kv_bytes": self.sessions.kv_bytes,
            "kv_pool_bytes": self.sessions.pool.nbytes,  # closed sessions' cache memory kept for reuse
            "kv_budget": self.limits.kv_budget_bytes,
            "max_length": self.steps.checks.max_length(),
            "leaving": self.leaving,
            "stats": {"steps": self.stats.steps, "tokens": self.stats.tokens,
                      "busy_seconds": self.stats.busy_seconds, "batched_steps": self.stats.batched_steps,
                      "max_batch": self.stats.max_batch, "relayed": self.stats.relayed},
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "limits": dataclasses.asdict(self.limits), "errors": dict(self.stats.errors),
            **memory_usage(self.device),
            **self.extra_info,
        }

    def _check_model(self, msg: Message) -> None:
        model_id = msg.get("model_id")
        if model_id is not None and model_id != self.model_id:
            raise ProtocolError(ErrorCode.WRONG_MODEL, f"this node serves model {self.model_id[:16]}, "
                                f"not {model_id[:16]}")

    def _layers(self, msg: Message) -> tuple[int, int]:
        if msg.get("layers") is None:
            return self.blocks.start, self.blocks.stop
        a, b = parse_range(msg.fields["layers"], self.config.n_layer, "layers")
        if not (self.blocks.start <= a and b <= self.blocks.stop):
            raise ProtocolError(ErrorCode.NOT_SERVED, f"layers {a}:{b} are not within the served "
                                f"{self.blocks.start}:{self.blocks.stop}")
        return a, b

    def _check_heads(self, msg: Message) -> None:
        """A session is opened for the heads the client takes from this node (a head group's
        member's, all of them for a layer stage): a node that serves others (restarted at the same
        address and key with other `--heads`, or as whole blocks, or as a head shard) refuses.
        Review118: a member restarted with other heads was summed for its old ones, every output
        wrong until the client's table was read again (~55 s). An open without `heads` (a client
        of an earlier version) is not checked."""
        if msg.get("heads") is None:
            return
        h = parse_range(msg.fields["heads"], self.config.n_head, "heads")
        served = tuple(self.blocks.heads)  # all of them on a whole-block node
        if h != served:
            raise ProtocolError(ErrorCode.NOT_SERVED, f"heads {h[0]}:{h[1]} are not the served "
                                f"{served[0]}:{served[1]}")

    def _open(self, peer: bytes, msg: Message) -> list:
        if self.leaving:
            raise ProtocolError(ErrorCode.LEAVING, "node is leaving the swarm")
        self._check_model(msg)
        a, b = self._layers(msg)
        self._check_heads(msg)
        max_length = msg.fields["max_length"]
        if not 1 <= max_length <= self.steps.checks.max_length():
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"max_length {max_length} is not from 1 to {self.steps.checks.max_length()}")
        session = self.sessions.open(self.blocks, a, b, max_length, peer)
        return encode("opened", msg.id, {"session": session.id, "layers": [a, b],
                                         "heads": list(self.blocks.heads),  # as checked (_check_heads)
                                         "kv_bytes": session.cache.nbytes,
                                         "max_tokens_per_step": self.limits.max_tokens_per_step,
                                         "max_message_bytes": self.limits.max_message_bytes,
                                         # how long it keeps the session idle (client/failover.py)
                                         "idle_timeout": self.limits.idle_timeout,
                                         "trail_optional": True,  # relayed steps may keep no trail
                                         # a step's reply may carry only its last positions (a
                                         # head shard's all-reduce steps; not its phase steps)
                                         "last_positions": True,
                                         # a phase step rewinds at its session's first block's
                                         # attention; an all-reduce step anywhere (with an `epoch`)
                                         "head_rewind": True, "group_rewind": True,
                                         # relayed steps only as the client pins them (`admit`)
                                         "admits": self.checks_senders,
                                         # a head shard takes a group's all-reduce steps (node/all_reduce.py)
                                         "all_reduce": self.head_shard})

    def _admit_relays(self, peer: bytes, msg: Message) -> list:
        """The session's owner pins its relayed steps: they come from the stage before on its
        route (that peer's CURVE key and session) and go on only to the stage after (contact
        and session); null: from nobody but the owner, to nobody. Every earlier hop of a chain
        learns the later hops' session ids: with the pins it reaches those sessions only along
        the owner's route, every result going to the owner (docs/protocol.md)."""
        session = self.sessions.get(msg.fields["session"], peer)
        relay_from, relay_to = msg.fields["relay_from"], msg.fields["relay_to"]
        if relay_from is not None:
            [(key, _)] = parse_next([relay_from], "'relay_from' must be [CURVE key, session]")
            if not (key.isascii() and is_z85_key(key.encode("ascii"))):
                raise ProtocolError(ErrorCode.MALFORMED, "'relay_from' must begin with a CURVE public key: "
                                    "40 z85 characters")
        if relay_to is not None:
            [relay_to] = parse_next([relay_to], "'relay_to' must be [contact, session]")
            if self.on_relay_to is not None and self.can_relay is not None and self.can_relay(relay_to[0]):
                self.on_relay_to(relay_to[0])
        session.relay_from = None if relay_from is None else tuple(relay_from)
        session.relay_to = relay_to
        return encode("admitted", msg.id, {"session": session.id})

    def _check_forward(self, msg: Message) -> tuple[int, int, str]:
        """What a stateless forward asks for, checked: its blocks [a, b) and reply format, and its
        input's header (the tensor is made only for a forward that runs)."""
        if self.head_shard:
            raise ProtocolError(ErrorCode.NOT_SERVED, "stateless forward runs whole blocks; this node "
                                "serves a head shard")
        self._check_model(msg)
        a, b = self._layers(msg)
        return a, b, self.steps.checks.check_forward(msg)

    def peers_gone(self, peers: set[bytes]) -> list[str]:
        """Close the sessions of peers whose connections dropped (node/connections.py): no step
        can reach them again. Their request ids are forgotten too."""
        gone = [s.id for s in self.sessions.sessions.values() if s.peer in peers]
        for session_id in gone:
            self.sessions.close(session_id, DROPPED)
        for peer in peers:
            self.seen.forget_peer(peer)
        if gone:
            log.info("closed %s whose client's connection dropped" if len(gone) == 1 else
                     "closed %s whose clients' connections dropped",
                     "1 session" if len(gone) == 1 else f"{len(gone)} sessions")
        return gone

    def expire_idle(self) -> list[str]:
        for g in self.groups.steps.values():  # waiting for other members' partials is not idle (review130)
            g.session.last_used = max(g.session.last_used, self.sessions.clock())
        expired = self.sessions.expire_idle()
        if expired:
            log.info("reclaimed %d idle sessions", len(expired))
        if self.device.type == "cuda" and not self.sessions.sessions:
            reserved = torch.cuda.memory_reserved(self.device)
            if reserved > torch.cuda.memory_allocated(self.device) and reserved != self._emptied_at:
                # Closed sessions' caches stay in torch's caching allocator, held from every other
                # process on the GPU until this one exits; an idle node gives them back, as a CPU
                # node returns its unused cache maps to the OS (node/sessions.py). Once for what
                # is held: free space within segments the weights use cannot be given back.
                torch.cuda.empty_cache()
                self._emptied_at = torch.cuda.memory_reserved(self.device)
        return expired

    def measure_throughput(self, seconds: float = 0.3) -> float:
        """Tokens/s of one-token steps through all served blocks (advertised to clients)."""
        return self.steps.measure_throughput(seconds)
