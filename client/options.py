"""How a client talks to the swarm's peers: step timeout, wire format, bans, links' keys,
relaying, spot checks, heartbeats and failovers (`SwarmOptions`), checked when made."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoswarm.protocol.bounds import MAX_SECONDS
from nanoswarm.protocol.tensors import WIRE_FORMATS

# The least heartbeat by default: one reply frame must arrive within it (client/transport.py), and
# a node's I/O thread on a loaded machine must get a core; tests run with short step timeouts.
HEARTBEAT_MIN_SECONDS = 5.0
MAX_HEARTBEAT_SECONDS = 3600.0  # libzmq takes the heartbeat in ms as a C int
MAX_FAILOVERS = 1000  # (each replays the session's history into its replacement)


@dataclass
class SwarmOptions:
    timeout: float = 30.0        # seconds a peer may take to answer one step
    wire: str = "float32"        # format of hidden states on the wire
    ban_seconds: float = 30.0    # first ban; doubles with every further strike
    # (public, secret); None: ephemeral per link. Not in repr: a log line or traceback would show the secret
    client_keys: tuple[bytes, bytes] | None = field(default=None, repr=False)
    insecure: bool = False       # allow unencrypted links to peers that have no CURVE key
    relay: bool = True           # consecutive layer stages pass steps node to node (client/relay.py)
    # a head group's members exchange their partial sums themselves (node/all_reduce.py), where
    # all of them take it; off, the client meets them twice a block (client/head_group.py)
    all_reduce: bool = True
    # --peers contacts are told of each other, so that nodes started without a bootstrap relay
    # (client/introduce.py); off, they relay only to the peers they already know.
    introduce: bool = True
    verify: float = 0.0          # share of steps after which one stage's work is redone here (client/verify.py)
    # Seconds a peer's connection may stay silent, heartbeats unanswered, before it counts as
    # dropped (client/link_drops.py); None: a third of `timeout`, at least HEARTBEAT_MIN_SECONDS.
    heartbeat: float | None = None
    # Failovers a session takes (stages replaced on other peers, histories recovered) before it
    # gives up with SessionError (client/failover.py): a swarm whose peers keep failing ends it.
    max_failovers: int = 8

    def __post_init__(self) -> None:
        def seconds(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_SECONDS

        if not seconds(self.timeout):
            raise ValueError(f"timeout must be a positive number of seconds up to {MAX_SECONDS:.0f}, "
                             f"got {self.timeout!r}")
        if not seconds(self.ban_seconds):
            raise ValueError(f"ban_seconds must be a positive number of seconds up to {MAX_SECONDS:.0f}, "
                             f"got {self.ban_seconds!r}")
        if self.wire not in WIRE_FORMATS:
            raise ValueError(f"wire must be one of {', '.join(WIRE_FORMATS)}, got {self.wire!r}")
        for name in ("insecure", "relay", "introduce", "all_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.verify, (int, float)) and not isinstance(self.verify, bool) and 0 <= self.verify <= 1):
            raise ValueError(f"verify must be a fraction of steps from 0 to 1, got {self.verify}")
        if type(self.max_failovers) is not int or not 0 <= self.max_failovers <= MAX_FAILOVERS:
            raise ValueError(f"max_failovers must be a whole number from 0 to {MAX_FAILOVERS}, "
                             f"got {self.max_failovers!r}")
        if self.heartbeat is not None and not (isinstance(self.heartbeat, (int, float))
                                               and not isinstance(self.heartbeat, bool)
                                               and 0.1 <= self.heartbeat <= MAX_HEARTBEAT_SECONDS):
            raise ValueError(f"heartbeat must be 0.1 to {MAX_HEARTBEAT_SECONDS:g} seconds, got {self.heartbeat}")

    @property
    def silence(self) -> float:
        """Seconds of silence after which a peer's connection counts as dropped: a frozen peer,
        or one whose machine left the network, is replaced after this, not after `timeout`."""
        if self.heartbeat is not None:
            return float(self.heartbeat)
        return min(MAX_HEARTBEAT_SECONDS, max(HEARTBEAT_MIN_SECONDS, self.timeout / 3))
