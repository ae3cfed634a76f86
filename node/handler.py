"""Request handling on a node: validate every message, then run the blocks. No sockets here, so
the fuzz tests can drive it directly; node/server.py feeds it from the ROUTER socket."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import sys
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import (
    MAX_HOPS,
    PROTOCOL_VERSION,
    Message,
    decode,
    encode,
    encode_frames,
    error_frames,
    parse_next,
    parse_range,
    peek_id,
)
from nanoswarm.protocol.tensors import WIRE_FORMATS, abs_max, all_finite, frame_dtype, frame_finite, to_frame
from nanoswarm.shards.model import Blocks

from .relay import Relay, next_hop_id
from .sessions import NodeLimits, Session, SessionStore

log = logging.getLogger(__name__)

Reply = tuple[bytes | Relay, list]  # (peer identity, or the next hop of a relayed step; frames)
# Largest magnitude a reply format can carry (q80: a float16 scale times 127).
_WIRE_MAX = {"float16": 65504.0, "q80": 65504.0 * 127}


def memory_usage() -> dict[str, int]:
    """This process's peak and current resident memory, in bytes (for `info` and load runs)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        pass
    return out


def _fits(y: torch.Tensor, wire: str) -> bool:
    """Whether `y` is finite and stays finite in the reply format."""
    limit = _WIRE_MAX.get(wire)
    if limit is None:
        return all_finite(y)
    m = abs_max(y)  # NaN or inf when y holds one
    return math.isfinite(m) and m <= limit


def _unsendable(x: torch.Tensor, y: torch.Tensor, wire: str, frame) -> str | None:
    """Why the result `y` of input `x`, encoded as `frame`, cannot be sent, or None when it can.

    Inputs are checked here, after the forward pass, not before it: a NaN or Inf in an input row
    makes that row of the output non-finite (LayerNorm spreads it over the row, and every later op
    is row-wise or attends from that row), and rows of different sessions never mix. So a finite
    output proves a finite input, and the checks that used to run first, the costliest calls of a
    step that wakes a node with cold caches (docs/performance.md), now run only on failure. The
    caller undoes the step's change to the session.
    """
    finite = frame_finite(frame, wire)  # numpy on the bytes that go out: no further torch call
    if finite or (finite is None and _fits(y, wire)):
        return None
    if not all_finite(x):
        return "tensor holds NaN or Inf"
    return f"the result does not fit {wire} (overflow to NaN or Inf)"


@dataclass
class _Pending:
    """A validated step waiting for its batch."""

    reply_to: tuple[bytes, int]  # who gets the replies, with which id (_reply_route)
    msg: Message
    session: Session
    x: torch.Tensor
    wire: str
    length: int = 0        # the session's state before the step, restored if the step fails
    next_block: int = 0
    hops: list[tuple[str, str]] | None = None  # a relayed step: the rest of the chain


@dataclass
class NodeStats:
    throughput: float = 0.0          # tokens/s through all served blocks, measured at start-up
    steps: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0
    batched_steps: int = 0           # forward passes that ran decode steps of several sessions
    max_batch: int = 0               # most sessions in one forward pass so far
    relayed: int = 0                 # steps passed on to a next hop (node/relay.py)
    started: float = field(default_factory=time.monotonic)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class RequestHandler:
    def __init__(self, blocks: Blocks, model_id: str, peer_id: str,
                 limits: NodeLimits | None = None):
        self.blocks = blocks
        self.config = blocks.config
        self.model_id = model_id
        self.peer_id = peer_id
        self.limits = limits or NodeLimits()
        self.sessions = SessionStore(self.limits)
        self.stats = NodeStats()
        self.head_shard = blocks.heads != (0, self.config.n_head)
        param = next(blocks.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._cpu = self.device.type == "cpu"
        self.leaving = False
        self._batch_started = time.perf_counter()  # when handle_batch began (see _overloaded)
        self._batch_computed = False                # whether this batch has run any blocks yet
        self._last_busy = 0.0                       # seconds of the last forward pass
        self.extra_info: dict[str, Any] = {}  # set by the server: address, keys, records
        self.on_records = None  # callable(list) -> list, set by the gossip layer
        self.can_relay = None   # callable(contact) -> bool, set by the gossip layer (node/relay.py)
        # Recently seen request ids per peer, to refuse duplicates (a replayed request must not
        # run a step twice and corrupt a KV cache).
        self._seen: dict[bytes, OrderedDict[int, None]] = defaultdict(OrderedDict)

    # ----- entry points -------------------------------------------------------------------
    def handle_batch(self, batch: list[tuple[bytes, list]]) -> list[Reply]:
        """Handle every message of `batch`; decode steps of different sessions run together."""
        replies: list[Reply] = []
        pending: list[_Pending] = []
        per_peer: dict[bytes, int] = defaultdict(int)
        self._batch_started, self._batch_computed = time.perf_counter(), False
        for peer, frames in batch:
            req_id, to = 0, peer
            try:
                msg = decode(frames, self.limits.max_message_bytes)
                to, req_id = self._reply_route(peer, msg)
                self._admit(peer, msg, per_peer)
                if msg.type in ("step", "close") and any(p.msg.fields["session"] == msg.fields["session"]
                                                         for p in pending):
                    # A pipelined step (or close) of a session already in this batch: its
                    # position is only valid once the earlier step has run.
                    replies.extend(self._run_steps(pending))
                    pending = []
                if msg.type == "step":
                    pending.append(self._validate_step((to, req_id), msg))
                else:
                    replies.append((peer, self._handle_simple(peer, msg)))
            except ProtocolError as e:
                req_id = req_id or (peek_id(frames[0]) if frames else 0)
                replies.append((to, self._error(req_id, e.code, e.message)))
            except Exception as e:  # a bug must not take the node down
                log.exception("internal error handling a request")
                replies.append((to, self._error(req_id, ErrorCode.INTERNAL, type(e).__name__)))
        if pending:
            replies.extend(self._run_steps(pending))
        return replies

    def handle(self, peer: bytes, frames: list) -> list:
        """One message, one reply (tests and the fuzzer)."""
        return self.handle_batch([(peer, frames)])[0][1]

    # ----- admission ----------------------------------------------------------------------
    def _reply_route(self, peer: bytes, msg: Message) -> tuple[bytes, int]:
        """Where the replies to a request go, with which id: to its sender, except for a relayed
        step (one carrying `reply`) of a session we hold: to the session's owner, with the id the
        owner gave the chain (node/relay.py). Nobody else can be made to receive them."""
        reply = msg.get("reply")
        if msg.type == "step" and type(reply) is int and 0 <= reply < 2**63:
            session = self.sessions.sessions.get(msg.fields["session"])
            if session is not None:
                return session.peer, reply
        return peer, msg.id

    def _admit(self, peer: bytes, msg: Message, per_peer: dict) -> None:
        if msg.type not in ("info", "forward", "open", "step", "close", "records"):
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.type!r} is a reply, not a request")
        seen = self._seen[peer]
        if msg.id in seen:
            raise ProtocolError(ErrorCode.DUPLICATE_REQUEST, f"request id {msg.id} was already used")
        seen[msg.id] = None
        if len(seen) > 1024:
            seen.popitem(last=False)
        if len(self._seen) > 4096:  # forget the oldest peers rather than grow without bound
            self._seen.pop(next(iter(self._seen)))
        # A relaying node carries the steps of many sessions: those count per session.
        key = msg.fields["session"] if msg.type == "step" and msg.get("reply") is not None else peer
        per_peer[key] += 1
        if per_peer[key] > self.limits.max_inflight_per_peer:
            raise ProtocolError(ErrorCode.BUSY, f"more than {self.limits.max_inflight_per_peer} "
                                "requests in flight from this peer")

    def _error(self, req_id: int, code: ErrorCode, message: str) -> list:
        self.stats.errors[code.value] += 1
        return error_frames(req_id, code, message)

    # ----- simple requests ----------------------------------------------------------------
    def _handle_simple(self, peer: bytes, msg: Message) -> list:
        if msg.type == "info":
            return encode("info_reply", msg.id, self.info())
        if msg.type == "open":
            return self._open(peer, msg)
        if msg.type == "close":
            self.sessions.close(msg.fields["session"])
            return encode("closed", msg.id, {"session": msg.fields["session"]})
        if msg.type == "forward":
            return self._forward(msg)
        if msg.type == "records":
            if self.on_records is None:
                raise ProtocolError(ErrorCode.NOT_SERVED, "this node keeps no swarm table")
            return encode("records_reply", msg.id, {"records": self.on_records(msg)})
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unhandled type {msg.type!r}")

    def info(self) -> dict[str, Any]:
        uptime = max(time.monotonic() - self.stats.started, 1e-9)
        return {
            "peer_id": self.peer_id, "model_id": self.model_id, "protocol": PROTOCOL_VERSION,
            "layers": [self.blocks.start, self.blocks.stop],
            "heads": list(self.blocks.heads) if self.head_shard else None,
            "config": self.config.to_dict(),
            "throughput": self.stats.throughput,
            "load": min(1.0, self.stats.busy_seconds / uptime),
            "sessions": len(self.sessions.sessions),
            "kv_bytes": self.sessions.kv_bytes,
            "kv_pool_bytes": self.sessions.pool.nbytes,  # closed sessions' cache memory kept for reuse
            "kv_budget": self.limits.kv_budget_bytes,
            "max_length": self._max_length(),
            "leaving": self.leaving,
            "stats": {"steps": self.stats.steps, "tokens": self.stats.tokens,
                      "busy_seconds": self.stats.busy_seconds, "batched_steps": self.stats.batched_steps,
                      "max_batch": self.stats.max_batch, "relayed": self.stats.relayed},
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "limits": dataclasses.asdict(self.limits), "errors": dict(self.stats.errors),
            **memory_usage(),
            **self.extra_info,
        }

    def _max_length(self) -> int:
        return min(self.limits.max_session_length, self.config.block_size)

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

    def _open(self, peer: bytes, msg: Message) -> list:
        if self.leaving:
            raise ProtocolError(ErrorCode.LEAVING, "node is leaving the swarm")
        self._check_model(msg)
        a, b = self._layers(msg)
        max_length = msg.fields["max_length"]
        if not 1 <= max_length <= self._max_length():
            raise ProtocolError(ErrorCode.TOO_LARGE, f"max_length {max_length} is outside 1..{self._max_length()}")
        session = self.sessions.open(self.blocks, a, b, max_length, peer)
        return encode("opened", msg.id, {"session": session.id, "layers": [a, b],
                                         "kv_bytes": session.cache.nbytes})

    def _hidden(self, msg: Message, max_batch: int, count: int = 1) -> torch.Tensor:
        """The hidden states of a request, shape-checked (finiteness: see _unsendable): its last
        tensor of `count`. The ones before it, the outputs of a relayed step's earlier hops, must
        have the same shape; they are passed on, never made into tensors here."""
        if len(msg.frames) != count:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"expected {count} tensors, got {len(msg.frames)}")
        wire, shape = msg.specs[-1]
        if any(s != shape for _, s in msg.specs):
            raise ProtocolError(ErrorCode.BAD_SHAPE, "a relayed step's tensors must all have one shape")
        # Checked on the header's shape, before a tensor exists: every torch call costs tens of us
        # in a process that wakes with cold caches (docs/performance.md).
        if len(shape) != 3 or shape[2] != self.config.n_embd or not 1 <= shape[0] <= max_batch:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"hidden states must be [batch<={max_batch}, "
                                f"tokens, {self.config.n_embd}], got {list(shape)}")
        if shape[1] < 1:
            raise ProtocolError(ErrorCode.BAD_SHAPE, "hidden states hold no positions")
        if shape[0] * shape[1] > self.limits.max_tokens_per_step:  # bounds the work of one request
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{shape[0] * shape[1]} tokens in one request; "
                                f"the limit is {self.limits.max_tokens_per_step}")
        x = msg.tensor(count - 1)
        if not (self._cpu and frame_dtype(wire) is self.dtype):
            x = x.to(self.device, self.dtype)
        return x

    @staticmethod
    def _reply_wire(msg: Message) -> str:
        wire = msg.get("wire") or "float32"
        if not isinstance(wire, str) or wire not in WIRE_FORMATS:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"unknown reply format {str(wire)[:32]!r}")
        return wire

    def _forward(self, msg: Message) -> list:
        if self.head_shard:
            raise ProtocolError(ErrorCode.NOT_SERVED, "stateless forward runs whole blocks; this node "
                                "serves a head shard")
        self._check_model(msg)
        a, b = self._layers(msg)
        wire = self._reply_wire(msg)
        x = self._hidden(msg, max_batch=64)
        if self._overloaded():
            raise ProtocolError(ErrorCode.BUSY, self._overload_message())
        if x.shape[1] > self._max_length():
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{x.shape[1]} positions exceed {self._max_length()}")
        with torch.inference_mode():
            y = self._timed(lambda: self.blocks(x, None, a, b), x.shape[0] * x.shape[1])
        frame = to_frame(y, wire)
        problem = _unsendable(x, y, wire, frame)
        if problem:
            raise ProtocolError(ErrorCode.BAD_VALUE, problem)
        return encode_frames("result", msg.id, {}, [(wire, tuple(y.shape))], [frame])

    # ----- steps --------------------------------------------------------------------------
    def _validate_step(self, reply_to: tuple[bytes, int], msg: Message) -> _Pending:
        session = self.sessions.get(msg.fields["session"])
        pos = msg.fields["pos"]
        if pos < 0:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"negative position {pos}")
        wire = self._reply_wire(msg)
        hops, hop = self._chain(msg)
        x = self._hidden(msg, max_batch=1, count=max(1, hop))
        T = x.shape[1]
        phase, block = msg.get("phase"), msg.get("block")
        # `rewind` lets a client redo positions the session already holds (after a relayed step
        # broke off midway, some stages may hold it and some not); without it a repeat is refused.
        rewind = msg.get("rewind") is True
        if rewind and (phase is not None or self.head_shard):
            raise ProtocolError(ErrorCode.MALFORMED, "head-shard steps cannot rewind")
        # An MLP partial is stateless; every other step extends the cache at `pos`.
        if phase != "mlp" and not (pos <= session.length if rewind else pos == session.length):
            raise ProtocolError(ErrorCode.BAD_POSITION, f"step at position {pos}, but the session "
                                f"holds {session.length} positions")
        if pos + T > session.cache.max_length:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"positions {pos}..{pos + T - 1} exceed the "
                                f"session's max_length {session.cache.max_length}")
        if self.head_shard or phase is not None:
            self._check_head_step(session, phase, block, T)
        elif session.next_block:
            # Blocks before next_block hold this position, the rest do not: a plain step now
            # would make the session's length count positions some blocks never stored.
            raise ProtocolError(ErrorCode.BAD_POSITION, f"position {session.length} is half stored "
                                f"(attention of block {session.start + session.next_block} comes next); "
                                "finish it with attn steps")
        return _Pending(reply_to, msg, session, x, wire, pos if rewind else session.cache.length,
                        session.next_block, hops)

    def _chain(self, msg: Message) -> tuple[list[tuple[str, str]] | None, int]:
        """A relayed step's hops after this node and this node's place in the chain (node/relay.py);
        (None, 0) for a plain step."""
        reply, hop = msg.get("reply"), msg.get("hop") or 0
        if reply is None:
            if msg.get("next") is not None or hop:
                raise ProtocolError(ErrorCode.MALFORMED, "'next' and 'hop' belong to a relayed step, with 'reply'")
            return None, 0
        if not 0 <= reply < 2**63 or not 0 <= hop <= MAX_HOPS:
            raise ProtocolError(ErrorCode.MALFORMED, f"'reply' must be >= 0 and 'hop' in 0..{MAX_HOPS}")
        busy = msg.get("busy", [])
        if len(busy) > MAX_HOPS or not all(type(b) is int and 0 <= b < 2**40 for b in busy):
            raise ProtocolError(ErrorCode.MALFORMED, "'busy' must be a short list of microseconds")
        if msg.get("phase") is not None or self.head_shard:
            raise ProtocolError(ErrorCode.MALFORMED, "head-shard steps are not relayed")
        hops = parse_next(msg.get("next") or [])
        if hops and not (self.can_relay and self.can_relay(hops[0][0])):
            raise ProtocolError(ErrorCode.NOT_SERVED, f"this node does not relay to {hops[0][0][:80]!r}: "
                                "it relays only to peers in its table of signed records")
        return hops, hop

    def _check_head_step(self, session: Session, phase: Any, block: Any, tokens: int) -> None:
        if phase not in ("attn", "mlp") or not isinstance(block, int):
            raise ProtocolError(ErrorCode.MALFORMED, "head-shard steps need phase 'attn' or 'mlp' and a block")
        if not session.start <= block < session.stop:
            raise ProtocolError(ErrorCode.NOT_SERVED, f"block {block} is not in this session's "
                                f"{session.start}:{session.stop}")
        if phase == "attn" and block != session.start + session.next_block:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"attention of block {block} out of order; "
                                f"expected block {session.start + session.next_block}")
        # Every block must store the same positions; otherwise the length counted when the last
        # block is done would cover cache rows that some block never wrote.
        if phase == "attn" and session.next_block and tokens != session.pending_tokens:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"attention of block {block} over {tokens} tokens, but "
                                f"this position's earlier blocks stored {session.pending_tokens}")

    def _run_steps(self, pending: list[_Pending]) -> list[Reply]:
        replies: list[Reply] = []
        # Decode steps of different sessions over the same blocks share one forward pass:
        # decode is bound by reading the weights, so a batch of N costs little more than one.
        groups: dict[tuple, list[_Pending]] = defaultdict(list)
        for p in pending:
            batchable = p.x.shape[1] == 1 and p.msg.get("phase") is None
            key = (p.session.start, p.session.stop) if batchable else (id(p),)
            groups[key].append(p)
        for group in groups.values():
            if self._overloaded():  # refuse what cannot start in time; the sessions are untouched
                replies.extend((p.reply_to[0], self._error(p.reply_to[1], ErrorCode.BUSY, self._overload_message()))
                               for p in group)
                continue
            try:
                outputs = self._compute(group)
                for p, y in zip(group, outputs):
                    replies.extend(self._result(p, y))
            except Exception as e:
                log.exception("internal error in a step")
                replies.extend((p.reply_to[0], self._error(p.reply_to[1], ErrorCode.INTERNAL, type(e).__name__))
                               for p in group)
        return replies

    def _overloaded(self) -> bool:
        """This batch has computed for max_batch_seconds: its other requests, and those queued behind
        it, would wait past what clients wait for. Refusing them (`busy`) answers them now. The
        first computation of a batch always runs, so the node makes progress."""
        return self._batch_computed and time.perf_counter() - self._batch_started > self.limits.max_batch_seconds

    def _overload_message(self) -> str:
        return (f"node overloaded: this batch has computed for {self.limits.max_batch_seconds:g} s; "
                "retry the same request later")

    def _result(self, p: _Pending, y: torch.Tensor) -> list[Reply]:
        """The reply to a step: its result; for a relayed step, the step sent on to the next hop
        or, from the last hop, the result to the client, either carrying the outputs of every
        hop so far. NaN/Inf must not be sent (from a bad input, or an overflow)."""
        to, reply_id = p.reply_to
        frame = to_frame(y, p.wire)
        problem = _unsendable(p.x, y, p.wire, frame)
        if problem:  # undo the step, so the session can carry on
            p.session.cache.length, p.session.next_block = p.length, p.next_block
            return [(to, self._error(reply_id, ErrorCode.BAD_VALUE, problem))]
        # busy_us: the compute of the forward pass this step ran in, so a client can tell the
        # node's compute from the time on the wire (nanoswarm bench's per-stage overhead).
        busy_us = int(self._last_busy * 1e6)
        if p.hops is None:
            return [(to, encode_frames("result", reply_id, {"busy_us": busy_us}, [(p.wire, tuple(y.shape))], [frame]))]
        hop = p.msg.get("hop") or 0
        specs = [*(p.msg.specs if hop else []), (p.wire, tuple(y.shape))]
        tensors = [*(p.msg.frames if hop else []), frame]
        busy = [*p.msg.get("busy", [])[:hop], busy_us]  # every hop's busy_us
        if not p.hops:  # the last hop
            return [(to, encode_frames("result", reply_id, {"busy_us": busy_us, "busy": busy}, specs, tensors))]
        (contact, session), rest = p.hops[0], p.hops[1:]
        relay = Relay(contact, to, reply_id, next_hop_id())
        self.stats.relayed += 1
        fields = {"session": session, "pos": p.msg.fields["pos"], "wire": p.wire, "reply": reply_id,
                  "next": [list(h) for h in rest], "hop": hop + 1, "busy": busy}
        return [(relay, encode_frames("step", relay.hop_id, fields, specs, tensors))]

    def _compute(self, group: list[_Pending]) -> list[torch.Tensor]:
        first = group[0]
        phase = first.msg.get("phase")
        with torch.inference_mode():
            if phase is None:
                for p in group:  # a rewinding step drops what the session held from its position on
                    p.session.cache.length = p.length
                x = torch.cat([p.x for p in group]) if len(group) > 1 else first.x
                caches = [p.session.cache for p in group]
                self.stats.max_batch = max(self.stats.max_batch, len(group))
                self.stats.batched_steps += len(group) > 1
                y = self._timed(lambda: self.blocks(x, caches, first.session.start,
                                                    first.session.stop), len(group) * x.shape[1])
                return list(y.split(1)) if len(group) > 1 else [y]
            s, block = first.session, first.msg.fields["block"]
            layer = self.blocks.h[str(block)]
            if phase == "mlp":
                return [self._timed(lambda: layer.mlp_partial(first.x), first.x.shape[1])]
            y = self._timed(lambda: layer.attn_partial(first.x, [s.cache], block - s.start),
                            first.x.shape[1])
            if s.next_block == 0:
                s.pending_tokens = first.x.shape[1]
            s.next_block += 1
            if s.start + s.next_block == s.stop:  # every block has stored this position
                s.cache.length += first.x.shape[1]
                s.next_block = 0
            return [y]

    def _timed(self, fn, tokens: int) -> torch.Tensor:
        t0 = time.perf_counter()
        y = fn()
        self._batch_computed = True
        self._last_busy = time.perf_counter() - t0
        self.stats.busy_seconds += self._last_busy
        self.stats.steps += 1
        self.stats.tokens += tokens
        return y

    def expire_idle(self) -> list[str]:
        expired = self.sessions.expire_idle()
        if expired:
            log.info("reclaimed %d idle sessions", len(expired))
        return expired

    def measure_throughput(self, seconds: float = 0.3) -> float:
        """Tokens/s of one-token steps through all served blocks (advertised to clients)."""
        cache = self.blocks.new_cache(64)
        x = torch.zeros(1, 1, self.config.n_embd, device=self.device, dtype=self.dtype)
        n, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            while n < 64 and (n < 3 or time.perf_counter() - t0 < seconds):
                if self.head_shard:
                    for i in range(self.blocks.start, self.blocks.stop):
                        layer = self.blocks.h[str(i)]
                        layer.attn_partial(x, [cache], i - self.blocks.start)
                        layer.mlp_partial(x)
                    cache.length += 1
                else:
                    self.blocks(x, [cache])
                n += 1
                if self.device.type == "cuda":  # kernels run asynchronously: time them finished
                    torch.cuda.synchronize(self.device)
        self.stats.throughput = n / (time.perf_counter() - t0)
        return self.stats.throughput
