"""SwarmModel.batcher: generations asked for from several threads at different times, through
real node processes, each as it is alone, the ones running together in step."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from conftest import SwarmWithALiar, sessions_on
from test_generate_batch import SEEDED, open_descriptors, sessions_left

from nanoswarm.client.api import GenerationResult, SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.route import RouteError
from nanoswarm.client.swarm import SwarmOptions
from nanoswarm.node.cluster import NodeSpec

PROMPTS = ["ROMEO:", "Once upon a time there was", "", "JULIET: O Romeo, Romeo! wherefore art thou",
           "First Citizen:", "The quality of mercy"]
GREEDY = SamplingParams(temperature=0)


def no_workers() -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(t.name.startswith("nanoswarm-batcher-") and t.is_alive() for t in threading.enumerate()):
            return True
        time.sleep(0.05)
    return False


def in_threads(work, n: int) -> list:
    """work(i) in n threads at once; their results (or errors) in order."""
    out: list = [None] * n

    def run(i: int) -> None:
        try:
            out[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return out


def test_requests_from_threads_at_different_times_get_what_they_get_alone(tiny_model_dir, cluster_factory):
    """Six requests from six threads, started a few tokens apart, through a batcher of four
    workers: ids, text, stop reason and logits (within 1e-5) as each gets alone, seeded sampling
    included; the ones running at once shared head passes (so their steps left together), never
    more than four; the pieces streamed make the text; no worker, link or node session is left."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        alone = [model.generate(p, 16, SEEDED, keep_logits=True) for p in PROMPTS]
        descriptors = open_descriptors()
        with model.batcher(at_once=4) as batcher:
            def ask(i: int) -> tuple[GenerationResult, str]:
                time.sleep(0.02 * i)  # arriving while the others run
                result = GenerationResult()
                text = "".join(batcher.stream(PROMPTS[i], 16, SEEDED, result, keep_logits=True))
                return result, text
            together = in_threads(ask, len(PROMPTS))
            assert 2 <= batcher.batch.widest <= 4 and len(batcher._workers) <= 4
        assert no_workers() and open_descriptors() <= descriptors + 2
        assert sessions_left(swarm) == 0
        for a, (b, text) in zip(alone, together):
            assert (b.prompt, b.ids, b.text, b.stop_reason) == (a.prompt, a.ids, a.text, a.stop_reason)
            assert text == b.text and b.route and b.failovers == 0
            assert max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits)) < 1e-5
        # The model goes on as before, and a closed batcher takes no more.
        assert model.generate(PROMPTS[0], 16, SEEDED).ids == alone[0].ids
        with pytest.raises(RuntimeError, match="batcher is closed"):
            batcher.generate(PROMPTS[0], 4)


def test_a_caller_that_stops_reading_ends_its_generation_alone(tiny_model_dir, cluster_factory):
    """A caller closing its stream after two pieces ends that generation (its node sessions
    closed), the others run on to their ends; a bad request is refused in its caller's thread."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        alone = model.generate(PROMPTS[1], 24, GREEDY)
        with model.batcher(at_once=3) as batcher:
            with pytest.raises(ValueError, match="max_new_tokens"):
                next(batcher.stream(PROMPTS[0], -1))
            with pytest.raises(TypeError, match="text"):
                batcher.generate(b"bytes", 4)

            def ask(i: int):
                if i == 0:
                    stream = batcher.stream(PROMPTS[0], 200, GREEDY, cut_result)
                    pieces = [next(stream), next(stream)]
                    stream.close()
                    return pieces
                return batcher.generate(PROMPTS[1], 24, GREEDY)
            cut_result = GenerationResult()
            cut, *others = in_threads(ask, 3)
            assert len(cut) == 2 and all(r.ids == alone.ids for r in others)
            assert sessions_left(swarm) == 0
        assert no_workers()
        # ended soon after (its worker does not wait for its reader, who may be slow to run on a
        # loaded machine), not at its end
        assert len(cut_result.ids) < 60 and cut_result.stop_reason == ""


def test_a_node_killed_under_a_batcher_is_failed_over_for_every_request(tiny_model_dir, cluster_factory):
    """A node SIGKILLed while three requests run: each fails over and gets its tokens as alone;
    the ban is the model's afterwards."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses,
                            options=SwarmOptions(timeout=5.0, ban_seconds=60)) as model:
        alone = [model.generate(p, 24, GREEDY) for p in PROMPTS[:3]]
        with model.batcher() as batcher:
            results = [GenerationResult() for _ in range(3)]
            streams = [batcher.stream(p, 24, GREEDY, r) for p, r in zip(PROMPTS[:3], results)]
            firsts = [next(s) for s in streams]
            used = max(swarm.addresses[1:], key=sessions_on)
            swarm.kill(swarm.addresses.index(used), signal.SIGKILL)
            texts = [first + "".join(s) for first, s in zip(firsts, streams)]
        for a, b, text in zip(alone, results, texts):
            assert b.ids == a.ids and text == a.text
        assert sum(r.failovers for r in results) >= 1 and used in model.swarm.bans


def test_closing_the_model_ends_its_batchers_requests(tiny_model_dir, cluster_factory):
    """`close` of the model while two requests run and two more wait for a worker: each caller
    gets RuntimeError (none hangs), every worker ends and the nodes hold no session."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4), args=[
        "--dishonest", "--slow", "0.02"])], cluster=SwarmWithALiar)  # 128 tokens take seconds
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    batcher = model.batcher(at_once=2)
    running = threading.Barrier(5)

    def ask(i: int):
        if i >= 2:  # waiting: both workers are busy
            running.wait()
            return batcher.generate(PROMPTS[i], 4, GREEDY)
        stream = batcher.stream(PROMPTS[i], 1000, GREEDY)
        next(stream)
        running.wait()
        return "".join(stream)

    def close() -> None:
        running.wait()
        time.sleep(0.5)
        model.close()
    closer = threading.Thread(target=close)
    closer.start()
    outcomes = in_threads(ask, 4)
    closer.join()
    assert all(isinstance(e, RuntimeError) and "closed" in str(e) for e in outcomes), outcomes
    assert "before the generation started" in str(outcomes[2]) + str(outcomes[3])
    assert no_workers() and sessions_left(swarm) == 0


def test_a_local_model_serves_a_batcher_too(tiny_model_dir):
    """A model run in this process (the reference) takes the same API: each request as alone."""
    model = SwarmModel.local(tiny_model_dir)
    alone = [model.generate(p, 12, SEEDED) for p in PROMPTS[:3]]
    with model.batcher() as batcher:
        together = in_threads(lambda i: batcher.generate(PROMPTS[i], 12, SEEDED), 3)
    assert [r.ids for r in together] == [a.ids for a in alone]
    assert no_workers()


# Review204 (sixty-ninth session): a mutation no test caught before.
def test_a_worker_that_cannot_start_fails_the_requests_waiting(tiny_model_dir, monkeypatch):
    """A request's worker that cannot start (its links, say) and leaves no worker alive hands its
    error to the requests waiting, which would otherwise wait for good."""
    model = SwarmModel.local(tiny_model_dir)

    def no_sibling(swarm):
        raise RuntimeError("no sibling today")

    monkeypatch.setattr(model, "_sibling", no_sibling)
    with model.batcher(at_once=2) as batcher:
        raised: list[BaseException] = []

        def ask() -> None:
            try:
                batcher.generate(PROMPTS[0], 4, SEEDED)
            except BaseException as e:  # noqa: BLE001 - what the caller got
                raised.append(e)

        caller = threading.Thread(target=ask, daemon=True)
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), "the request waited for a worker that never started"
        assert [str(e) for e in raised] == ["no sibling today"]
        assert batcher._live == 0 and not batcher._waiting
    assert no_workers()


def test_more_requests_than_the_nodes_hold_wait_for_a_place(tiny_model_dir, cluster_factory, caplog):
    """Review177: nodes that hold 2 sessions each, 12 requests from 12 threads through a batcher
    of 12 workers: a request whose open is refused while others run (the batcher's own sessions
    fill the nodes) waits for one of them to end and is tried again; each gets what it gets alone.
    Each end gives its place to one request waiting, not to all of them (38-49 refused opens where
    10 were needed). Alone, a request that finds no route fails with it."""
    limit = ["--max-sessions", "2"]
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2), args=limit), NodeSpec((2, 4), args=limit)])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        prompts = PROMPTS * 2
        alone = [model.generate(p, 12, SEEDED).ids for p in prompts]
        with model.batcher(at_once=12) as batcher:
            caplog.set_level("INFO", logger="nanoswarm.client.batcher")
            together = in_threads(lambda i: batcher.generate(prompts[i], 12, SEEDED), len(prompts))
            assert [r.ids if isinstance(r, GenerationResult) else r for r in together] == alone
            assert batcher.batch.widest <= 2
            refused = sum("no route for one more" in r.getMessage() for r in caplog.records)
            assert 10 <= refused <= 16, refused  # 10: each request past the first 2 refused once
            held = [model.session(8), model.session(8)]  # the nodes full, no request of the batcher running
            with pytest.raises(RouteError):
                batcher.generate(PROMPTS[0], 4)
            for session in held:
                session.close()
    assert no_workers()


def test_a_ctrl_c_in_close_waits_for_the_workers_then_is_raised(tiny_model_dir, cluster_factory):
    """Review177: Ctrl-C while `close` waits for a worker in a slow step: `close` still waits for
    it to end (a `Thread.join` cut by Ctrl-C marks a running thread ended in CPython 3.11), then
    raises KeyboardInterrupt; nothing is left running."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4), args=[
        "--dishonest", "--slow", "0.6"])], cluster=SwarmWithALiar)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        batcher = model.batcher()
        stream = batcher.stream(PROMPTS[0], 50, GREEDY)
        next(stream)  # running: its next step takes 0.6 s at the slow node
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            batcher.close()
        assert all(worker.ended.is_set() for worker in batcher._workers) and time.monotonic() - t0 > 0.3
        with pytest.raises(RuntimeError, match="closed"):
            "".join(stream)
        batcher = model.batcher()  # and a Ctrl-C in `close`'s stop, before its wait (review178)
        stream = batcher.stream(PROMPTS[0], 50, GREEDY)
        next(stream)
        stop = batcher.batch.stop

        def interrupted_stop() -> None:
            batcher.batch.stop = stop
            raise KeyboardInterrupt
        batcher.batch.stop = interrupted_stop
        with pytest.raises(KeyboardInterrupt):
            batcher.close()
        assert all(worker.ended.is_set() for worker in batcher._workers)
    assert no_workers() and sessions_left(swarm) == 0


def test_a_request_cut_while_it_is_submitted_is_never_run(tiny_model_dir, cluster_factory, monkeypatch):
    """Review177: Ctrl-C landing while a request is handed to a new worker cancels it (it was
    left to run with no reader), and the worker, begun (Worker.start holds the signal back until
    then), is counted and waited for (review178, review179); a worker that cannot start holds no
    place, and the next request is served (it hung), also when a Ctrl-C lands in that failed
    start."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        start = threading.Thread.start
        cuts = iter(["interrupt", "fail", "interrupt and fail"])

        def cut_start(thread) -> None:
            cut = next(cuts, "") if thread.name.startswith("nanoswarm-batcher-") else ""
            if "interrupt" in cut:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # (the signal's handler would run here)
            if "fail" in cut:
                raise RuntimeError("can't start new thread")
            start(thread)
        monkeypatch.setattr(threading.Thread, "start", cut_start)
        held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        handlers = [signal.getsignal(s) for s in held]
        with model.batcher(at_once=1) as batcher:
            cut = GenerationResult()
            with pytest.raises(KeyboardInterrupt):
                next(batcher.stream(PROMPTS[0], 30, GREEDY, cut))
            assert len(batcher._workers) == 1 and batcher._workers[0].started  # counted at once
            time.sleep(0.5)
            assert cut.ids == [] and batcher._idle == 1
        with model.batcher(at_once=1) as batcher:
            with pytest.raises(RuntimeError, match="can't start"):
                batcher.generate(PROMPTS[1], 4)
            with pytest.raises(KeyboardInterrupt):
                batcher.generate(PROMPTS[1], 4)
            assert batcher._workers == [] and [signal.getsignal(s) for s in held] == handlers
            assert batcher.generate(PROMPTS[1], 4, GREEDY).ids == model.generate(PROMPTS[1], 4, GREEDY).ids
    assert no_workers() and sessions_left(swarm) == 0


@pytest.mark.parametrize("way", ["batcher", "generate_batch"])
def test_a_request_refused_just_after_another_ended_is_tried_again(tiny_model_dir, cluster_factory, way):
    """A node of one session that does a `close` 0.1 s late (its ROUTER may read the next
    `open`, from another link, first): the request after the one that ended, alone, is refused
    a route once, and tried again after a pause instead of failing."""
    late = ["--dishonest", "--late-close", "0.1", "--max-sessions", "1"]
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=late)], cluster=SwarmWithALiar)
    local = SwarmModel.local(tiny_model_dir)  # (on the node, one generation after another would meet it too)
    alone = [local.generate(p, 6, GREEDY).ids for p in PROMPTS[:2]]
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        if way == "batcher":
            with model.batcher(at_once=2) as batcher:
                together = in_threads(lambda i: batcher.generate(PROMPTS[i], 6, GREEDY), 2)
        else:
            together = model.generate_batch(PROMPTS[:2], 6, GREEDY, at_once=2)
        assert [r.ids if isinstance(r, GenerationResult) else r for r in together] == alone


class FailingHead:
    """Wraps a model's head: its `fail_at`-th pass (counted from 1), or its first pass of
    `fail_width` rows, raises, as a GPU's error would; `failed` is that pass's number."""

    def __init__(self, model: SwarmModel, fail_at: int | None = None, fail_width: int | None = None):
        self.rows, self.passes, self.fail_at, self.fail_width = model.client.logits_rows, 0, fail_at, fail_width
        self.widths: list[int] = []
        self.failed = 0
        model.client.logits_rows = self

    def __call__(self, rows):
        self.passes += 1
        self.widths.append(len(rows))
        if not self.failed and (self.passes == self.fail_at or len(rows) == self.fail_width):
            self.failed = self.passes
            raise RuntimeError("CUDA error: out of memory (a test's)")
        return self.rows(rows)


def test_a_failed_head_pass_fails_the_requests_it_served_alone(tiny_model_dir, cluster_factory):
    """The head's error (a GPU's) in a pass serving two requests: both callers get it, their
    sessions closed; the batcher goes on, and the next requests get what they get alone (it
    failed every later request of that batcher). generate_batch still fails as a whole, with the
    head's error, no session left."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        alone = [model.generate(p, 12, GREEDY).ids for p in PROMPTS[:2]]
        with model.batcher(at_once=2) as batcher:
            together = threading.Barrier(2)

            def ask(i: int):
                together.wait(30)  # asked at once
                return "".join(batcher.stream(PROMPTS[i], 12, GREEDY))
            # The first pass that serves both fails. (Its fourth pass did, with each caller waiting
            # for the other after its first piece: a worker runs ahead of a caller that waits, so on
            # a loaded machine the first request could take three passes alone, and the other's
            # first piece was the failing pass's: it raised before the wait, and the first caller
            # waited for good.)
            head = FailingHead(model, fail_width=2)
            failed = in_threads(ask, 2)
            assert all(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in failed), failed
            assert failed[0] is not failed[1]  # (one object raised in both threads held both's frames)
            assert head.failed and head.widths[head.failed - 1] == 2 and sessions_left(swarm) == 0
            later = in_threads(lambda i: batcher.generate(PROMPTS[i], 12, GREEDY), 2)
            assert [getattr(r, "ids", r) for r in later] == alone
        FailingHead(model, fail_at=3)
        with pytest.raises(RuntimeError, match="out of memory"):
            model.generate_batch(PROMPTS[:3], 12, GREEDY, at_once=3)
        assert sessions_left(swarm) == 0
    assert no_workers()


def test_each_member_of_a_failed_pass_gets_an_error_of_its_own():
    """Review180/181: its type and message, a list of notes of its own, no traceback; a
    RuntimeError saying what it was where the error will not copy, or says nothing when asked."""
    from nanoswarm.client.batch import own_copy

    class TwoArguments(Exception):
        def __init__(self, a: str, b: str):
            super().__init__(a + b)

    class Unsayable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    class Itself(Exception):
        def __copy__(self):
            return self
    error = torch.OutOfMemoryError("CUDA out of memory")
    try:
        raise error
    except torch.OutOfMemoryError:
        error.add_note("user 1's prompt")
        copied = own_copy(error)
    assert type(copied) is torch.OutOfMemoryError and str(copied) == "CUDA out of memory"
    assert error.__traceback__ is not None and copied.__traceback__ is None
    assert copied.__notes__ == error.__notes__ and copied.__notes__ is not error.__notes__
    for e, says in [(TwoArguments("a", "b"), "TwoArguments: ab"), (Unsayable(), "Unsayable"),
                    (Itself("x"), "Itself: x")]:
        copied = own_copy(e)
        assert type(copied) is RuntimeError and str(copied) == f"the head's pass failed: {says}"


def test_a_request_that_is_slow_to_open_holds_up_no_one(tiny_model_dir, cluster_factory, monkeypatch):
    """Review181: a request joins the head batch at its first logits, not before its open: one
    whose open takes 1.5 s (a refresh, a dead peer's timeout) held every running request's tokens
    for as long."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4), args=[
        "--dishonest", "--slow", "0.02"])], cluster=SwarmWithALiar)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        alone = model.generate(PROMPTS[1], 8, GREEDY).ids
        session = SwarmModel.session

        def slow_open(self, *args, **kwargs):
            time.sleep(1.5)
            return session(self, *args, **kwargs)
        with model.batcher() as batcher:
            running = batcher.stream(PROMPTS[0], 400, GREEDY)
            next(running)
            monkeypatch.setattr(SwarmModel, "session", slow_open)
            late = []
            threading.Thread(target=lambda: late.append(batcher.generate(PROMPTS[1], 8, GREEDY))).start()
            time.sleep(0.2)  # its worker is in the slow open
            t0, pieces = time.monotonic(), 0
            while time.monotonic() - t0 < 1.0:
                next(running)
                pieces += 1
            running.close()
            deadline = time.monotonic() + 20
            while not late and time.monotonic() < deadline:
                time.sleep(0.05)
        assert pieces >= 10 and late[0].ids == alone, pieces


def test_a_fault_around_a_generation_is_its_callers_and_the_worker_goes_on(tiny_model_dir, cluster_factory,
                                                                            monkeypatch):
    """A fault of the batcher's own around a generation (here the sharing of what workers learned raising once)
    reaches the caller, who waited for good, and the worker serves the next request."""
    from nanoswarm.client.swarm import Swarm

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        alone = model.generate(PROMPTS[0], 8, GREEDY).ids
        take_learned, faults = Swarm.take_learned, iter([True])

        def faulty(self, other) -> None:
            if next(faults, False):
                raise AttributeError("a bug of ours")
            take_learned(self, other)
        monkeypatch.setattr(Swarm, "take_learned", faulty)
        with model.batcher(at_once=1) as batcher:
            outcome = in_threads(lambda i: batcher.generate(PROMPTS[0], 8, GREEDY), 1)[0]
            assert isinstance(outcome, AttributeError) and "a bug of ours" in str(outcome)
            assert batcher.generate(PROMPTS[0], 8, GREEDY).ids == alone and batcher._live == 1


def test_the_peers_a_worker_learns_are_the_models_too(tiny_model_dir, cluster_factory):
    """Review192: a batcher's worker learned a node that joined (failing over onto it), but only
    its bans were given back to the model: once the bootstraps had died too, every `generate`
    and `generate_batch` of the model failed with RouteError while the joined node served every
    block. The peers a worker found are the model's after its request (Swarm.take_learned)."""
    from nanoswarm.client.discovery import fetch_table
    from nanoswarm.shards.manifest import read_manifest

    cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, bootstrap=cluster.addresses) as model:
        alone = model.generate(PROMPTS[0], 8, GREEDY).ids
        with model.batcher(at_once=1) as batcher:
            assert batcher.generate(PROMPTS[0], 8, GREEDY).ids == alone
            joined = cluster.start_node(NodeSpec((0, 4))).address  # (bootstraps from the first node)
            model_id, deadline = read_manifest(tiny_model_dir).model_id, time.monotonic() + 30
            while len(fetch_table(cluster.addresses[:1]).table.records(model_id)) < 3:
                assert time.monotonic() < deadline, "the first node never listed the joined one"
                time.sleep(0.2)
            assert joined not in model.swarm.peers
            cluster.kill(1)  # the worker fails over onto the joined node, learned from the first
            assert batcher.generate(PROMPTS[0], 8, GREEDY).ids == alone
            assert joined in model.swarm.peers  # given back at the request's end
        cluster.kill(0)  # the joined node alone serves; no bootstrap answers
        assert model.generate(PROMPTS[0], 8, GREEDY).ids == alone
        assert [r.ids for r in model.generate_batch(PROMPTS[:2], 8, GREEDY)] == [
            model.generate(p, 8, GREEDY).ids for p in PROMPTS[:2]]


def test_idle_workers_end_and_the_next_request_starts_another(tiny_model_dir, cluster_factory):
    """Workers idle for `idle_seconds` end and close their links (a batcher kept for a server's
    life holds no threads or sockets through a quiet spell); the next request starts another and
    gets what it gets alone."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        for bad in (0, -1.0, float("nan"), "1", True):
            with pytest.raises(ValueError, match="idle_seconds"):
                model.batcher(idle_seconds=bad)
        for bad in (0, -1, 1.5, True):  # (none would ever start a worker: review204)
            with pytest.raises(ValueError, match="at_once"):
                model.batcher(at_once=bad)
        alone = [model.generate(p, 12, SEEDED).ids for p in PROMPTS[:3]]
        descriptors = open_descriptors()
        with model.batcher(at_once=3, idle_seconds=0.5) as batcher:
            assert [r.ids for r in in_threads(lambda i: batcher.generate(PROMPTS[i], 12, SEEDED), 3)] == alone
            assert len(batcher._workers) >= 2
            assert no_workers() and open_descriptors() <= descriptors + 2  # their links closed
            assert (batcher._live, batcher._idle) == (0, 0)
            assert batcher.generate(PROMPTS[1], 12, SEEDED).ids == alone[1]
            assert batcher._live == 1 and len(batcher._workers) == 1  # the ended ones forgotten
            assert batcher.generate(PROMPTS[2], 12, SEEDED).ids == alone[2]  # the same worker, within 0.5 s
            assert batcher._live == 1
        assert no_workers() and sessions_left(swarm) == 0


@pytest.mark.parametrize("way", ["batcher", "generate_batch"])
def test_a_stale_table_is_read_again_for_the_workers_to_come(tiny_model_dir, cluster_factory, way, monkeypatch):
    """A node joins and another dies an hour (as far as the table's age says) after the model
    connected, and the program only runs batches: the model's table is read in the background
    when a batch (or a batcher's new worker) starts, and taken in at its end (a request's) if
    done by then, else at the next start, whose siblings
    start from it (nothing read it again, and each new worker planned over the peers of the
    connect); each sibling is as old as its table. Nothing waits for the read (review181)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    options = SwarmOptions(timeout=2.0, ban_seconds=60)
    with SwarmModel.connect(tiny_model_dir, bootstrap=swarm.addresses[:1], options=options) as model:
        alone = model.generate(PROMPTS[1], 12, GREEDY).ids
        sibling = model.swarm.sibling()
        assert (sibling._asked, sibling._refreshed) == (model.swarm._asked, model.swarm._refreshed)
        sibling.close()
        new = swarm.start_node(NodeSpec((2, 4))).address
        swarm.kill(1, signal.SIGKILL)
        model.swarm._asked -= 3600
        model.swarm._refreshed -= 3600
        with model.batcher(idle_seconds=0.2) as batcher:
            def run() -> list:
                if way == "batcher":
                    assert no_workers()  # (the last one idle: ended)
                    return [batcher.generate(PROMPTS[1], 12, GREEDY).ids]
                return [r.ids for r in model.generate_batch([PROMPTS[1]] * 2, 12, GREEDY)]
            from nanoswarm.client.background import BackgroundFetch

            reads, init = [], BackgroundFetch.__init__

            def counted(fetch, *args, **kwargs) -> None:
                reads.append(1)
                init(fetch, *args, **kwargs)
            monkeypatch.setattr(BackgroundFetch, "__init__", counted)
            assert run() in ([alone], [alone] * 2)  # served over the stale table: a failover's work
            fetch = model.swarm._fetching  # (None: done by the run's end, and taken in there)
            assert (new in model.swarm.peers) == (fetch is None) and (fetch is None or fetch.done.wait(10))
            assert len(reads) == 1  # the model's: its siblings, made meanwhile, read no more (review182: 9 for 8)
            assert run() in ([alone], [alone] * 2)
            assert new in model.swarm.peers  # taken in at this start at the latest
            assert time.monotonic() - model.swarm._asked < 60


def test_a_request_given_back_waits_in_its_place_in_line(tiny_model_dir):
    """A request refused a route while others run is held in the order the requests came (it
    went to the front: under a steady overload the first held could wait for good), and only
    as many held requests are taken as ends freed places (each end retried every one); one
    refused just after an end is tried again 0.2 s later first (review181: it waited for the
    next end with a place free)."""
    from nanoswarm.client.batcher import _Request

    with SwarmModel.local(tiny_model_dir).batcher() as batcher:
        made = [_Request("x", 4, None, GenerationResult("x"), False, seq) for seq in range(4)]
        batcher._waiting.extend([made[0], made[3]])
        batcher._serving = 3  # others run: a refused request is held
        for r in (made[2], made[1]):
            assert batcher._give_back(r) and r.held
        assert [r.seq for r in batcher._waiting] == [0, 1, 2, 3]
        batcher._waiting.popleft()
        batcher._idle, batcher._places = 2, 1  # one end freed one place: one held request is taken
        assert batcher._take() is made[1] and not made[1].held and not made[1].paused
        assert batcher._places == 0
        fresh = _Request("x", 4, None, GenerationResult("x"), False, 9)
        batcher._last_end = time.monotonic()  # a request just ended: its close may reach a node late
        assert batcher._give_back(fresh) and fresh.paused and not fresh.held  # tried again in 0.2 s
        assert fresh.not_before > batcher._last_end
        batcher._waiting.remove(fresh)
        assert batcher._give_back(fresh) and fresh.held  # refused once more: it waits for a place
        batcher._waiting.clear()


def test_a_batchs_threads_take_in_the_models_read_under_way(tiny_model_dir, cluster_factory, monkeypatch):
    """Review183: a batch started on a stale table starts the model's read in the background,
    and its threads take that read in at their next opens (no read of their own): a node that
    joined is in their plans from then on (marked fresh instead, they ran the whole batch on the
    table of the connect)."""
    from nanoswarm.client.peer_table import PeerTable

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    with SwarmModel.connect(tiny_model_dir, bootstrap=swarm.addresses[:1]) as model:
        new = swarm.start_node(NodeSpec((0, 4))).address
        model.swarm._asked -= 3600
        model.swarm._refreshed -= 3600
        knew, plan = [], PeerTable.plan

        def noted(table, *args, **kwargs):
            if table is not model.swarm:
                knew.append(new in table.peers)
            return plan(table, *args, **kwargs)
        monkeypatch.setattr(PeerTable, "plan", noted)
        model.generate_batch(PROMPTS * 2, 16, GREEDY, at_once=2)
    assert knew[0] is False and knew[-1] is True, knew


def test_no_request_waits_for_good_on_a_worker_that_ends_or_a_batcher_closed(tiny_model_dir):
    """The states a worker meets at a request's end, driven by hand (review204's survivors,
    each a hang if wrong): a held request is taken once nothing runs, with no place freed (an
    end that had no sessions open frees none), to be tried alone and fail; the last worker idle
    past `idle_seconds` does not end while a request paused for a moment waits; and a request
    given back after `close` fails at once (`close` failed those waiting, and no worker would
    take it again)."""
    from nanoswarm.client.batcher import _Request

    def take_within(batcher, seconds: float):
        out: list = []
        t = threading.Thread(target=lambda: out.append(batcher._take()))
        t.start()
        t.join(seconds)
        if t.is_alive():  # stuck: free it, then fail
            with batcher._cond:
                batcher.closed = True
                batcher._cond.notify_all()
            t.join(5)
            return "stuck"
        return out[0]

    model = SwarmModel.local(tiny_model_dir)
    try:
        with model.batcher(idle_seconds=0.05) as batcher:
            held = _Request("x", 4, None, GenerationResult("x"), False, 0)
            batcher._serving = 2  # it and another
            assert batcher._give_back(held) and held.held
            batcher._serving, batcher._idle, batcher._places = 0, 1, 0  # the one running ended, freeing no place
            assert take_within(batcher, 3) is held and not held.held

        with model.batcher(idle_seconds=0.05) as batcher:
            paused = _Request("x", 4, None, GenerationResult("x"), False, 1)
            batcher._serving, batcher._last_end = 1, time.monotonic()  # it, just after another's end
            assert batcher._give_back(paused) and paused.paused
            batcher._serving, batcher._idle = 0, 1
            assert take_within(batcher, 3) is paused  # not None after 0.05 s: no worker would be left
            assert time.monotonic() >= paused.not_before

        with model.batcher() as batcher:
            late = _Request("x", 4, None, GenerationResult("x"), False, 2)
            batcher._serving = 3
            batcher.stop()
            assert not batcher._give_back(late) and not batcher._waiting
    finally:
        model.close()
