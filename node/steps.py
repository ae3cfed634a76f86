"""Computation on a node: steps validated (node/step_checks.py) run in batches, decode steps of
several sessions in one forward pass, and the replies built from the results (to the client, or
relayed on to the next hop: node/relay.py); also the stateless forward. No sockets here
(node/handler.py hands requests over, node/server.py owns the socket)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import Message, encode_frames, error_frames
from nanoswarm.protocol.tensors import Buffer, all_finite, fits_wire, frame_finite, to_frame
from nanoswarm.shards.model import Blocks

from .relay import Relay, next_hop_id
from .sessions import NodeLimits, Session, SessionStore
from .step_checks import PendingStep, StepChecks

# An illegal memory access, a device-side assert or a hardware fault poisons the process's CUDA
# context: every later kernel fails too. torch raises these as AcceleratorError (a RuntimeError).
DEVICE_ERRORS: tuple[type[Exception], ...] = tuple(
    t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)

log = logging.getLogger(__name__)

Reply = tuple[bytes | Relay, list]  # (peer identity, or the next hop of a relayed step; frames)
WARM_UP = 2  # untimed one-token steps before the throughput a node advertises is measured


def _unsendable(x: torch.Tensor, y: torch.Tensor, wire: str, frame: Buffer) -> str | None:
    """Why the result `y` of input `x`, encoded as `frame`, cannot be sent, or None when it can.

    Inputs are checked here, after the forward pass, not before it: a NaN or Inf in an input row
    makes that row of the output non-finite (LayerNorm spreads it over the row, and every later op
    is row-wise or attends from that row), and rows of different sessions never mix. So a finite
    output proves a finite input, and the checks that used to run first, the costliest calls of a
    step that wakes a node with cold caches (docs/performance.md), now run only on failure. The
    caller undoes the step's change to the session.
    """
    finite = frame_finite(frame, wire)  # numpy on the bytes that go out: no further torch call
    if finite or (finite is None and fits_wire(y, wire)):
        return None
    if not all_finite(x):
        if x.dtype == torch.float16:  # the input may have been finite before this node's conversion
            return "tensor holds NaN or Inf in this node's float16 (values beyond 65504 overflow)"
        return "tensor holds NaN or Inf"
    if x.dtype in (torch.float16, torch.bfloat16) and not all_finite(y):  # not the wire's doing
        return f"this node's {str(x.dtype).removeprefix('torch.')} computation overflowed to NaN or Inf"
    return f"the result does not fit {wire} (overflow to NaN or Inf)"


_IN_IT_ALREADY = contextlib.nullcontext()


def inference() -> contextlib.AbstractContextManager:
    """torch.inference_mode(), or nothing where this thread runs in it already (a node's loop
    does, node/daemon.py): entering and leaving it took ~40 us after a matmul had evicted the
    caches, and more in a node woken after the other stages' passes (docs/performance.md,
    fifty-fifth session)."""
    return _IN_IT_ALREADY if torch.is_inference_mode_enabled() else torch.inference_mode()


def _batch_key(p: PendingStep) -> tuple:
    """Steps with the same key run as one forward pass: one-position steps (decode, which is bound
    by reading the weights, so a batch of N costs little more than one) over the same blocks, or,
    on a head shard, the same phase of the same block (attention: with the sessions' caches at
    the same offset). Anything else runs alone."""
    if p.x.shape[1] != 1:
        return (id(p),)
    phase = p.msg.get("phase")
    if phase is None:
        return (None, p.session.start, p.session.stop)
    if phase == "mlp":
        return ("mlp", p.msg.fields["block"])
    return ("attn", p.msg.fields["block"], p.session.start)


def _stored_block(s: Session, tokens: int) -> None:
    """A head shard's session after the attention of its next block stored `tokens` positions."""
    if s.next_block == 0:
        s.pending_tokens = tokens
    s.next_block += 1
    if s.start + s.next_block == s.stop:  # every block has stored this position
        s.cache.length += tokens
        s.next_block = 0


def _rewound(p: PendingStep) -> str:
    """What a refused step's error adds when the step had rewound its session."""
    return f"; the session now holds {p.length} positions (this step rewound it)" if p.rewound else ""


# A node's stated load is its busy fraction over about the last minute: over its whole life, a
# node that served a crowd for an hour and then nothing looked busy for hours, and one that took
# a crowd after a quiet day looked idle, so routes spread sessions by history, not by now.
LOAD_WINDOW = 60.0
LOAD_MARK_EVERY = LOAD_WINDOW / 12  # how often a (time, busy seconds) mark is kept, at most


@dataclass
class NodeStats:
    throughput: float = 0.0          # tokens/s through all served blocks, measured at start-up and after a move
    steps: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0        # in forward passes, over the node's life
    batched_steps: int = 0           # forward passes that ran decode steps of several sessions
    max_batch: int = 0               # most sessions in one forward pass so far
    relayed: int = 0                 # steps passed on to a next hop (node/relay.py)
    started: float = field(default_factory=time.monotonic)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _marks: deque[tuple[float, float]] = field(default_factory=deque, repr=False)

    def load(self, now: float | None = None) -> float:
        """The fraction of the last LOAD_WINDOW seconds (up to LOAD_MARK_EVERY more, or the time
        since the last call where calls are rarer) spent in forward passes; of the node's whole
        life while it is younger. Called on the server thread (info, and every record's refresh)."""
        now = time.monotonic() if now is None else now
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= now - LOAD_WINDOW:
            marks.popleft()  # the newest mark at least a window old is the one measured from
        since, busy = marks[0] if marks and marks[0][0] <= now - LOAD_WINDOW else (self.started, 0.0)
        if not marks or now - marks[-1][0] >= LOAD_MARK_EVERY:
            marks.append((now, self.busy_seconds))
        return min(1.0, max(0.0, self.busy_seconds - busy) / max(now - since, 1e-9))


class StepRunner:
    """Runs the blocks for a node's requests: the steps of a batch that its `checks` validated
    (`run`: decode steps of different sessions over the same blocks share one forward pass), and
    stateless forwards (`forward`). Every refusal is a ProtocolError or an error reply, never a
    changed session: a step that fails after its forward pass is undone, except that a rewinding
    step has dropped the positions it was to rewrite (its error says so)."""

    def __init__(self, blocks: Blocks, sessions: SessionStore, limits: NodeLimits, stats: NodeStats):
        self.blocks = blocks
        self.config = blocks.config
        self.limits = limits
        self.stats = stats
        self.checks = StepChecks(blocks, sessions, limits)
        self.head_shard = blocks.heads != (0, self.config.n_head)
        param = next(blocks.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._cpu = self.device.type == "cpu"
        self._batch_started = time.perf_counter()  # when the current batch began (see _overloaded)
        self._batch_computed = False                # whether this batch has run any blocks yet
        self._last_busy = 0.0                       # seconds of the last forward pass
        self._refused_busy: list[PendingStep] = []  # steps run() refused busy, for take_refused_busy
        self.device_failure: str | None = None  # why the device can compute no more (DEVICE_ERRORS)

    def begin_batch(self) -> None:
        self._batch_started, self._batch_computed = time.perf_counter(), False

    def take_refused_busy(self) -> list[PendingStep]:
        """The steps `run` refused `busy` since the last call."""
        refused, self._refused_busy = self._refused_busy, []
        return refused

    def error(self, req_id: int, code: ErrorCode, message: str) -> list:
        """An error reply, counted in the node's stats."""
        self.stats.errors[code.value] += 1
        return error_frames(req_id, code, message)

    def forward(self, msg: Message, a: int, b: int, wire: str) -> list:
        """A stateless forward through blocks [a, b) (whole blocks: the caller checked that this
        node serves them whole, and the request with check_forward); its reply in `wire`."""
        if self._overloaded():
            raise ProtocolError(ErrorCode.BUSY, self._overload_message())
        x = self.checks.hidden(msg, max_batch=64)
        with inference():
            y = self._timed(lambda: self.blocks(x, None, a, b), x.shape[0] * x.shape[1])
        frame = to_frame(y, wire)
        problem = _unsendable(x, y, wire, frame)
        if problem:
            raise ProtocolError(ErrorCode.BAD_VALUE, problem)
        return encode_frames("result", msg.id, {}, [(wire, tuple(y.shape))], [frame])

    def run(self, pending: list[PendingStep]) -> list[Reply]:
        replies: list[Reply] = []
        # Decode steps of different sessions share one forward pass where they can (_batch_key).
        groups: dict[tuple, list[PendingStep]] = defaultdict(list)
        for p in pending:
            groups[_batch_key(p)].append(p)
        for group in groups.values():
            if self._overloaded():  # refuse what cannot start in time; the sessions are untouched
                self._refused_busy.extend(group)
                replies.extend((p.reply_to[0], self.error(p.reply_to[1], ErrorCode.BUSY, self._overload_message()))
                               for p in group)
                continue
            answered = 0
            try:
                outputs = self._compute(group)
                for p, y in zip(group, outputs):
                    replies.extend(self._result(p, y))
                    answered += 1
            # Device memory taken meanwhile: the sessions are untouched, but for what a rewinding
            # step dropped (its `busy` says so: `_rewound`).
            except torch.cuda.OutOfMemoryError:
                self._refused_busy.extend(group[answered:])
                replies.extend((p.reply_to[0], self.error(p.reply_to[1], ErrorCode.BUSY,
                                                          self.out_of_memory() + _rewound(p)))
                               for p in group[answered:])
            except Exception as e:
                log.exception("internal error in a step")
                self.note_error(e)
                # The sessions as they were before the step: a GPU's error comes out when the result
                # is copied back, after the caches counted the new positions.
                for p in group[answered:]:
                    p.session.cache.length, p.session.next_block = p.length, p.next_block
                replies.extend((p.reply_to[0], self.error(p.reply_to[1], ErrorCode.INTERNAL,
                                                          type(e).__name__ + _rewound(p)))
                               for p in group[answered:])
        return replies

    def note_error(self, e: Exception) -> None:
        """Keep why the device failed, if `e` says it did: the node then has to stop (its server
        reads `device_failure`), or it would stay on every route and answer `internal` forever.
        On a GPU any RuntimeError asks: cuBLAS's and cuDNN's failures are plain ones."""
        maybe = isinstance(e, DEVICE_ERRORS) or (not self._cpu and isinstance(e, RuntimeError))
        if maybe and self.device_failure is None and not self.device_works():
            first = str(e).strip().splitlines()[:1]
            self.device_failure = f"{type(e).__name__} on {self.device}" + (f": {first[0]}" if first else "")

    def device_works(self) -> bool:
        """Whether a tiny kernel still runs: some CUDA errors (a launch out of resources, a bad
        configuration) end one call only; a lost context fails every later one."""
        try:
            torch.ones(1, device=self.device).add_(1)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return True
        except Exception:  # noqa: BLE001 - any failure says the device is gone
            return False

    def _overloaded(self) -> bool:
        """This batch has computed for max_batch_seconds: its other requests, and those queued behind
        it, would wait past what clients wait for. Refusing them (`busy`) answers them now. The
        first computation of a batch always runs, so the node makes progress."""
        return self._batch_computed and time.perf_counter() - self._batch_started > self.limits.max_batch_seconds

    def out_of_memory(self) -> str:
        """`busy`'s message when device memory ran out (other work on the GPU took it): nothing of
        a session was changed, so asking again later is right, not a failover."""
        return f"out of {self.device} memory; retry later"

    def _overload_message(self) -> str:
        return (f"node overloaded: this batch has computed for {self.limits.max_batch_seconds:g} s; "
                "retry the same request later")

    def _result(self, p: PendingStep, y: torch.Tensor) -> list[Reply]:
        """The reply to a step: its result; for a relayed step, the step sent on to the next hop
        or, from the last hop, the result to the client, either carrying the outputs of every
        hop so far (with `trail` false only this hop's). NaN/Inf must not be sent (from a bad
        input, or an overflow)."""
        to, reply_id = p.reply_to
        frame = to_frame(y, p.wire)
        problem = _unsendable(p.x, y, p.wire, frame)
        if problem:  # undo the step, so the session can carry on
            p.session.cache.length, p.session.next_block = p.length, p.next_block
            return [(to, self.error(reply_id, ErrorCode.BAD_VALUE, problem + _rewound(p)))]
        # busy_us: the compute of the forward pass this step ran in, so a client can tell the
        # node's compute from the time on the wire (nanoswarm bench's per-stage overhead).
        busy_us = int(self._last_busy * 1e6)
        last = p.msg.get("last")
        if not p.hops and last is not None and last < y.shape[1]:
            # The client asked for the last positions only (a prompt's, whose next token it
            # samples): checked whole above, since a NaN in any input row must be refused.
            y = y[:, -last:]
            frame = to_frame(y, p.wire)
        if p.hops is None:
            return [(to, encode_frames("result", reply_id, {"busy_us": busy_us}, [(p.wire, tuple(y.shape))], [frame]))]
        hop = p.msg.get("hop") or 0
        trail = p.msg.get("trail") is not False
        specs = [*(p.msg.specs if hop and trail else []), (p.wire, tuple(y.shape))]
        tensors = [*(p.msg.frames if hop and trail else []), frame]
        busy = [*(p.msg.get("busy") or [])[:hop], busy_us]  # every hop's busy_us
        if not p.hops:  # the last hop
            return [(to, encode_frames("result", reply_id, {"busy_us": busy_us, "busy": busy}, specs, tensors))]
        (contact, session), rest = p.hops[0], p.hops[1:]
        relay = Relay(contact, to, reply_id, next_hop_id(), p.session.id)
        self.stats.relayed += 1
        fields = {"session": session, "pos": p.msg.fields["pos"], "wire": p.wire, "reply": reply_id,
                  "next": [list(h) for h in rest], "hop": hop + 1, "busy": busy, "from": p.session.id}
        if not trail:
            fields["trail"] = False
        if last is not None:
            fields["last"] = last
        return [(relay, encode_frames("step", relay.hop_id, fields, specs, tensors))]

    def _compute(self, group: list[PendingStep]) -> list[torch.Tensor]:
        """The outputs of a group (`_batch_key`): one forward pass for all its steps."""
        first = group[0]
        phase = first.msg.get("phase")
        caches = [p.session.cache for p in group]
        self.stats.max_batch = max(self.stats.max_batch, len(group))
        self.stats.batched_steps += len(group) > 1
        with inference():
            x = torch.cat([p.x for p in group]) if len(group) > 1 else first.x
            tokens = len(group) * x.shape[1]
            if phase is None:
                for p in group:  # a rewinding step drops what the session held from its position on
                    p.rewound = p.session.cache.length > p.length
                    p.session.cache.length = p.length
                y = self._timed(lambda: self.blocks(x, caches, first.session.start, first.session.stop), tokens)
            elif phase == "mlp":  # stateless: any sessions' partials of one block together
                y = self._timed(lambda: self.blocks.h[str(first.msg.fields["block"])].mlp_partial(x), tokens)
            else:
                block = first.msg.fields["block"]
                for p in group:  # a rewinding step (its first block's) starts the position anew
                    p.rewound = (p.session.cache.length, p.session.next_block) != (p.length, p.next_block)
                    p.session.cache.length, p.session.next_block = p.length, p.next_block
                y = self._timed(lambda: self.blocks.h[str(block)].attn_partial(x, caches, block - first.session.start),
                                tokens)
                for p in group:
                    _stored_block(p.session, p.x.shape[1])
            return list(y.split(1)) if len(group) > 1 else [y]

    def _timed(self, fn: Callable[[], torch.Tensor], tokens: int) -> torch.Tensor:
        t0 = time.perf_counter()
        y = fn()
        if not self._cpu:
            # Replies leave from host memory: one copy for the whole batch (not one a session),
            # and it waits for the kernels, so the busy time is the time to finish.
            y = y.cpu()
        self._batch_computed = True
        self._last_busy = time.perf_counter() - t0
        self.stats.busy_seconds += self._last_busy
        self.stats.steps += 1
        self.stats.tokens += tokens
        return y

    def measure_throughput(self, seconds: float = 0.3) -> float:
        """Tokens/s of one-token steps through all served blocks (advertised to clients)."""
        cache = self.blocks.new_cache(64 + WARM_UP)
        x = torch.zeros(1, 1, self.config.n_embd, device=self.device, dtype=self.dtype)

        def one_token() -> None:
            if self.head_shard:
                for i in range(self.blocks.start, self.blocks.stop):
                    layer = self.blocks.h[str(i)]
                    layer.attn_partial(x, [cache], i - self.blocks.start)
                    layer.mlp_partial(x)
                cache.length += 1
            else:
                self.blocks(x, [cache])
            if self.device.type == "cuda":  # kernels run asynchronously: time them finished
                torch.cuda.synchronize(self.device)

        with torch.inference_mode():
            for _ in range(WARM_UP):  # first use: allocator, kernel loading, cuBLAS set-up
                one_token()
            fastest, n, t0 = float("inf"), 0, time.perf_counter()
            while n < 64 and (n < 3 or time.perf_counter() - t0 < seconds):
                t = time.perf_counter()
                one_token()
                fastest = min(fastest, time.perf_counter() - t)
                n += 1
        # The fastest token, not the mean: nodes that start together (or next to a busy one) share
        # the cores while they measure, and a mean then said 119-354 tokens/s of nodes that make
        # ~500 alone, which kept auto-placed nodes piled on the same blocks (a churn review).
        self.stats.throughput = 1.0 / max(fastest, 1e-9)
        return self.stats.throughput
