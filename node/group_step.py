"""An all-reduce step on a head group's member: what it holds while it runs, and how a step the
client sends is checked before it starts (node/all_reduce.py runs it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoswarm.keys.contact import split_contact
from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import Message, parse_next
from nanoswarm.protocol.tensors import all_finite

from .sessions import Session, SessionStore
from .steps import StepRunner

DEFAULT_WAIT = 5.0   # seconds a member waits for another's partial, when the step names none
MAX_WAIT = 60.0
MIN_WAIT = 0.05


@dataclass(eq=False)
class GroupStep:
    """An all-reduce step in progress on this member."""

    reply_to: tuple[bytes, int]  # the session's owner, and its request's id
    session: Session
    members: list[tuple[str, str]]  # each member's [contact, session], in member order
    keys: list[str | None]  # the CURVE key (z85) each member's partials must come with (None: unchecked)
    me: int
    pos: int  # the session's length before the step (checked), restored if it fails
    wire: str
    wait: float
    x: torch.Tensor  # the residual so far: float32, on the CPU
    # x's shape, [1, positions, n_embd], as ints: a tensor's `shape` is a call, tens of us in a
    # member woken with cold caches (docs/performance.md, fifty-sixth session)
    shape: tuple[int, int, int]
    block: int = 0
    phase: str = "attn"
    own: torch.Tensor | None = None  # this member's partial of the phase waited on, as the wire carries it
    contacts: tuple[str, ...] = ()  # the members' contacts: steps of one group (whatever their sessions)
    deadline: float = 0.0
    busy_us: int = 0  # compute of the step so far
    last: int | None = None  # the client takes the output's last rows only (a step's `last`)
    epoch: int = 0  # the session's rewind number the step carries, as do its partials
    rewind: bool = False  # the session drops what it holds from `pos` on when the step starts


def check_step(runner: StepRunner, sessions: SessionStore, peer: bytes, msg: Message,
                can_relay: Callable[[str], bool] | None, checks_keys: bool) -> GroupStep:
    """The all-reduce step `msg` from `peer`, checked (ProtocolError for what is refused, the
    session unchanged). `checks_keys`: the node knows senders' CURVE keys, and takes a member's
    partials only with its key."""
    f = msg.fields
    if any(f.get(k) is not None for k in ("reply", "next", "hop", "phase", "block", "trail", "from")):
        raise ProtocolError(ErrorCode.MALFORMED, "an all-reduce step ('group') is not relayed or phased")
    if not runner.head_shard:
        raise ProtocolError(ErrorCode.NOT_SERVED, "all-reduce steps are for head shards; this node serves "
                            "whole blocks")
    session = sessions.get(f["session"], peer)
    members = parse_next(f["group"], "a group's member must be [contact, session]")
    me = f.get("member")
    n_head = runner.config.n_head
    if not 2 <= len(members) <= n_head or not isinstance(me, int) or not 0 <= me < len(members) \
            or members[me][1] != session.id or len({c for c, _ in members}) != len(members):
        raise ProtocolError(ErrorCode.MALFORMED, f"'group' must name 2 to {n_head} members (the model's "
                            "heads), each once, and 'member' this session's place among them")
    keys: list[str | None] = []
    for j, (contact, _) in enumerate(members):
        try:
            key = split_contact(contact)[1]
        except ValueError:
            raise ProtocolError(ErrorCode.MALFORMED, f"member {j}'s contact is not tcp://HOST:PORT#KEY") from None
        if j != me and not (can_relay and can_relay(contact)):
            raise ProtocolError(ErrorCode.NOT_SERVED, f"this node does not send to member {j} "
                                f"({contact[:80]!r}): it sends only to peers in its table of signed records")
        if checks_keys and key is None:  # (an --insecure node: no exchange with it; no one's fault)
            raise ProtocolError(ErrorCode.NOT_SERVED, f"member {j}'s contact names no CURVE key: this node "
                                "exchanges partials only over CURVE")
        keys.append(key.decode("ascii") if checks_keys else None)
    pos, rewind, epoch = f["pos"], f.get("rewind") is True, f.get("epoch") or 0
    if rewind:  # (a step of the session still running ends: AllReduces.start)
        if epoch <= session.epoch:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"a rewound all-reduce step names 'epoch' {epoch}, but "
                                f"the session's steps are at {session.epoch} already: it must be greater")
        if not 0 <= pos <= session.length:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"rewind to position {pos}, but the session holds "
                                f"{session.length} positions: a rewind goes back, never forward")
    elif epoch != session.epoch:
        raise ProtocolError(ErrorCode.BAD_POSITION, f"an all-reduce step of 'epoch' {epoch}, but the session's "
                            f"steps are at {session.epoch} (since its latest rewind)")
    elif pos != session.length or session.next_block:
        raise ProtocolError(ErrorCode.BAD_POSITION, f"step at position {pos}, but the session holds "
                            f"{session.length} positions" + (" (one half stored)" if session.next_block else ""))
    runner.checks.check_hidden(msg, max_batch=1)
    x = msg.tensor(0).to(torch.float32)  # the residual as the client holds it (not in this node's dtype)
    if not all_finite(x):  # refused by every member at once, whatever each computes in (review147)
        raise ProtocolError(ErrorCode.BAD_VALUE, "tensor holds NaN or Inf")
    T = x.shape[1]
    last = f.get("last")
    if last is not None and not 1 <= last <= T:
        raise ProtocolError(ErrorCode.MALFORMED, f"'last' must be from 1 to the step's {T} positions")
    if pos + T > session.cache.max_length:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"positions {pos}:{pos + T} exceed the session's "
                            f"max_length {session.cache.max_length}")
    wait = f.get("wait")
    wait = DEFAULT_WAIT if wait is None else min(MAX_WAIT, max(MIN_WAIT, float(wait)))
    wire = runner.checks.reply_wire(msg)
    return GroupStep((peer, msg.id), session, members, keys, me, pos, wire, wait, x, tuple(x.shape),
                     block=session.start, contacts=tuple(c for c, _ in members), last=last, epoch=epoch,
                     rewind=rewind)
