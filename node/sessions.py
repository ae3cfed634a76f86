"""Inference sessions on a node: their KV caches, and the limits that keep memory bounded."""

from __future__ import annotations

import dataclasses
import hmac
import mmap
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.shards.model import Blocks, KVCache

POOL_KEEP_SECONDS = 30.0  # how long a closed session's cache memory waits for the next session


def _map_size(nbytes: int) -> int:
    """`nbytes` rounded up to a size class, four per doubling (at least 64 KiB), so that sessions
    of about the same length share maps; a whole number of pages."""
    size = max(nbytes, 1 << 16)
    step = 1 << (size.bit_length() - 3)
    return -(-size // step) * step


class MapPool:
    """The KV-cache memory maps of closed sessions, kept for the sessions that follow.

    A fresh map costs a page fault for every page a session first writes, and on a VM whose
    freed pages go back to the host far more than that: a 128-token prefill of 3 GPT-2-small
    blocks took 3-5 ms longer per node in fresh maps than in reused memory (docs/performance.md).
    A closed session's map, its pages still resident, serves the next session of its size class
    instead. Its old contents are never read: attention reads positions below the session's
    length only, and a position counts in the length only once every block of the session has
    stored it (the handler refuses steps that would skip a block's rows). The session store
    keeps the pool within what the KV budget leaves free and within its own bound, and the pool
    gives back maps unused for POOL_KEEP_SECONDS, so an idle node returns to its baseline memory.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._maps: list[tuple[float, mmap.mmap]] = []  # (when it was given back, map), oldest first
        self.nbytes = 0

    def take(self, nbytes: int) -> mmap.mmap:
        """A map of at least `nbytes`: the most recently given back of its size class, or a new one."""
        size = _map_size(nbytes)
        for i in range(len(self._maps) - 1, -1, -1):
            if len(self._maps[i][1]) == size:
                self.nbytes -= size
                m = self._maps.pop(i)[1]
                # Pages past the new tensor's end may hold a longer session's positions: freed, so
                # that a session holds no more memory than the KV budget counts for it.
                used = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
                if used < size and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
                    m.madvise(mmap.MADV_DONTNEED, used, size - used)
                return m
        return _anonymous_map(size)

    def give(self, m: mmap.mmap, room: int, now: float) -> None:
        """Keep `m` for a later session, within `room` bytes and the pool's bound."""
        self._maps.append((now, m))
        self.nbytes += len(m)
        self.trim(room)

    def trim(self, room: int, older_than: float | None = None) -> None:
        """Give back the oldest maps until the pool fits in `room` bytes and its bound, and every
        map given to the pool before `older_than`."""
        limit = min(room, self.max_bytes)
        while self._maps and (self.nbytes > limit or (older_than is not None and self._maps[0][0] < older_than)):
            self.nbytes -= len(self._maps.pop(0)[1])  # unmapped once the last tensor over it is gone


def _anonymous_map(size: int) -> mmap.mmap:
    """A private anonymous map: Python's default for fileno -1 is MAP_SHARED, whose pages
    MADV_DONTNEED only unmaps (they stay in shared memory, contents and all), where a private
    map's pages are freed and read back as zeros."""
    if hasattr(mmap, "MAP_PRIVATE"):  # not on Windows, whose maps have no such flags
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, size)


def _map_tensor(m: mmap.mmap, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    # The tensor holds a reference to the map, which outlives it in the pool or goes with it.
    return torch.frombuffer(m, dtype=dtype, count=n).view(shape)


def mapped_cache(blocks: Blocks, max_length: int, n_blocks: int, pool: MapPool) -> tuple[KVCache, tuple]:
    """A session's KV cache with k and v in anonymous memory maps of their own (CPU), and the
    maps (to give back to `pool` when the session closes; none on a GPU).

    From the heap (torch.zeros), session churn fragmented memory: with a full KV budget a node's
    RSS grew 250 MiB past its live caches (docs/reliability.md). A map of its own goes back whole,
    to the pool or the OS, when the session ends, and its pages cost memory only as positions are
    stored. A map's contents are not zeroed: positions are read only after they were written.
    """
    cache = blocks.new_cache(0, n_blocks)  # the right device, dtype and layout, no memory yet
    if cache.k.device.type != "cpu":
        return blocks.new_cache(max_length, n_blocks), ()
    shape = (*cache.k.shape[:3], max_length, cache.k.shape[4])
    nbytes = cache.k.element_size() * shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
    maps = (pool.take(nbytes), pool.take(nbytes))
    cache.k, cache.v = (_map_tensor(m, shape, cache.k.dtype) for m in maps)
    cache.max_length = max_length
    return cache, maps


# Why a session ended, as a late step is told (`session_closed`: "session ... was <why>").
DROPPED = "closed: its client's connection dropped"


@dataclass(frozen=True)
class NodeLimits:
    """Exceeding a limit is an error reply. Each is checked before any work is done, except
    max_batch_seconds (checked as a batch computes) and idle_timeout (a session reclaimed)."""

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
    next_block: int = 0    # phase steps: next block whose attention this position expects
    pending_tokens: int = 0  # phase steps: tokens of that position (every block must store as many)
    # all-reduce steps (node/all_reduce.py): its latest rewind's number, which its steps and the
    # partials for them carry; a partial of an earlier one is a rewound step's, come late
    epoch: int = 0
    maps: tuple = ()       # the memory maps under the cache (mapped_cache), for the pool
    # Relayed steps (node/relay.py) as its owner pinned them (`admit`): from the hop before (its
    # CURVE key, z85, and its session) and on to the hop after (contact, session).
    relay_from: tuple[str, str] | None = None
    relay_to: tuple[str, str] | None = None

    @property
    def length(self) -> int:
        return self.cache.length


class SessionStore:
    def __init__(self, limits: NodeLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.kv_bytes = 0
        # Why sessions that ended recently did, for the `session_closed` a late step gets. Ids
        # are signed with a secret of this process (new_session_id), so an id of ours that ended
        # longer ago than this remembers still gets `session_closed`, not `unknown_session`: the
        # client then replays, where `unknown_session` is a fault it bans the node for (a review:
        # a client that paused past the idle timeout on a busy node, 4,096 closes later).
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._id_key = secrets.token_bytes(32)
        self.pool = MapPool(limits.kv_budget_bytes // 4)

    def reserve_check(self, nbytes: int) -> None:
        if nbytes > self.limits.kv_budget_bytes:  # never, however many sessions close: not `busy`
            raise ProtocolError(ErrorCode.TOO_LARGE, f"a session of this length needs {nbytes} bytes of KV cache, "
                                f"more than this node's whole budget ({self.limits.kv_budget_bytes} bytes)")
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.BUSY, f"node holds its maximum of {self.limits.max_sessions} sessions")
        if self.kv_bytes + nbytes > self.limits.kv_budget_bytes:
            raise ProtocolError(ErrorCode.BUSY, f"KV cache budget exhausted ({self.kv_bytes} of "
                                f"{self.limits.kv_budget_bytes} bytes in use, session needs {nbytes})")

    def open(self, blocks: Blocks, start: int, stop: int, max_length: int, peer: bytes) -> Session:
        """A new session over blocks [start, stop) of `blocks`, if the limits allow it."""
        n_heads = blocks.heads[1] - blocks.heads[0]
        p = next(blocks.parameters())
        self.reserve_check(KVCache.bytes_for(stop - start, n_heads, blocks.config.head_dim, max_length, p.dtype))
        try:
            cache, maps = mapped_cache(blocks, max_length, stop - start, self.pool)
        except torch.cuda.OutOfMemoryError:  # a GPU whose memory other work took: a refusal, not a fault
            raise ProtocolError(ErrorCode.BUSY, f"no {p.device} memory for a KV cache of {max_length} "
                                "positions now; retry later or elsewhere") from None
        session = Session(self.new_session_id(), start, stop, cache, peer, self.clock(), maps=maps)
        self.sessions[session.id] = session
        self.kv_bytes += cache.nbytes
        self.pool.trim(self.limits.kv_budget_bytes - self.kv_bytes)  # live caches come first
        return session

    def new_session_id(self) -> str:
        """96 random bits and 64 bits of their HMAC under this process's key: unguessable, and
        recognisable as this process's own once the session is gone (issued_here)."""
        nonce = secrets.token_bytes(12)
        return (nonce + hmac.digest(self._id_key, nonce, "sha256")[:8]).hex()

    def issued_here(self, session_id: str) -> bool:
        try:
            raw = bytes.fromhex(session_id)
        except ValueError:
            return False
        # Only as new_session_id spells it: fromhex also takes spaces and upper case.
        return (len(raw) == 20 and raw.hex() == session_id
                and hmac.compare_digest(raw[12:], hmac.digest(self._id_key, raw[:12], "sha256")[:8]))

    def get(self, session_id: str, peer: bytes | None = None) -> Session:
        """The open session `session_id`; with `peer`, only if that peer opened it (others get
        `unknown_session`, as for an id that does not exist)."""
        session = self.sessions.get(session_id)
        if session is not None and peer is not None and session.peer != peer:
            session = None
        if session is None:
            why = self._ended.get(session_id)
            if why is None and session_id not in self.sessions and self.issued_here(session_id):
                why = "closed (long enough ago that this node no longer keeps why)"
            if why is not None:
                raise ProtocolError(ErrorCode.SESSION_CLOSED, f"session {session_id[:40]} was {why}")
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id[:40]!r} on this node")
        session.last_used = self.clock()
        return session

    def close(self, session_id: str, why: str = "closed", peer: bytes | None = None) -> Session | None:
        """Close `session_id` (with `peer`: only if that peer opened it); None if nothing closed."""
        if peer is not None and getattr(self.sessions.get(session_id), "peer", peer) != peer:
            return None
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.kv_bytes -= session.cache.nbytes
            # The tensors go (a stale reference fails loudly instead of writing into a map that
            # another session uses); a closed session's maps wait in the pool for the next one
            # (one whose client's connection dropped too: the client may come again), an expired
            # session's go back to the OS: its client vanished, and the node is idle.
            session.cache.k = session.cache.v = None
            for m in session.maps if why != "expired" else ():
                self.pool.give(m, self.limits.kv_budget_bytes - self.kv_bytes, self.clock())
            self._ended[session_id] = why
            while len(self._ended) > 4096:
                self._ended.popitem(last=False)
        return session

    def expire_idle(self) -> list[str]:
        cutoff = self.clock() - self.limits.idle_timeout
        stale = [s.id for s in self.sessions.values() if s.last_used < cutoff]
        for sid in stale:
            self.close(sid, "expired")
        self.pool.trim(self.limits.kv_budget_bytes - self.kv_bytes, older_than=self.clock() - POOL_KEEP_SECONDS)
        return stale
