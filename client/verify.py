"""Spot checks: the client redoes a random share of a stage's work with its own copy of the blocks.

Peers are untrusted. Everything they send is checked for form (client/stages.py), but a node
that returns plausible, wrong hidden states would change the text silently. With
`SwarmOptions(verify=F)` (`generate --verify F`), after a fraction F of the steps the session
picks one of its stages at random and recomputes, from that stage's inputs, its outputs
for every position so far, with the blocks from the client's own model directory. A stage
whose outputs differ by more than its node's dtype and the wire can explain is failed over like
a dead one: banned, its blocks on other peers, and everything after it redone
(client/spot_checks.py). Which steps are checked is drawn from the OS's randomness, so a peer
cannot tell a checked step from another.

The cost is the client's: the checked stage's blocks in memory (loaded on first use) and one
pass over all positions per check. A checking session does not relay: each stage answers the
client itself, so the outputs checked are the ones the stage sent (in a relayed step, the
earlier hops' outputs come back through the later hops, which could alter them and have an
honest node blamed; a relayed prompt's do not come back at all).

A head group is checked member by member, for the step just taken (every piece of it): the
group's output is a sum of its members' partial sums, so only a member's own partials can show
which one computed wrong. A group of a checking session keeps what it sent and got back
(`FanOutRecord`): every block's attention inputs for every position (a member's attention reads
its cache of them) and, during a step, the MLP inputs and every member's partials. The check
redoes each member's share of every block from the inputs the client actually sent, so an honest
member is never blamed for another's earlier lie; a lie in what a member returned is caught on a
checked step, not on a later one (a member whose cache went wrong shows it on every later step).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanoswarm.shards.manifest import Manifest
from nanoswarm.shards.model import Block, Blocks
from nanoswarm.shards.weights import check_block_files, load_blocks

from .history import History
from .peer_errors import PeerError

if TYPE_CHECKING:
    from .head_group import HeadGroupStage

log = logging.getLogger(__name__)

# The largest difference, relative to the largest |value| of the reference, that an honest node
# explains: by its dtype (float32 batched against one position at a time: ~1e-6 here) and by
# the wire's rounding of its inputs and outputs. Measured in tests/test_verify.py.
DTYPE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
WIRE_TOLERANCE = {"float32": 0.0, "float16": 2e-2, "bfloat16": 1e-1, "q80": 1e-1}
MAX_DTYPES_KEPT = 4096  # peer processes whose dtype is kept (then forgotten together, and asked again)


class SpotChecker:
    def __init__(self, model_dir: str | Path, manifest: Manifest, fraction: float):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"verify must be a fraction of steps from 0 to 1, got {fraction}")
        self.model_dir, self.manifest, self.fraction = Path(model_dir), manifest, fraction
        if fraction > 0:
            check_block_files(model_dir, manifest)  # here, not at the first check mid-generation
        self._rng = random.SystemRandom()  # peers must not predict which steps are checked
        self._blocks: dict[int, Blocks] = {}  # one module a block: routes split them differently over time
        self._slices: dict[tuple[int, tuple[int, int]], Block] = {}  # a block's heads, for head groups
        self._dtypes: dict[tuple, str | None] = {}  # by peer process (dtype_of): what it states, None if nothing

    def due(self) -> bool:
        return self.fraction > 0 and (self.fraction >= 1 or self._rng.random() < self.fraction)

    def pick(self, choices: list[int]) -> int:
        return self._rng.choice(choices)

    def reference(self, start: int, stop: int, hidden: torch.Tensor) -> torch.Tensor:
        """Blocks [start, stop) on every position of `hidden` [1, T, C], in this process."""
        missing = [i for i in range(start, stop) if i not in self._blocks]
        if missing:
            log.info("loading blocks %d:%d for spot checks", missing[0], missing[-1] + 1)
        for i in missing:
            self._blocks[i] = load_blocks(self.model_dir, i, i + 1, manifest=self.manifest)
        x = hidden.to(torch.float32)
        with torch.inference_mode():
            for i in range(start, stop):
                x = self._blocks[i](x)
        return x

    def member_reference(self, block: int, heads: tuple[int, int], phase: str, x: torch.Tensor,
                         positions: int) -> torch.Tensor:
        """What the member holding `heads` of `block` should have answered for the last `positions`
        positions of `x` (FanOutRecord.inputs): its partial sum of attention ("attn") or of the MLP
        ("mlp")."""
        key = (block, tuple(heads))
        if key not in self._slices:
            log.info("loading heads %d:%d of block %d for spot checks", heads[0], heads[1], block)
            blocks = load_blocks(self.model_dir, block, block + 1, heads=heads, manifest=self.manifest)
            self._slices[key] = blocks.h[str(block)]
        layer = self._slices[key]
        x = x.to(torch.float32)
        with torch.inference_mode():
            if phase == "attn":  # every position so far: this step's queries attend to all of them
                return layer.attn_partial(x, None, 0)[:, -positions:]
            return layer.mlp_partial(x[:, -positions:])

    @staticmethod
    def partial_difference(reference: torch.Tensor, got: torch.Tensor, sent: torch.Tensor) -> float:
        """Largest |reference - got| of a member's partial sum, relative to the larger of its own
        largest |value| and a hundredth of the largest |value| it was sent. Partials are often far
        below 1 (a member without the output biases: 0.02-0.03 in the tests' model), where
        `difference`'s floor of 1 let a member add 50% to every partial under bfloat16's slack;
        an honest member's error scales with its partial (at most ~1% of it measured, on a q80
        wire), and the hundredth of the input keeps a partial near zero from being judged on noise."""
        got = got.to(torch.float32)
        scale = max(float(reference.abs().max()), 0.01 * float(sent.abs().max()), 1e-6)
        return float((reference - got).abs().max()) / scale

    def wrong_member(self, group: HeadGroupStage, dtypes: list[str | None], wire: str) -> PeerError | None:
        """Every member's partial sums of a head group's last step (client/head_group.py
        HeadGroupStage, its `record`) against the client's own, from the inputs the client sent;
        the error to fail the group over with for the first member found wrong, if any (blamed
        alone: what it returned depends only on what it was sent and holds). `dtypes`: what each
        member states."""
        record = group.record
        for block in range(group.start, group.stop):
            for phase in ("attn", "mlp"):
                x = record.inputs(block, phase)  # once for every member
                sent = x[:, -record.positions:]
                for (conn, heads), dtype, got in zip(group.members, dtypes, record.step_partials(block, phase)):
                    reference = self.member_reference(block, heads, phase, x, record.positions)
                    diff = self.partial_difference(reference, got, sent)
                    error = self.judge(conn.address, f"heads {heads[0]}:{heads[1]} of layer {block} ({phase})",
                                       dtype, wire, diff)
                    if error is not None:
                        return error
        return None

    def judge(self, address: str, work: str, dtype: str | None, wire: str, diff: float) -> PeerError | None:
        """The error for a peer whose `work` differs from the client's by `diff` (relative), if
        that is more than its dtype and the wire explain."""
        tolerance = self.tolerance(dtype, wire)
        if diff <= tolerance:
            return None
        return PeerError(address, "wrong_result",
                         f"{work} differ from the client's own computation by {diff:.3g} of their scale "
                         f"(an honest {dtype or 'float32'} node on a {wire} wire: at most {tolerance:.3g})")

    def tolerance(self, dtype: str | None, wire: str) -> float:
        """The slack of an honest node of `dtype` (as it states it: None or one we do not know
        gets float32's, the strictest) on a `wire` of that format."""
        return max(DTYPE_TOLERANCE.get(dtype or "float32", DTYPE_TOLERANCE["float32"]), WIRE_TOLERANCE.get(wire, 1e-1))

    @staticmethod
    def difference(reference: torch.Tensor, got: torch.Tensor) -> float:
        """Largest |reference - got|, relative to the largest |reference| (at least 1)."""
        got = got.to(torch.float32)
        scale = max(1.0, float(reference.abs().max()))
        return float((reference - got).abs().max()) / scale

    def dtype_of(self, process: tuple, known: dict, ask: Callable[[], dict[str, Any]]) -> str | None:
        """A peer's dtype: from what the swarm knows of it (`known`: its `info`), else asked once
        (`ask()`: its `info` reply's fields); None when it answered without one, or with one that
        makes no sense (the check then uses the strictest tolerance). Kept for the peer's process
        (`process`: PeerConnection.peer_process, which changes when the link connects again): a
        node restarted at the same address with another dtype was judged by the old one for the
        model's life, and an honest bfloat16 node banned on float32's slack (review208). What
        the swarm knew is taken for the first process only; a later one is asked. A PeerError from
        `ask` (no answer) goes to the caller, which fails the peer over."""
        if process in self._dtypes:
            return self._dtypes[process]
        first = not any(p[0] == process[0] for p in self._dtypes)  # (by address)
        dtype = known.get("dtype") if first else None
        if dtype is None:
            dtype = ask().get("dtype")
        if len(self._dtypes) >= MAX_DTYPES_KEPT:
            self._dtypes.clear()
        self._dtypes[process] = dtype if isinstance(dtype, str) else None
        return self._dtypes[process]


class FanOutRecord:
    """What a head group of a checking session sent its members and got back: every block's
    attention inputs for every position so far, and for its last step (every piece of it) the MLP
    inputs and every member's partial sums, by block and phase (client/head_group.py HeadGroupStage
    fills it; SpotChecker.wrong_member reads it). The session drops the last step's part once
    that step's check is over, or at once when it has none (`drop_step`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new session on the members: nothing sent yet."""
        self.attn_inputs: dict[int, History] = {}
        self.begin(0)

    def truncate(self, pos: int) -> None:
        """The group's members drop what they hold from `pos` on (a step that rewinds, after one
        cut short): so do the attention inputs kept, or a check would compute the heads over
        positions the members no longer hold (HeadGroupStage.step)."""
        for history in self.attn_inputs.values():
            history.truncate(pos)

    def begin(self, positions: int) -> None:
        """A step of `positions` positions starts: the last one's MLP inputs and partials go."""
        self.positions = positions
        self._mlp_inputs: dict[int, list[torch.Tensor]] = {}  # by block: one tensor a piece
        self._partials: dict[tuple[int, str], list[list[torch.Tensor]]] = {}  # by (block, phase): a list a piece

    def drop_step(self) -> None:
        """The last step's check is over (or it had none): its MLP inputs and partials go."""
        self.begin(0)

    @property
    def has_step(self) -> bool:
        return self.positions > 0 and bool(self._partials)

    def sent(self, block: int, phase: str, hidden: torch.Tensor) -> None:
        if phase == "attn":
            self.attn_inputs.setdefault(block, History()).append(hidden, hidden.shape[1])
        else:
            self._mlp_inputs.setdefault(block, []).append(hidden)

    def answered(self, block: int, phase: str, partials: list[torch.Tensor]) -> None:
        self._partials.setdefault((block, phase), []).append(list(partials))

    def inputs(self, block: int, phase: str) -> torch.Tensor:
        """What the members' answers of the last step depend on, for `block` and `phase`: the
        attention inputs of every position so far (kept as one tensor from then on, so that a
        later check does not join every step's again), or the step's MLP inputs."""
        if phase == "attn":
            history = self.attn_inputs[block]
            if len(history.entries) > 1:
                self.attn_inputs[block] = history = History.of(history.tensor())
            return history.entries[0]
        return torch.cat(self._mlp_inputs[block], dim=1)

    def step_partials(self, block: int, phase: str) -> list[torch.Tensor]:
        """Every member's partial sums for `block` and `phase` in the last step, in member order."""
        pieces = self._partials[(block, phase)]
        return [torch.cat([piece[k] for piece in pieces], dim=1) for k in range(len(pieces[0]))]
