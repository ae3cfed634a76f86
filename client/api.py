"""The client's Python API: connect to a swarm (or run locally) and generate text.

    model = SwarmModel.connect("models/demo", peers=["tcp://127.0.0.1:5555#<node's key>", ...])
    result = model.generate("ROMEO:", max_new_tokens=50, sampling=SamplingParams(temperature=0))
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoswarm.shards.device import resolve_device
from nanoswarm.shards.manifest import Manifest, read_manifest
from nanoswarm.shards.model import ModelConfig
from nanoswarm.shards.tokenizer import EOT_TOKEN, encode, get_encoding
from nanoswarm.shards.weights import load_blocks, load_embeddings, load_head

from .batch import generate_in_step
from .batcher import IDLE_SECONDS, Batcher
from .generate import ClientModel, GenerationStats, SamplingParams, TextStream, generate_ids
from .idle_reads import IdleReads
from .session import InferenceSession
from .stages import LocalStage
from .swarm import Swarm, SwarmOptions
from .verify import SpotChecker


@dataclass
class GenerationResult:
    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    route: list[dict] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    failovers: int = 0
    stop_reason: str = ""   # "eot" (the model ended the text), "length" (max_new_tokens), "context" (full)
    spot_checks: int = 0    # stages' work redone here (SwarmOptions.verify)
    wrong_results: int = 0  # of them, found wrong (each peer failed over)
    logits: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "ids": self.ids,
                "text": self.text, "stop_reason": self.stop_reason, "route": self.route, "failovers": self.failovers,
                "spot_checks": self.spot_checks, "wrong_results": self.wrong_results,
                "time_to_first_token": self.stats.time_to_first_token,
                "tokens_per_second": self.stats.tokens_per_second}


log = logging.getLogger(__name__)

DISCOVERY_SECONDS = 5.0  # the longest wait for a peer's `info` or a bootstrap's records


def prompt_ids(prompt: str) -> list[int]:
    """The token ids a prompt is generated from: "<|endoftext|>" in it is plain text (an
    application's users cannot end a document early), and an empty prompt starts from it."""
    return encode(prompt) or [EOT_TOKEN]


def check_types(prompt: str, sampling: SamplingParams | None) -> None:
    """TypeError unless `prompt` is text and `sampling` SamplingParams or None."""
    if not isinstance(prompt, str):
        raise TypeError(f"the prompt must be text (str), got {type(prompt).__name__}")
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be SamplingParams, got {type(sampling).__name__}")


def stream_to_end(stream: Callable[..., Iterator[str]], prompt: str, max_new_tokens: int,
                  sampling: SamplingParams | None, keep_logits: bool) -> GenerationResult:
    """The GenerationResult of a `stream(prompt, max_new_tokens, sampling, result, keep_logits)`
    read to its end."""
    result = GenerationResult(prompt)
    for _ in stream(prompt, max_new_tokens, sampling, result, keep_logits):
        pass
    return result


def check_prompt_length(ids: list[int], context: int) -> None:
    """ValueError unless a prompt of `ids` fits a model of `context` positions."""
    if len(ids) > context:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {context}")


class PromptError(ValueError):
    """A prompt of a batch that the model cannot take: `index`, which one; `why`, what is wrong."""

    def __init__(self, index: int, why: str):
        super().__init__(f"prompts[{index}]: {why}")
        self.index, self.why = index, why

    def __reduce__(self) -> tuple:  # pickled and copied with both (review188: `args` holds the text only)
        return type(self), (self.index, self.why)


def new_tokens(config: ModelConfig, ids: list[int], max_new_tokens: int, warn: bool = True) -> int:
    """How many tokens to generate from a prompt of `ids` on a model of `config`: max_new_tokens,
    capped by the context (with a warning, if `warn`). ValueError for a prompt the model cannot
    take, or a bad max_new_tokens."""
    if type(max_new_tokens) is not int or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    vocab, context = config.vocab_size, config.block_size
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:  # the embedding has no row for it: say so before any peer is asked
        raise ValueError(f"prompt token {bad} ({get_encoding().decode([bad])!r}) is outside the "
                         f"model's vocabulary of {vocab} ids")
    check_prompt_length(ids, context)
    # Positions 0..context-1 hold the prompt and all new tokens but the last, which is only
    # sampled: a prompt of `context` tokens still gets one.
    room = context - len(ids) + 1
    if max_new_tokens > room and warn:
        log.warning("generating %d token%s, not %d: the model's context is %d and the prompt is %d",
                    room, "" if room == 1 else "s", max_new_tokens, context, len(ids))
    return min(max_new_tokens, room)


def check_prompts(config: ModelConfig, prompts: list[str], max_new_tokens: int) -> None:
    """Whether a model of `config` takes each of `prompts` (text) with `max_new_tokens`: a
    ValueError for max_new_tokens, then a PromptError naming the first it cannot take (review185:
    "prompt is 71 tokens" of a file of hundreds). The CLI asks before it connects: a bad prompt
    is told without a swarm, and before a dead bootstrap is."""
    new_tokens(config, [], max_new_tokens, warn=False)  # (first: not one prompt's error)
    for k, prompt in enumerate(prompts):
        try:
            new_tokens(config, prompt_ids(prompt), max_new_tokens, warn=False)
        except ValueError as e:
            raise PromptError(k, str(e)) from None


class SwarmModel:
    """A model whose blocks run on peers (or, with `local`, in this process)."""

    def __init__(self, model_dir: str | Path, manifest: Manifest, swarm: Swarm | None,
                 local_stage: LocalStage | None = None, device: torch.device | str = "cpu"):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.config = manifest.config
        self.swarm = swarm
        self._local = local_stage
        device = resolve_device(str(device))  # a clear error for a GPU that is not there
        self.client = ClientModel(load_embeddings(model_dir, manifest),
                                  load_head(model_dir, manifest, device=device))
        self.encoding = get_encoding()
        # Sessions share the swarm's sockets, which ZeroMQ lets one thread use at a time: the
        # generations of several threads take turns, a step each (stream).
        self._lock = threading.RLock()
        self.closed = False
        self._batchers: weakref.WeakSet[Batcher] = weakref.WeakSet()  # stopped by close
        self._idle_reads: IdleReads | None = None  # a swarm's links read while it sits idle

    @classmethod
    def connect(cls, model_dir: str | Path, peers: list[str] | None = None,
                bootstrap: list[str] | None = None, options: SwarmOptions | None = None,
                device: torch.device | str = "cpu") -> SwarmModel:
        """The swarm's peers from `peers` contacts or `bootstrap` tables; the head runs on `device`."""
        for name, given in (("peers", peers), ("bootstrap", bootstrap)):
            if isinstance(given, (str, bytes)):  # a list was meant: one contact is a list of one
                raise TypeError(f"{name} must be a list of contacts, got a single {type(given).__name__}")
        if not peers and not bootstrap:  # (else every route failed later: no peer serves layers 0:N)
            raise ValueError("give peers (contacts of the nodes to use) or bootstrap (nodes whose tables "
                             "name the rest)")
        manifest = read_manifest(model_dir)
        options = options or SwarmOptions()
        checker = SpotChecker(model_dir, manifest, options.verify) if options.verify > 0 else None  # (before any peer)
        swarm = Swarm(manifest.model_id, manifest.config.n_layer, manifest.config.n_head, options)
        try:
            # Asking who serves what is quick work for a peer: at most DISCOVERY_SECONDS, or the
            # (shorter) time the options give a peer for any answer.
            timeout = min(DISCOVERY_SECONDS, swarm.options.timeout)
            if bootstrap:
                from .discovery import add_from_bootstrap
                swarm.bootstraps = list(bootstrap)
                add_from_bootstrap(swarm, bootstrap, timeout, time_peers=True)
            if peers:
                swarm.add_addresses(peers, timeout)
            swarm.warn_rejected()
            swarm.connect_route_ahead()  # handshakes overlap the head's load below
            swarm.checker = checker
            model = cls(model_dir, manifest, swarm, device=device)
            model._idle_reads = IdleReads(model)
            return model
        except BaseException:  # a device that is not there, Ctrl-C: the links made so far
            swarm.close()
            raise

    @classmethod
    def local(cls, model_dir: str | Path, device: torch.device | str = "cpu") -> SwarmModel:
        """Everything in this process: the reference the swarm must match. The blocks run on the
        CPU, the head on `device`, as a swarm client's."""
        manifest = read_manifest(model_dir)
        blocks = load_blocks(model_dir, 0, manifest.config.n_layer, manifest=manifest)
        return cls(model_dir, manifest, None, LocalStage(blocks), device=device)

    def session(self, max_length: int, on_failover: Callable[[str], None] | None = None) -> InferenceSession:
        """A session of up to `max_length` positions, stepped by hand (`step`, then `close`). Its
        steps take turns with other threads' (the model's lock)."""
        context = self.config.block_size
        if type(max_length) is not int or not 1 <= max_length <= context:
            raise ValueError(f"max_length must be a whole number from 1 to the model's context {context}, "
                             f"got {max_length!r}")
        with self._lock:
            if self.closed:
                raise RuntimeError("this SwarmModel is closed")
            if self._local is not None:
                stage = LocalStage(self._local.blocks)  # a cache of its own: sessions may interleave
                stage.open(max_length)
                session = InferenceSession([stage], max_length)
            else:
                session = InferenceSession.open(self.swarm, max_length, on_failover=on_failover)
            session.width, session.lock = self.config.n_embd, self._lock
            return session

    def stream(self, prompt: str, max_new_tokens: int = 50, sampling: SamplingParams | None = None,
               result: GenerationResult | None = None, keep_logits: bool = False,
               on_failover: Callable[[str], None] | None = None) -> Iterator[str]:
        """Yields text pieces as tokens arrive; fills `result` if given. Several threads may
        stream from one SwarmModel at once (their steps take turns); `close` ends them all."""
        check_types(prompt, sampling)
        ids = prompt_ids(prompt)
        requested, max_new_tokens = max_new_tokens, self._new_tokens(ids, max_new_tokens)
        result = result if result is not None else GenerationResult(prompt, ids)
        result.prompt, result.prompt_ids = prompt, ids
        result.stats.prompt_tokens = len(ids)
        if max_new_tokens == 0:
            if self.closed:  # as any other generation of a closed model (review160)
                raise RuntimeError("this SwarmModel is closed")
            result.stop_reason = "length"
            return  # nothing to compute: no session, no peer asked for one
        # The last sampled token is never fed back (generate_ids), so it needs no position.
        session = self.session(len(ids) + max_new_tokens - 1, on_failover)
        text = TextStream(self.encoding)
        tokens = generate_ids(self.client, session, ids, max_new_tokens, sampling or SamplingParams(),
                              EOT_TOKEN, result.stats, result.logits if keep_logits else None)
        stopped = False
        try:
            result.route = session.describe()
            result.stop_reason = ""  # until it ends as it should: not after an error, nor if stopped
            reason = "context" if max_new_tokens < requested else "length"
            first = True
            while True:
                with self._lock:  # one step: the swarm's sockets are this thread's meanwhile
                    if self.closed:
                        raise RuntimeError("this SwarmModel was closed during the generation")
                    token = next(tokens, None)
                    if first:  # the route that served the prompt (a stage may have failed in it)
                        result.route, first = session.describe(), False
                if token is None:
                    break
                result.ids.append(token)
                if token == EOT_TOKEN:  # the end of the document: no text of its own
                    reason = "eot"
                    continue
                piece = text.push(token)
                result.text += piece
                if piece:
                    yield piece
            tail = text.flush()
            result.text += tail
            result.stop_reason = reason
            if tail:
                yield tail
        except GeneratorExit:  # closed before its end, by the caller or by the garbage collector
            stopped = True
            raise
        finally:
            tokens.close()
            result.route = session.describe()
            result.failovers = session.failovers
            result.spot_checks, result.wrong_results = session.spot_checks, session.wrong_results
            # The collector closes an unfinished stream caught in a reference cycle on whichever
            # thread allocates, even inside another thread's step, which holds this lock (an RLock)
            # and may be between the frames of its request: a `close` sent then went out between
            # them, and the node that refused the torn message was banned (a review). So a stream
            # stopped while the lock is this thread's already, or another's, is closed on its
            # nodes by the model's next step, session or close() (InferenceSession.abandon).
            if not stopped:
                with self._lock:
                    session.close()
            elif self._lock._is_owned() or not self._lock.acquire(blocking=False):
                session.abandon()
            else:
                try:
                    session.close()
                finally:
                    self._lock.release()

    def _new_tokens(self, ids: list[int], max_new_tokens: int, warn: bool = True) -> int:
        """How many tokens to generate: new_tokens for this model's config."""
        return new_tokens(self.config, ids, max_new_tokens, warn)

    def generate(self, prompt: str, max_new_tokens: int = 50, sampling: SamplingParams | None = None,
                 keep_logits: bool = False) -> GenerationResult:
        return stream_to_end(self.stream, prompt, max_new_tokens, sampling, keep_logits)

    def generate_batch(self, prompts: list[str], max_new_tokens: int = 50, sampling: SamplingParams | None = None,
                       keep_logits: bool = False, at_once: int = 16,
                       on_done: Callable[[int, GenerationResult], None] | None = None,
                       on_wait: Callable[[], None] | None = None) -> list[GenerationResult]:
        """Generations of several prompts, up to `at_once` of them at a time, in step: each the
        generation `generate` would give alone (its own session, failover, spot checks; with the
        same `sampling`, seed included), their decode steps sent together so that the nodes run
        them in one forward pass, and the head run once a token for all (client/batch.py).
        Logits are within float32 rounding (~2e-6) of a lone generation's, so a token differs
        from a lone run's only where that rounding turns the sampler's order of two candidates
        (greedy: a tie that close; sampling: two logits that close swap places in its sort).
        Raises the first generation's error once every one has stopped; Ctrl-C stops them all,
        each after its step under way. `on_done(k, result)`, if given, is called as prompt k's
        generation ends as it should (from the thread that ran it: progress, say); `on_wait()`, if
        given, every 0.1 s or so on the calling thread while they run (to show what `on_done`
        noted: a write that blocks there is cut by Ctrl-C, where one on a generation's thread
        would hold the batch, review181); where they run one after another (a local model, one
        prompt, `at_once=1`), both on the calling thread after each prompt. An error either
        raises is the batch's."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) \
                or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of texts (str)")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        if type(at_once) is not int or at_once < 1:
            raise ValueError(f"at_once must be a whole number >= 1, got {at_once!r}")
        check_prompts(self.config, prompts, max_new_tokens)  # every prompt checked before any is sent
        if self.swarm is None or len(prompts) < 2 or at_once == 1:
            results = []
            for k, prompt in enumerate(prompts):
                results.append(self.generate(prompt, max_new_tokens, sampling, keep_logits))
                if on_done is not None:
                    on_done(k, results[k])
                if on_wait is not None:
                    on_wait()
            return results
        results = [GenerationResult(p) for p in prompts]
        generate_in_step(self, prompts, results, max_new_tokens, sampling, keep_logits, at_once, on_done, on_wait)
        return results

    def batcher(self, at_once: int = 16, idle_seconds: float = IDLE_SECONDS) -> Batcher:
        """A `Batcher`: generations asked for from any thread at any time, up to `at_once` at a time,
        run in step as `generate_batch`'s are (client/batcher.py); a worker idle for
        `idle_seconds` ends and closes its links. Close it (or use it in a `with`) when done;
        `close` of this model closes it too."""
        with self._lock:
            if self.closed:
                raise RuntimeError("this SwarmModel is closed")
            batcher = Batcher(self, at_once, idle_seconds)
            self._batchers.add(batcher)
            return batcher

    def _sibling(self, swarm: Swarm) -> SwarmModel:
        """A model over `swarm` sharing this one's weights and tokenizer (generate_batch)."""
        other = copy.copy(self)
        other.swarm, other._lock, other.closed, other._batchers = swarm, threading.RLock(), False, weakref.WeakSet()
        other._idle_reads = None  # (its thread reads its links at each step)
        return other

    def __enter__(self) -> SwarmModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the peers' links, and every session still open on them (the nodes free their
        KV caches at once); a generation still running ends with RuntimeError."""
        with self._lock:
            self.closed = True
            batchers = list(self._batchers)
        if self._idle_reads is not None:
            self._idle_reads.stop()
        for batcher in batchers:  # their workers close their own links (one thread's sockets)
            batcher.stop()
        with self._lock:
            if self.swarm is not None:
                self.swarm.close()
