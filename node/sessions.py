"""Inference sessions on a node: their KV caches, and the limits that keep memory bounded."""

from __future__ import annotations

import dataclasses
import mmap
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.shards.model import Blocks, KVCache


def _mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    # The tensor holds a reference to the map: unmapped when the last view of it is gone.
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=n).view(shape)


def mapped_cache(blocks: Blocks, max_length: int, n_blocks: int) -> KVCache:
    """A session's KV cache with k and v in anonymous memory maps of their own (CPU).

    From the heap (torch.zeros), session churn fragmented memory: with a full KV budget a node's
    RSS grew 250 MiB past its live caches (docs/reliability.md). A map of its own is returned to
    the OS whole when the session ends, and its pages, zero until written, cost memory only as
    positions are stored.
    """
    cache = blocks.new_cache(0, n_blocks)  # the right device, dtype and layout, no memory yet
    if cache.k.device.type != "cpu":
        return blocks.new_cache(max_length, n_blocks)
    shape = (*cache.k.shape[:3], max_length, cache.k.shape[4])
    cache.k, cache.v = _mapped_zeros(shape, cache.k.dtype), _mapped_zeros(shape, cache.v.dtype)
    cache.max_length = max_length
    return cache


@dataclass(frozen=True)
class NodeLimits:
    """Each limit is enforced before any work is done; exceeding one is an error reply."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_tokens_per_step: int = 1024
    max_sessions: int = 128
    kv_budget_bytes: int = 2 * 1024**3
    max_session_length: int = 4096   # further capped by the model's block_size
    max_inflight_per_peer: int = 16  # requests from one peer waiting in one batch
    idle_timeout: float = 300.0      # seconds without a step before a session is reclaimed
    max_batch_seconds: float = 5.0   # compute per batch before its remaining requests are refused busy

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"node limit {name} must be a positive number, got {value!r}")


@dataclass
class Session:
    id: str
    start: int             # first block (global index) this session runs
    stop: int
    cache: KVCache
    peer: bytes            # ROUTER identity of the client that opened it
    last_used: float = field(default_factory=time.monotonic)
    next_block: int = 0    # head shards: next block whose attention this position expects

    @property
    def length(self) -> int:
        return self.cache.length


class SessionStore:
    def __init__(self, limits: NodeLimits, clock=time.monotonic):
        self.limits = limits
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.kv_bytes = 0
        # Ids of sessions that ended recently, so a late step gets `session_closed`, not
        # `unknown_session`: the client then knows to replay rather than suspect a bad id.
        self._ended: OrderedDict[str, str] = OrderedDict()

    def reserve_check(self, nbytes: int) -> None:
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.BUSY, f"node holds its maximum of {self.limits.max_sessions} sessions")
        if self.kv_bytes + nbytes > self.limits.kv_budget_bytes:
            raise ProtocolError(ErrorCode.BUSY, f"KV cache budget exhausted ({self.kv_bytes} of "
                                f"{self.limits.kv_budget_bytes} bytes in use, session needs {nbytes})")

    def add(self, start: int, stop: int, cache: KVCache, peer: bytes) -> Session:
        session = Session(secrets.token_hex(12), start, stop, cache, peer, self.clock())
        self.sessions[session.id] = session
        self.kv_bytes += cache.nbytes
        return session

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            why = self._ended.get(session_id)
            if why is not None:
                raise ProtocolError(ErrorCode.SESSION_CLOSED, f"session {session_id[:32]} was {why}")
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id[:32]!r} on this node")
        session.last_used = self.clock()
        return session

    def close(self, session_id: str, why: str = "closed") -> Session | None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.kv_bytes -= session.cache.nbytes
            self._ended[session_id] = why
            while len(self._ended) > 4096:
                self._ended.popitem(last=False)
        return session

    def expire_idle(self) -> list[str]:
        cutoff = self.clock() - self.limits.idle_timeout
        stale = [s.id for s in self.sessions.values() if s.last_used < cutoff]
        for sid in stale:
            self.close(sid, "expired")
        return stale
