"""A node's checks of a request before it computes: a step validated against its session (its
position, shape, reply format, relay chain and head-shard order) into a PendingStep, and a
stateless forward's input. Everything here is decided on the message's header and the session,
before a tensor is computed; a refusal is a ProtocolError and changes no session. The running of
what passes is node/steps.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import MAX_HOPS, Message, parse_next
from nanoswarm.protocol.tensors import WIRE_FORMATS, frame_dtype
from nanoswarm.shards.model import Blocks

from .sessions import NodeLimits, Session, SessionStore


@dataclass
class PendingStep:
    """A validated step waiting for its batch."""

    reply_to: tuple[bytes, int]  # who gets the replies, with which id (handler._reply_route)
    msg: Message
    session: Session
    x: torch.Tensor
    wire: str
    length: int = 0        # the session's state before the step, restored if the step fails
    next_block: int = 0
    hops: list[tuple[str, str]] | None = None  # a relayed step: the rest of the chain
    rewound: bool = False  # the step dropped positions from `length` on (rewind): not restored
    sender: bytes = b""    # the connection it came on (its request id is that peer's)


class StepChecks:
    """Validates a node's requests against its blocks, sessions and limits (`validate` for steps,
    `check_forward` for stateless forwards) and makes their hidden states into tensors (`hidden`)."""

    def __init__(self, blocks: Blocks, sessions: SessionStore, limits: NodeLimits):
        self.config = blocks.config
        self.sessions = sessions
        self.limits = limits
        self.head_shard = blocks.heads != (0, self.config.n_head)
        param = next(blocks.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._cpu = self.device.type == "cpu"
        # whether a relayed step may go on to a contact; set by the gossip layer (node/relay.py)
        self.can_relay: Callable[[str], bool] | None = None

    def max_length(self) -> int:
        """The most positions a session here may hold."""
        return min(self.limits.max_session_length, self.config.block_size)

    def hidden(self, msg: Message, max_batch: int, count: int = 1) -> torch.Tensor:
        """The hidden states of a request, shape-checked (finiteness: node/steps.py, _unsendable): its last
        tensor of `count`. The ones before it, the outputs of a relayed step's earlier hops, must
        have the same shape; they are passed on, never made into tensors here."""
        wire = self.check_hidden(msg, max_batch, count)
        x = msg.tensor(count - 1)
        if not (self._cpu and frame_dtype(wire) is self.dtype):
            x = x.to(self.device, self.dtype)
        return x

    def check_forward(self, msg: Message) -> str:
        """A stateless forward's input and reply format, checked on the header; the reply format."""
        self.check_hidden(msg, max_batch=64)
        positions = msg.specs[-1][1][1]
        if positions > self.max_length():
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{positions} positions exceed {self.max_length()}")
        return self.reply_wire(msg)

    def check_hidden(self, msg: Message, max_batch: int, count: int = 1) -> str:
        """`hidden`'s checks, on the header alone; the wire format of the tensor."""
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
        return wire

    @staticmethod
    def reply_wire(msg: Message) -> str:
        wire = msg.get("wire") or "float32"
        if not isinstance(wire, str) or wire not in WIRE_FORMATS:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"unknown reply format {str(wire)[:32]!r}")
        return wire

    def validate(self, reply_to: tuple[bytes, int], msg: Message, pinned: bool = False) -> PendingStep:
        # A plain step comes from the session's owner; a relayed one from the owner or the hop
        # before us that the owner admitted. handler._reply_route sends the replies of those to
        # the owner, and of anything else to its sender, so a step whose replies do not go to the
        # owner is not the owner's. Session ids travel in relayed steps' `next`, so on a node
        # without CURVE (where senders' keys are unknown) an earlier hop may step a later hop's
        # session: it may only append the next position (no rewind), which the owner's next step
        # would notice, never silently rewrite the cache.
        # With `pinned` (a step the hop before relayed, on a node that knows senders) it goes on
        # only to the hop the owner pinned, or ends here: a hop cannot send the session's output
        # anywhere else, not even through the honest hops after it.
        hops, hop = self._chain(msg)
        relayed = hops is not None
        session = self.sessions.get(msg.fields["session"], reply_to[0])
        if pinned and hops and hops[0] != session.relay_to:
            raise ProtocolError(ErrorCode.NOT_SERVED, "this session passes relayed steps on only to the hop "
                                "its client named")
        pos = msg.fields["pos"]
        if pos < 0:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"negative position {pos}")
        wire = self.reply_wire(msg)
        # A relayed step carries the outputs of the hops before this one, unless it keeps no trail
        # (a prefill: only the previous hop's output travels on, client/history.py).
        x = self.hidden(msg, max_batch=1, count=max(1, hop) if msg.get("trail") is not False else 1)
        T = x.shape[1]
        phase, block = msg.get("phase"), msg.get("block")
        # `rewind` lets a client redo positions the session already holds (after a relayed step
        # broke off midway, some stages may hold it and some not); without it a repeat is refused.
        # A head shard's position begins with its first block's attention: only that step rewinds
        # (after a step cut short, a member may hold some of its blocks' attention, or all).
        rewind = msg.get("rewind") is True
        if rewind and (self.head_shard or phase is not None) and (phase != "attn" or block != session.start):
            raise ProtocolError(ErrorCode.MALFORMED, "a head-shard step rewinds only at the attention of its "
                                "session's first block")
        if rewind and relayed:
            raise ProtocolError(ErrorCode.MALFORMED, "a relayed step cannot rewind")
        # An MLP partial is stateless; every other step extends the cache at `pos`.
        if phase != "mlp" and not (pos <= session.length if rewind else pos == session.length):
            raise ProtocolError(ErrorCode.BAD_POSITION, f"step at position {pos}, but the session "
                                f"holds {session.length} positions")
        if pos + T > session.cache.max_length:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"positions {pos}:{pos + T} exceed the "
                                f"session's max_length {session.cache.max_length}")
        last = msg.get("last")
        if last is not None and (phase is not None or self.head_shard or not 1 <= last <= T):
            raise ProtocolError(ErrorCode.MALFORMED, f"'last' must be from 1 to the step's {T} positions, "
                                "on a step of whole blocks")
        if self.head_shard or phase is not None:
            if not rewind:  # (a rewind starts the position anew)
                self._check_head_step(session, phase, block, T)
        elif session.next_block:
            # Blocks before next_block hold this position, the rest do not: a plain step now
            # would make the session's length count positions some blocks never stored.
            raise ProtocolError(ErrorCode.BAD_POSITION, f"position {session.length} is half stored "
                                f"(attention of block {session.start + session.next_block} comes next); "
                                "finish it with attn steps")
        return PendingStep(reply_to, msg, session, x, wire, length=pos if rewind else session.cache.length,
                           next_block=0 if rewind else session.next_block, hops=hops)

    def _chain(self, msg: Message) -> tuple[list[tuple[str, str]] | None, int]:
        """A relayed step's hops after this node and this node's place in the chain (node/relay.py);
        (None, 0) for a plain step."""
        reply, hop = msg.get("reply"), msg.get("hop") or 0
        if reply is None:
            if msg.get("next") is not None or hop or msg.get("trail") is not None or msg.get("from") is not None:
                raise ProtocolError(ErrorCode.MALFORMED, "'next', 'hop', 'trail' and 'from' belong to a relayed "
                                    "step, with 'reply'")
            return None, 0
        if not 0 <= reply < 2**63 or not 0 <= hop <= MAX_HOPS:
            raise ProtocolError(ErrorCode.MALFORMED, f"'reply' must be >= 0 and 'hop' from 0 to {MAX_HOPS}")
        busy = msg.get("busy") or []
        if len(busy) > MAX_HOPS or not all(type(b) is int and 0 <= b < 2**40 for b in busy):
            raise ProtocolError(ErrorCode.MALFORMED, "'busy' must be a short list of microseconds")
        if msg.get("phase") is not None or self.head_shard:
            raise ProtocolError(ErrorCode.MALFORMED, "head-shard steps are not relayed")
        hops = parse_next(msg.get("next") or [])
        if hop + len(hops) > MAX_HOPS:  # the step would go on with hop 65 (or end past 65 tensors), refused there
            raise ProtocolError(ErrorCode.MALFORMED, f"a chain of at most {MAX_HOPS + 1} hops: 'hop' plus the "
                                f"hops in 'next' must be at most {MAX_HOPS}")
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
