"""The request ids a node has seen, per peer, to refuse a duplicate: a replayed request must not
run a step twice and corrupt a KV cache. The last PER_PEER of each peer are kept, at most
MAX_SEEN_IDS in all; peers that reconnect get new ROUTER identities, so the least recently
active ones are forgotten first, and at most MAX_SEEN_PEERS are kept however many come."""

from __future__ import annotations

from collections import OrderedDict

from nanoswarm.protocol.errors import ErrorCode, ProtocolError

MAX_SEEN_IDS = 65536  # request ids remembered for duplicate detection, all peers together
MAX_SEEN_PEERS = 4096  # peers they are remembered for (each costs a map of its own): ~12 MiB in all
PER_PEER = 1024  # the last ids of one peer


class SeenIds:
    def __init__(self) -> None:
        self.by_peer: OrderedDict[bytes, OrderedDict[int, None]] = OrderedDict()
        self.total = 0

    def add(self, peer: bytes, req_id: int) -> None:
        """Remember `req_id` from `peer`; ProtocolError `duplicate_request` if it was seen."""
        seen = self.by_peer.get(peer)
        if seen is None:
            seen = self.by_peer[peer] = OrderedDict()
        self.by_peer.move_to_end(peer)
        if req_id in seen:
            raise ProtocolError(ErrorCode.DUPLICATE_REQUEST, f"request id {req_id} was already used")
        seen[req_id] = None
        self.total += 1
        if len(seen) > PER_PEER:
            seen.popitem(last=False)
            self.total -= 1
        while self.total > MAX_SEEN_IDS or len(self.by_peer) > MAX_SEEN_PEERS:  # however many peers come
            if not self.by_peer:  # a count that drifted (a bug) starts again rather than raise KeyError
                self.total = 0
                break
            _, oldest = self.by_peer.popitem(last=False)
            self.total -= len(oldest)

    def forget(self, peer: bytes, req_id: int) -> None:
        """Forget one id `add` kept (a request refused `busy` may be sent again)."""
        seen = self.by_peer.get(peer)
        if seen is not None and seen.pop(req_id, 0) is None:
            self.total -= 1

    def forget_peer(self, peer: bytes) -> None:
        """Forget every id of a peer whose connection dropped."""
        self.total -= len(self.by_peer.pop(peer, ()))
