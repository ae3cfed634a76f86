"""The benchmark's options: what a run measures, checked against the model's shape before
any model is made or any node started."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanoswarm.node.cluster import NodeSpec, even_split, swarm_specs
from nanoswarm.node.sessions import NodeLimits
from nanoswarm.protocol.tensors import WIRE_FORMATS
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.model import ModelConfig

from .models import SHAPES

DEFAULT_STAGES = (1, 2, 4)


@dataclass
class BenchOptions:
    model_dir: Path | None = None       # a model directory; else random weights of `shape`
    shape: str = "gpt2-small"
    stages: tuple[int, ...] | None = None  # None: 1, 2 and 4, as many of them as the model has blocks for
    sessions: tuple[int, ...] = (1, 8)
    head_groups: int = 2                # one stage of this many head-shard nodes; 0 skips it
    wires: tuple[str, ...] = ("float16", "bfloat16", "q80")  # also run the largest route with these
    links: tuple[str, ...] = ("relay", "star")  # the first on every route, the others on the largest too
    tokens: int = 32                    # decode steps per round
    prompt_len: int = 128
    repeats: int = 3                    # rounds per side and run
    session_tokens: int = 16            # decode steps per session in the concurrent runs
    session_threads: int | None = None  # torch threads here during concurrent runs (default: threads)
    threads: int = 2                    # torch threads, here and in every node
    node_args: tuple[str, ...] = ()     # further `nanoswarm node` options
    work_dir: Path | None = None        # where random model dirs are written (default: a temp dir)
    seed: int = 0
    progress: Callable[[str], object] | None = None  # a line per cluster and run (the CLI: stderr)


@dataclass
class Group:
    """One cluster and the runs made on it."""

    route: str                          # "layers" or "heads"
    specs: list[NodeSpec]
    variants: list[tuple[str, str]]     # (wire, links) of each run
    stages: int

    def node_threads(self, threads: int) -> int:
        """torch threads for each node of this group, where the runs give `threads`: a layer
        stage computes while the others wait, so each takes them all; a head group's members
        compute at once, so they share them (two members of 2 threads each on 2 cores made a
        GPT-2-small decode step 38 ms, of one each 27-35 ms)."""
        return threads if self.route == "layers" else max(1, threads // len(self.specs))

    def __str__(self) -> str:
        return f"{self.route}, {self.stages} stage{'s' * (self.stages > 1)}"


def stage_counts(opts: BenchOptions, n_layer: int, n_head: int) -> list[int]:
    """The layer-stage counts to try; ValueError for counts (or a head group) the model cannot take."""
    stages = [s for s in DEFAULT_STAGES if s <= n_layer] if opts.stages is None else list(opts.stages)
    if not all(1 <= s <= n_layer for s in stages):
        raise ValueError(f"--stages {','.join(map(str, stages))}: the model has {n_layer} blocks, "
                         f"so from 1 to {n_layer}")
    if opts.head_groups > n_head:
        raise ValueError(f"--head-groups {opts.head_groups}: the model has {n_head} heads, so from 2 to {n_head}")
    return stages


def run_groups(opts: BenchOptions, n_layer: int, n_head: int) -> list[Group]:
    stages = stage_counts(opts, n_layer, n_head)
    links = opts.links[0] if opts.links else "relay"
    groups = [Group("layers", [NodeSpec(r) for r in even_split(n_layer, s)], [("float32", links)], s)
              for s in stages]
    if groups:  # the other links and wires: on the longest route, where they matter most
        longest = max(groups, key=lambda g: g.stages)
        if longest.stages > 1:  # one stage always answers the client itself: no relay to compare
            longest.variants += [("float32", x) for x in opts.links[1:]]
        longest.variants += [(w, links) for w in opts.wires if w != "float32"]
    if opts.head_groups:
        # relay: its members all-reduce among themselves; star: the client meets them (fan-out)
        groups.append(Group("heads", swarm_specs(n_layer, n_head, 1, opts.head_groups),
                            [("float32", x) for x in opts.links], 1))
    return groups


def concurrent_prompts(ids: list[int], n: int) -> list[list[int]]:
    """The prompts of n concurrent sessions: different lengths (8-12) and contents, whatever
    --prompt-len is. `ids` needs n + 12 entries."""
    return [ids[i:i + 8 + i % 5] for i in range(n)]


def check_lengths(opts: BenchOptions, config: ModelConfig) -> None:
    """ValueError unless a round's prompt and tokens, and each concurrent session's, fit the
    model's context."""
    if opts.prompt_len + opts.tokens > config.block_size:
        raise ValueError(f"--prompt-len {opts.prompt_len} + --tokens {opts.tokens} exceed the model's context "
                         f"of {config.block_size}")
    longest = max((len(p) for n in opts.sessions for p in concurrent_prompts([0] * (n + 12), n)), default=0)
    if longest and longest + opts.session_tokens > config.block_size:
        raise ValueError(f"concurrent sessions need {longest} prompt + {opts.session_tokens} tokens, more "
                         f"than the model's context of {config.block_size}")


def check_options(opts: BenchOptions) -> None:
    """ValueError, in the CLI's terms, for options no run can use."""
    if opts.head_groups == 1:
        raise ValueError("--head-groups 1 would be a plain layer stage: give 0 (none) or 2 or more members")
    if not opts.links or set(opts.links) - {"relay", "star"}:
        raise ValueError("--links takes relay and/or star, e.g. relay,star")
    unknown = set(opts.wires) - set(WIRE_FORMATS)
    if unknown:
        raise ValueError(f"--wires: unknown {', '.join(sorted(unknown))}; formats are {', '.join(WIRE_FORMATS)}")
    # Against the shape too, known before anything is made (--stages 99 was refused after ~12 s).
    if max(opts.sessions, default=0) > NodeLimits.max_sessions:
        raise ValueError(f"--sessions: at most {NodeLimits.max_sessions} concurrent sessions, a node's "
                         "default limit (the run would fail at its end)")
    config = read_manifest(opts.model_dir).config if opts.model_dir is not None else SHAPES[opts.shape]
    stage_counts(opts, config.n_layer, config.n_head)
    check_lengths(opts, config)


def parse_ints(text: str, what: str = "the list") -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): at least one, each positive; ValueError naming `what` otherwise."""
    items = _items(text, what)
    try:
        values = tuple(int(x) for x in items)
    except ValueError:
        raise ValueError(f"{what} {text!r} must be comma-separated whole numbers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} {text!r} must name at least one number, each 1 or more")
    return _once(values, what, text)


def parse_names(text: str, what: str = "the list") -> tuple[str, ...]:
    return _once(_items(text, what), what, text)


def _items(text: str, what: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'); an empty item ('1,,2', '1,') is refused, as a likely typo."""
    items = tuple(x.strip() for x in text.split(","))
    if len(items) > 1 and not all(items):
        raise ValueError(f"{what} {text!r} has an empty item")
    return tuple(x for x in items if x)


def _once(values: tuple, what: str, text: str) -> tuple:
    """Each value once: a repeat would run the same row twice (and compare a run with itself)."""
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        raise ValueError(f"{what} {text!r} names {repeated} twice")
    return values
