"""Generations asked for from any thread, at any time, run in step (SwarmModel.batcher).

What `generate_batch` does for a list of prompts known at the start, a `Batcher` does for
requests that come and go: an application serving many users (a chat server, a queue worker)
gives each its own `Batcher.stream`, from its own thread, and the generations running at the
same moment meet at the head (client/batch.py HeadBatch) so that their decode steps reach the
nodes together and share a forward pass, as a batch's do.

A request is served by one of up to `at_once` worker threads, each with links of its own (a
`Swarm.sibling`, kept from one request to the next) and its own session per request (failover,
relay and spot checks as a lone generation's). The caller's thread only reads what its worker
sends back, so a caller that is slow to read (a slow network client) holds up no one but itself
for as long as its pieces queue. Requests beyond `at_once` wait their turn. A request's error is
that request's alone: the others go on. A worker left idle for `idle_seconds` ends, closing its
links (a batcher kept for a server's lifetime holds no threads or sockets through a quiet spell);
the next request starts another.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .batch import (
    RECENT_END_SECONDS,
    RETRY_PAUSE_SECONDS,
    WAKE_SECONDS,
    BatchStopped,
    Cancelled,
    HeadBatch,
    Worker,
    join_all,
    stop_and_wait,
    take_read_in,
)
from .generate import SamplingParams
from .route import RouteError

if TYPE_CHECKING:
    from .api import GenerationResult, SwarmModel
    from .swarm import Swarm

log = logging.getLogger(__name__)


_DONE = object()  # a request's last message: its generation ended as it should
IDLE_SECONDS = 60.0  # a worker waiting this long for a request ends (its links closed)


@dataclass
class _Request:
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams | None
    result: GenerationResult
    keep_logits: bool
    seq: int  # its place in line (requests given back go back to theirs)
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # text, then _DONE or an error
    cancelled: bool = False  # its caller stopped reading: its worker ends it before its next logits
    held: bool = False  # given back for want of a route: taken when a request's end frees a place
    paused: bool = False  # tried again a moment after an end, since it was last given a place (_give_back)
    not_before: float = 0.0  # not taken before this (time.monotonic): such a pause


class Batcher:
    """Generations from any number of threads, up to `at_once` of them at a time, in step.

        with model.batcher(at_once=8) as batcher:
            # in each user's thread:
            for piece in batcher.stream(prompt, max_new_tokens=100):
                send(piece)
    """

    def __init__(self, model: SwarmModel, at_once: int = 16, idle_seconds: float = IDLE_SECONDS):
        if type(at_once) is not int or at_once < 1:
            raise ValueError(f"at_once must be a whole number >= 1, got {at_once!r}")
        if type(idle_seconds) not in (int, float) or not idle_seconds > 0:  # (NaN too)
            raise ValueError(f"idle_seconds must be a number > 0, got {idle_seconds!r}")
        self.model, self.at_once, self.idle_seconds = model, at_once, float(idle_seconds)
        self.batch = HeadBatch(model.client)
        self._cond = threading.Condition()  # the requests, the workers' counts and `closed`
        self._waiting: deque[_Request] = deque()
        self._workers: list[Worker] = []  # every worker started and not seen ended: `close` waits for them
        self._live = 0  # workers taking requests (not ended, nor ending for want of work)
        self._ids = itertools.count()  # a worker's member id in the batch: never one of a live worker's
        self._seq = itertools.count()  # requests in the order they came
        self._idle = 0  # workers waiting for a request
        self._serving = 0  # requests being run
        self._places = 0  # places on the nodes freed by ends and not yet given to a held request
        self._last_end = -math.inf  # when the last request that had sessions open ended (time.monotonic)
        self.closed = False

    def stream(self, prompt: str, max_new_tokens: int = 50, sampling: SamplingParams | None = None,
               result: GenerationResult | None = None, keep_logits: bool = False) -> Iterator[str]:
        """Yields text pieces as tokens arrive, as `SwarmModel.stream` does; fills `result` if given.
        Any thread may call it; closing the iterator early ends the generation (its session closed
        after its step under way). Raises the generation's own error; RuntimeError if the batcher
        or its model is closed before it ends."""
        from .api import GenerationResult, check_types, prompt_ids

        check_types(prompt, sampling)
        self.model._new_tokens(prompt_ids(prompt), max_new_tokens, warn=False)  # refused here, not in a worker
        request = _Request(prompt, max_new_tokens, sampling,
                           result if result is not None else GenerationResult(prompt), keep_logits, next(self._seq))
        try:
            self._submit(request)  # in the try: a Ctrl-C in it or just after cancels it (review177)
            while True:
                try:
                    item = request.pieces.get(timeout=WAKE_SECONDS)  # in slices: Ctrl-C's handler runs
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True  # (after _DONE or an error: nothing left to end)

    def generate(self, prompt: str, max_new_tokens: int = 50, sampling: SamplingParams | None = None,
                 keep_logits: bool = False) -> GenerationResult:
        """`stream` to its end: the GenerationResult."""
        from .api import stream_to_end

        return stream_to_end(self.stream, prompt, max_new_tokens, sampling, keep_logits)

    def _submit(self, request: _Request) -> None:
        with self._cond:
            if self.closed or self.model.closed:
                raise RuntimeError("this batcher is closed" if self.closed else "this SwarmModel is closed")
            self._waiting.append(request)
            if len(self._waiting) > self._idle and self._live < self.at_once:
                w = next(self._ids)
                worker = Worker(lambda: self._work(w), f"nanoswarm-batcher-{w}")
                self._workers = [x for x in self._workers if not x.ended.is_set()]
                try:
                    worker.start()  # (a Ctrl-C comes after the thread began, or before: Worker.start)
                finally:  # counted here, under the lock, only if it runs: a thread that could not
                    if worker.started:  # start holds no place (review177), and `close` waits for
                        self._workers.append(worker)  # every one that did (review179)
                        self._live += 1
                        self._idle += 1
            self._cond.notify()

    def _take(self) -> _Request | None:
        """The next request, waited for; None once the batcher is closed, or after `idle_seconds`
        with none waiting (the worker then ends: no longer counted). Called idle. A request given
        back for want of a route (held) waits for a place that another request's end freed, one
        held request an end (all of them retried at each end: 48 requests on nodes of 2 sessions
        made 899 refused opens and 160 table reads), or until none runs."""
        idle_until = time.monotonic() + self.idle_seconds
        with self._cond:
            while True:
                now = time.monotonic()
                request = next((r for r in self._waiting if not r.cancelled and r.not_before <= now and (
                    not r.held or self._places > 0 or self._serving == 0)), None)
                for r in [r for r in self._waiting if r.cancelled]:  # their callers have gone
                    self._waiting.remove(r)
                if not any(r.held for r in self._waiting):
                    self._places = 0  # (a place freed with none held was there for anyone to take)
                if request is not None:
                    if request.held:
                        request.held, request.paused = False, False
                        self._places = max(0, self._places - 1)
                    self._waiting.remove(request)
                    self._idle -= 1
                    self._serving += 1
                    return request
                if self.closed or self.model.closed:
                    self._idle -= 1
                    return None
                if now >= idle_until and not self._waiting:  # (not while one is held back: it would
                    self._idle -= 1  # wait on with no worker left to take it)
                    self._live -= 1
                    return None
                self._cond.wait(WAKE_SECONDS)  # (a model closed without this batcher's lock)

    def _work(self, w: int) -> None:
        model = self.model
        try:
            with model._lock:
                if model.closed:
                    raise RuntimeError("this SwarmModel is closed")
                if model.swarm is not None:
                    # A program that only runs batches opens no session on the model's table, so
                    # nothing read it again, and a worker started after a quiet spell planned over
                    # the peers of the connect: a read older than TABLE_SECONDS starts now in the
                    # background (nothing waits: review181) and is taken in at the next start.
                    model.swarm.refresh_stale()
                sibling = model._sibling(model.swarm.sibling() if model.swarm is not None else None)
        except BaseException as e:  # noqa: BLE001 - the requests waiting hear of it if no worker is left
            log.warning("a batcher's worker could not start: %s", e)
            with self._cond:
                self._idle -= 1
                self._live -= 1
                failed, self._waiting = ((self._waiting, deque()) if not self._live
                                         else ((), self._waiting))  # (at once: review178)
            for request in failed:  # no worker left to take them
                request.pieces.put(e)
            return
        member = sibling.client = self.batch.member(w)
        try:
            while (request := self._take()) is not None:
                try:
                    member.cancelled = lambda r=request: r.cancelled
                    self._share_learned(sibling.swarm, model.swarm)  # what the model or other workers learned meanwhile
                    try:
                        self._serve(sibling, request)  # (its member joins the batch at its first logits)
                    finally:
                        member.leave()
                        self._share_learned(model.swarm, sibling.swarm)
                        take_read_in(model)  # (see generate_in_step's end)
                except Exception as e:  # noqa: BLE001 - a fault of ours around the generation
                    # (_serve sends the generation's own errors): its caller hears of it (it waited
                    # for good: review180's run), and the worker goes on
                    log.warning("batcher: a request failed outside its generation: %r", e)
                    request.pieces.put(e)
                finally:
                    with self._cond:
                        self._idle += 1
                        self._serving -= 1
                        if request.result.route:  # its sessions were open: their places are free now
                            self._places += any(r.held for r in self._waiting)
                            self._last_end = time.monotonic()
                        self._cond.notify_all()
        finally:
            if sibling.swarm is not None:
                sibling.swarm.close()  # here: its sockets are this thread's

    def _share_learned(self, to: Swarm | None, source: Swarm | None) -> None:
        if to is not None and source is not None:
            with self.model._lock:
                to.take_learned(source)

    def _serve(self, sibling: SwarmModel, request: _Request) -> None:
        """Run one request's generation, sending its pieces to its caller."""
        stream = sibling.stream(request.prompt, request.max_new_tokens, request.sampling, request.result,
                                request.keep_logits)
        try:
            for piece in stream:
                if self.model.closed:
                    raise RuntimeError("this SwarmModel was closed during the generation")
                request.pieces.put(piece)
            request.pieces.put(_DONE)
        except Cancelled:  # its caller has gone: its session is closed below
            pass
        except BatchStopped:
            request.pieces.put(RuntimeError("this SwarmModel was closed during the generation" if self.model.closed
                                            else "the batcher was closed during the generation"))
        except RouteError as e:
            if not self._give_back(request):
                request.pieces.put(e)
        except BaseException as e:  # noqa: BLE001 - the caller's to raise
            request.pieces.put(e)
        finally:
            stream.close()  # its session closed now, on this thread

    def _give_back(self, request: _Request) -> bool:
        """A request that found no route before its first step, while others run (their sessions
        may be what fills the nodes: `--max-sessions`), is held: it waits for one of them to end
        and is tried again, in its place in line (review177). Refused within RECENT_END_SECONDS of
        a request's end, it is first tried once more a moment later, once since it last waited
        for a place: that end's `close` is sent without waiting and may reach a node after this
        request's `open` (review181: a request refused so while others ran waited for the next
        end, 3 s, with a place free). Alone otherwise, it fails."""
        with self._cond:
            if request.result.route or self.closed:
                return False  # (else its result holds its prompt alone: nothing to undo)
            now, alone = time.monotonic(), self._serving <= 1
            if now - self._last_end < RECENT_END_SECONDS and not request.paused:
                request.paused, request.not_before = True, now + RETRY_PAUSE_SECONDS
            elif not alone:
                request.held = True
            else:
                return False
            # back to its place in line: the one given back first is taken first
            self._waiting.insert(next((i for i, r in enumerate(self._waiting) if r.seq > request.seq),
                                      len(self._waiting)), request)
        log.info("batcher: no route for one more generation at once; it waits for a place")
        return True

    def close_requests(self, error: BaseException) -> None:
        """Fail every request still waiting for a worker with `error`."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            request.pieces.put(error)

    def close(self) -> None:
        """Stop: requests waiting for a worker fail, the ones running end after their step under way
        (their callers get RuntimeError), and every worker is waited for (a Ctrl-C meanwhile only
        waits on, then is raised). Idempotent."""
        try:
            self.stop()  # (in the try: a Ctrl-C in it too waits for the workers, review178)
            join_all(list(self._workers))
        except BaseException:
            stop_and_wait(self.batch, list(self._workers))
            raise

    def stop(self) -> None:
        """`close` without waiting for the workers (SwarmModel.close calls it)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self.close_requests(RuntimeError("the batcher was closed before the generation started"))
        self.batch.stop()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
