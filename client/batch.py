"""Several generations run at once, one thread each, in step (SwarmModel.generate_batch).

Each generation keeps everything a lone one has (its own session, failover, spot checks, and
links: a thread's own `Swarm.sibling`, since ZeroMQ sockets are one thread's at a time); what
they share is the head. A generation's thread asks for its next logits and waits until every
generation still running has asked too; the last to ask runs ln_f + lm_head once for all of them.
So the next decode steps of all of them leave together and reach each node together, where they
share a forward pass (node/steps.py batches steps that arrive together), and the head's big
matrix (154 MB for GPT-2 small) is read once a token, not once a generation. A generation joins
the batch at its first logits (its open and prompt hold up no one) and leaves it at its end, and
the rest go on without waiting for it. At most `at_once` run at a
time (threads, links and node sessions stay bounded); a thread that has finished one prompt takes
the next.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .generate import ClientModel, SamplingParams
from .route import RouteError

if TYPE_CHECKING:
    from .api import GenerationResult, SwarmModel

log = logging.getLogger(__name__)


HELD_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}
WAKE_SECONDS = 0.1  # the longest a member waiting for its logits goes without looking whether the batch stopped
# A generation refused a route at its start, alone, this soon after another of the batch ended is
# tried once more after a pause: the ended one's `close` is sent without waiting, and its node may
# read the new `open` first (its ROUTER socket takes each connection's messages in turn).
RECENT_END_SECONDS = 2.0
RETRY_PAUSE_SECONDS = 0.2


class BatchStopped(Exception):
    """The batch was stopped (`HeadBatch.stop`) while a generation waited for its logits."""


class Cancelled(Exception):
    """A generation's caller has stopped reading it (HeadMember.cancelled): it ends before its next
    logits."""


class HeadBatch:
    def __init__(self, client: ClientModel):
        self.client = client
        self._cond = threading.Condition()
        self._running = 0  # members that joined and have not left
        self._asked: dict[int, torch.Tensor] = {}  # member -> its last position's hidden state [1, 1, C]
        self._answers: dict[int, torch.Tensor | BaseException] = {}  # a pass's logits row, or its error
        self._failed: BatchStopped | None = None  # set by `stop`: every member waiting raises it
        self.rounds = 0  # head passes run
        self.widest = 0  # the most generations one pass served

    def member(self, k: int, joined: bool = False) -> HeadMember:
        """Member k; `joined`: counted from now (else from its first logits)."""
        member = HeadMember(self, k)
        if joined:
            self.join(k)
            member.joined = True
        return member

    def logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Member k's logits for the last position of `hidden` [1, T, C], once every member still
        running has asked for its own."""
        with self._cond:
            if self._failed is not None:
                raise self._failed
            self._asked[k] = hidden[:, -1:, :]
            self._run_if_all_asked()
            while k not in self._answers:
                if self._failed is not None:
                    raise self._failed
                self._cond.wait(WAKE_SECONDS)  # `stop` may set _failed without the lock
            answer = self._answers.pop(k)
            if isinstance(answer, BaseException):
                raise answer
            return answer

    def join(self, k: int) -> None:
        """Member k asks for its generation's first logits: the others wait for its asks too."""
        with self._cond:
            self._running += 1

    def leave(self, k: int) -> None:
        """Member k has ended (done, failed or stopped): the others no longer wait for it."""
        with self._cond:
            self._running -= 1
            self._asked.pop(k, None)
            self._run_if_all_asked()

    @property
    def stopped(self) -> bool:
        return self._failed is not None

    def stop(self) -> None:
        """Wake every member waiting for its logits with BatchStopped; later asks raise it too.
        Stopped first without the lock (a head pass may hold it for a while, and a second Ctrl-C
        in the wait for it must not leave the batch running: review174); the members waiting
        see it within WAKE_SECONDS, or at once if the lock comes free."""
        if self._failed is None:
            self._failed = BatchStopped("the batch was stopped")
        if self._cond.acquire(timeout=WAKE_SECONDS):
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()

    def _run_if_all_asked(self) -> None:
        # Under the lock: the members that asked wait for this pass anyway.
        if not self._asked or len(self._asked) < self._running or self._failed is not None:
            return
        members = sorted(self._asked)
        hidden = [self._asked.pop(k) for k in members]
        try:
            rows = list(self.client.logits_rows(torch.cat(hidden)))
        except BaseException as e:  # noqa: BLE001 - each member this pass served raises it, and
            # only they: a Batcher's later requests go on (a generate_batch stops)
            log.warning("the head's pass for %d generations failed", len(members), exc_info=e)
            rows = [own_copy(e) for _ in members]
        self._answers.update(zip(members, rows))
        self.rounds += 1
        self.widest = max(self.widest, len(members))
        self._cond.notify_all()


def own_copy(e: BaseException) -> BaseException:
    """`e` for one member of a failed head pass: its type, message and notes (a list of its
    own), no traceback. One object raised in several threads gathers each one's frames in its
    traceback, and one user's error report then showed another's prompt (review180); a note one
    caller adds showed in the others' (review181). A RuntimeError saying what it was where `e`
    will not copy; never raises (a member left without an answer would wait for good)."""
    try:
        copied = copy.copy(e)
        if copied is e or type(copied) is not type(e) or str(copied) != str(e):
            raise TypeError("not a copy")
        if isinstance(getattr(e, "__notes__", None), list):
            copied.__notes__ = list(e.__notes__)
    except Exception:  # noqa: BLE001 - a class whose arguments are not its args, a __str__ that raises...
        try:
            what = f"{type(e).__name__}: {e}"
        except Exception:  # noqa: BLE001
            what = type(e).__name__
        copied = RuntimeError(f"the head's pass failed: {what}")
    copied.__traceback__ = copied.__cause__ = copied.__context__ = None
    return copied


class HeadMember:
    """What a generation of the batch takes for its ClientModel (generate_ids): its own embeddings,
    the batch's head."""

    def __init__(self, batch: HeadBatch, k: int):
        self.batch, self.k = batch, k
        self.device = batch.client.device
        self.cancelled: Callable[[], bool] = lambda: False  # asked before every token's logits
        # Whether the batch counts it (waits for its asks). A member joins at its first logits,
        # not before its open and prompt, and leaves at its generation's end: the others would
        # wait for those, a slow open's seconds included (review181).
        self.joined = False

    def embed(self, ids: list[int], start: int) -> torch.Tensor:
        return self.batch.client.embed(ids, start)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cancelled():  # (a token that makes no text would not reach the caller's check)
            raise Cancelled()
        if not self.joined:
            self.batch.join(self.k)
            self.joined = True
        return self.batch.logits(self.k, hidden)

    def leave(self) -> None:
        """Its generation has ended: the batch no longer waits for it (if it counted it)."""
        if self.joined:
            self.joined = False
            self.batch.leave(self.k)


def generate_in_step(model: SwarmModel, prompts: list[str], results: list[GenerationResult],
                     max_new_tokens: int, sampling: SamplingParams | None, keep_logits: bool,
                     at_once: int, on_done: Callable[[int, GenerationResult], None] | None = None,
                     on_wait: Callable[[], None] | None = None) -> None:
    """Fill `results` (one a prompt) by generating the prompts in step, `at_once` at a time, on
    `model`'s swarm (its peers, bans and spot checker; the bans its threads made are the
    model's afterwards). Raises the first generation's error once all have stopped.

    A generation that finds no route at its start while others of the batch run (their sessions
    may be what fills the nodes: `--max-sessions`, `busy`) gives its prompt back and its thread
    ends: the batch goes on narrower. The last thread left raises it."""
    from .api import GenerationResult

    with model._lock:
        if model.closed:
            raise RuntimeError("this SwarmModel is closed")
        model.swarm.refresh_stale()  # (the siblings start from its table: see Batcher._work)
        siblings = [model._sibling(model.swarm.sibling()) for _ in range(min(at_once, len(prompts)))]
    batch = HeadBatch(model.client)  # each member counted from its first logits to its prompt's end
    queue = deque(range(len(prompts)))
    state = threading.Lock()  # the queue, the count of threads still taking prompts, the last end
    taking, last_end, retried = [len(siblings)], [-math.inf], set()
    errors: list[BaseException] = []

    def next_prompt() -> int | None:
        with state:  # an empty queue and this thread's leaving, at once (a prompt given back meanwhile is taken)
            if queue and not batch.stopped:
                return queue.popleft()
            taking[0] -= 1
            return None

    def give_back(k: int, e: RouteError) -> bool:
        """Prompt k found no route at its start: back to the queue, and this thread takes no more
        (False), unless it is the last one taking prompts: then, once, it takes it again after a
        pause if another generation ended just before (True), else the error is the batch's."""
        with state:
            alone = taking[0] == 1
            if results[k].route or alone and (k in retried or time.monotonic() - last_end[0] >= RECENT_END_SECONDS):
                raise e
            results[k] = GenerationResult(prompts[k])
            queue.appendleft(k)
            if alone:
                retried.add(k)
                return True
            taking[0] -= 1
        log.info("batch: no route for one more generation at once; going on with %d", taking[0])
        return False

    def run(w: int) -> None:
        sibling = siblings[w]
        member = sibling.client = batch.member(w)
        taken = False  # whether this thread has left `taking`
        try:
            while (k := next_prompt()) is not None:
                stream = sibling.stream(prompts[k], max_new_tokens, sampling, results[k], keep_logits)
                try:
                    for _ in stream:
                        if model.closed:
                            raise RuntimeError("this SwarmModel was closed during the generation")
                except RouteError as e:
                    if not give_back(k, e):
                        break
                    time.sleep(RETRY_PAUSE_SECONDS)
                    continue
                finally:
                    stream.close()  # its session closed now, on this thread
                    member.leave()  # (the others do not wait for its next open and prompt)
                    if results[k].route:
                        with state:
                            last_end[0] = time.monotonic()
                if on_done is not None:
                    on_done(k, results[k])
            taken = True
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)
            batch.stop()  # the others end too: the batch fails as a whole
        finally:
            if not taken:
                with state:
                    taking[0] -= 1
            member.leave()
            sibling.swarm.close()  # here: its sockets are this thread's

    workers = [Worker(lambda w=w: run(w), f"nanoswarm-batch-{w}") for w in range(len(siblings))]
    try:
        for worker in workers:
            worker.start()
        join_all(workers, on_wait)
        if on_wait is not None:  # once more: the last generations may end within one wait's slice,
            on_wait()  # and before an error is raised (review182: results done before it unshown)
    except BaseException:  # Ctrl-C, on_wait's error: every generation stops after its step under way
        stop_and_wait(batch, workers)
        raise
    finally:
        with model._lock:  # what the generations learned of peers, for the next ones
            for sibling, worker in zip(siblings, workers):
                if not worker.running:
                    model.swarm.take_learned(sibling.swarm)
    take_read_in(model)
    failed = next((e for e in errors if not isinstance(e, BatchStopped)), None)
    if failed is not None:
        raise failed


def take_read_in(model: SwarmModel) -> None:
    """The model's read begun at a batch's start (or a new worker's), taken in at its end (a
    request's) if done, while its answers (whether peers that went answer) are fresh: taken in at
    the next start, a minute or more on, they said too little to drop anyone (refresh_stale), so a
    program that only ran batches kept a peer that left for good (its threads dropped it, but
    their tables go: review187). A batch shorter than the read (a second where a peer that went is
    asked) leaves it to the next start, as before. Its failure is logged, not the batch's."""
    with model._lock:
        if model.closed or model.swarm is None:
            return
        try:
            model.swarm.take_read_in()
        except Exception as e:  # noqa: BLE001 - the batch's generations are done (review188)
            log.warning("taking in the peer table's background read: %r", e)


class Worker:
    """A batch's thread, and an event it sets as it ends. Waited for on that event: a
    `Thread.join` that Ctrl-C cuts marks a thread still running as ended (CPython 3.11's
    `_wait_for_tstate_lock`), and `is_alive` then says False (review177: `close` returned while a
    worker was still in ZeroMQ for 6 s)."""

    def __init__(self, target: Callable[[], None], name: str):
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            self.ended.set()

    def start(self) -> None:
        """Start the thread, with Ctrl-C (SIGINT, SIGTERM, SIGHUP) held back meanwhile: one that
        lands inside `Thread.start` may come before or after the thread began, and nothing tells
        which (review178); held back, each one's handler runs just after, and the first exception
        one raises is raised (over one `Thread.start` raised). Only the main thread runs signal
        handlers, so only there is anything held back. Each handler is put back even when another
        signal's own handler runs and raises meanwhile (review179: one was left recording for good)."""
        if threading.current_thread() is not threading.main_thread():
            self.thread.start()
            return
        came: list[int] = []
        swapped: dict[int, object] = {}
        caught: BaseException | None = None
        try:
            for s in HELD_SIGNALS:
                handler = signal.getsignal(s)
                if handler is not None:  # (None: set from C, not Python's to swap)
                    signal.signal(s, lambda signum, frame: came.append(signum))  # (checks for pending
                    swapped[s] = handler  # signals, whose handlers may raise, before it swaps)
            self.thread.start()
        finally:
            for s, handler in swapped.items():
                while signal.getsignal(s) is not handler:  # (a handler may raise just after the swap too)
                    try:
                        signal.signal(s, handler)
                    except BaseException as e:  # noqa: BLE001 - a signal's handler ran: raised below
                        caught = caught or e
            for s in came:
                try:
                    signal.raise_signal(s)
                except BaseException as e:  # noqa: BLE001 - raised below, the first
                    caught = caught or e
            if caught is not None:
                raise caught

    @property
    def started(self) -> bool:
        return self.thread.ident is not None

    @property
    def running(self) -> bool:
        return self.started and not self.ended.is_set()


def join_all(workers: list[Worker], on_wait: Callable[[], None] | None = None) -> None:
    """Wait for every worker of `workers` that started, calling `on_wait()` between slices."""
    for worker in workers:
        if worker.started:
            while not worker.ended.wait(WAKE_SECONDS):  # in slices: a signal's handler runs between them
                if on_wait is not None:
                    on_wait()


def stop_and_wait(batch: HeadBatch, workers: list[Worker]) -> None:
    """Stop the batch and wait for every worker of it: each ends after its step under way. Further
    Ctrl-Cs meanwhile only wait on (review174: a second one left the batch running behind the
    raised KeyboardInterrupt, holding its sessions, and a program that then exited could abort
    with threads still in ZeroMQ)."""
    told = False
    while True:
        try:
            batch.stop()
            join_all(workers)
            return
        except KeyboardInterrupt:
            try:  # (one more Ctrl-C in here, a write to a full stderr cut say, only waits on too)
                if not told:
                    told = True
                    log.warning("stopping: waiting for the batch's steps under way (at most the step timeout)")
            except KeyboardInterrupt:
                pass
