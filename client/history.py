"""What a session sent one stage: the hidden states of every position so far, which failover
replays into the stage's replacement (client/failover.py).

An entry is a tensor; a function that makes one (a relayed decode step's outputs of its earlier
hops, made into tensors only if a failover needs them); or `Unkept`: positions that a relayed
prefill passed from node to node without bringing them back (client/relay.py), so that 384 KB
a hop cross one link instead of three. Unkept positions are recomputed only when a failover
needs them, by the stage before, which holds them (Failover._recover, client/failover.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Unkept:
    """Positions whose hidden states this stage was sent by the node before it, not by us."""

    positions: int


Entry = torch.Tensor | Callable[[], torch.Tensor] | Unkept


class History:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.sizes: list[int] = []  # positions of each entry

    def append(self, entry: Entry, positions: int) -> None:
        self.entries.append(entry)
        self.sizes.append(positions)

    @property
    def positions(self) -> int:
        return sum(self.sizes)

    def first_unkept(self) -> int | None:
        """The first position not kept here, or None when every one is."""
        for k, entry in enumerate(self.entries):
            if isinstance(entry, Unkept):
                return sum(self.sizes[:k])
        return None

    def tensor(self) -> torch.Tensor:
        """Every position's hidden states as one tensor [1, positions, C]; none may be unkept."""
        if self.first_unkept() is not None:
            raise ValueError("history has unkept positions: recover them first")
        return torch.cat([e() if callable(e) else e for e in self.entries], dim=1)

    def recovered(self, start: int, hidden: torch.Tensor) -> None:
        """Replace positions `start`.. (from the first unkept one on) with `hidden`, recomputed;
        `hidden` may run past the positions held here, the rest is dropped."""
        if not 0 <= start <= self.positions:
            raise ValueError(f"position {start} is outside the {self.positions} held")
        k, at = 0, 0
        while at < start:
            at += self.sizes[k]
            k += 1
        if at != start:
            raise ValueError(f"position {start} is inside an entry")
        n = sum(self.sizes[k:])
        if hidden.shape[1] < n:
            raise ValueError(f"{hidden.shape[1]} recomputed positions, {n} needed")
        del self.entries[k:], self.sizes[k:]
        self.append(hidden[:, :n], n)

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions only (the rest were sent in a step that did not complete)."""
        at = 0
        for k, size in enumerate(self.sizes):
            if at + size > n:
                entry, keep = self.entries[k], n - at
                del self.entries[k:], self.sizes[k:]
                if keep:
                    self.append(_first(entry, keep), keep)
                return
            at += size

    @classmethod
    def of(cls, hidden: torch.Tensor | None) -> History:
        """A history holding `hidden` (None: no positions)."""
        history = cls()
        if hidden is not None:
            history.append(hidden, hidden.shape[1])
        return history


def _first(entry: Entry, n: int) -> Entry:
    """The first `n` positions of `entry`."""
    if isinstance(entry, Unkept):
        return Unkept(n)
    if callable(entry):
        return lambda: entry()[:, :n]
    return entry[:, :n]
