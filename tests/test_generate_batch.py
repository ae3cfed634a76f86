"""SwarmModel.generate_batch: several prompts at once, in step, through real node processes; each
prompt's generation as it is alone, the head run once a token for all of them."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import pytest
from conftest import sessions_on

import nanoswarm.client.batch as batch_module
from nanoswarm.client.api import PromptError, SwarmModel
from nanoswarm.client.batch import HeadBatch
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.swarm import SwarmOptions
from nanoswarm.node.cluster import NodeSpec

PROMPTS = ["ROMEO:", "Once upon a time there was", "", "JULIET: O Romeo, Romeo! wherefore art thou"]
SEEDED = SamplingParams(temperature=0.9, top_k=100, seed=7)


class RecordedBatch(HeadBatch):
    """A HeadBatch that keeps itself (`made`) and runs `at_round(batch)` before each head pass."""
    made: list[RecordedBatch] = []
    at_round = staticmethod(lambda batch: None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordedBatch.made.append(self)

    def _run_if_all_asked(self) -> None:
        if self._asked and len(self._asked) >= self._running:
            RecordedBatch.at_round(self)
        super()._run_if_all_asked()


@pytest.fixture
def recorded(monkeypatch):
    RecordedBatch.made = []
    RecordedBatch.at_round = staticmethod(lambda batch: None)
    monkeypatch.setattr(batch_module, "HeadBatch", RecordedBatch)
    return RecordedBatch


def open_descriptors() -> int:
    time.sleep(0.3)  # closed sockets' descriptors go once ZeroMQ's I/O thread has let them go
    return len(os.listdir("/proc/self/fd"))


def sessions_left(swarm, seconds: float = 5.0) -> int:
    """The sessions the swarm's nodes hold, once closes sent have had `seconds` to arrive."""
    deadline = time.monotonic() + seconds
    while (held := sum(sessions_on(a) for a in swarm.addresses)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def no_batch_threads() -> bool:
    return not any(t.name.startswith("nanoswarm-batch-") and t.is_alive() for t in threading.enumerate())


def test_each_prompt_of_a_batch_gets_what_it_gets_alone(tiny_model_dir, cluster_factory, recorded):
    """Ids, text, stop reason and logits (within 1e-5) as `generate` gives each prompt alone,
    seeded sampling included; the head ran once a token for every generation still running. The
    generations' spot checks share the model's checker, from their threads."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(verify=0.5)) as model:
        alone = [model.generate(p, 20, SEEDED, keep_logits=True) for p in PROMPTS]
        descriptors = open_descriptors()
        done: list = []  # on_done: each prompt once, as its generation ends, its result filled
        together = model.generate_batch(PROMPTS, 20, SEEDED, keep_logits=True,
                                        on_done=lambda k, r: done.append((k, r.stop_reason, len(r.ids))))
        assert sorted(done) == [(k, r.stop_reason, len(r.ids)) for k, r in enumerate(together)]
        assert all(reason for _, reason, _ in done)
        assert open_descriptors() <= descriptors + 2  # every sibling's links closed with it
        [batch] = recorded.made
        assert sum(r.spot_checks for r in together) > 0
        assert batch.widest == len(PROMPTS) and batch.rounds >= 20
        for a, b in zip(alone, together):
            assert (b.prompt, b.ids, b.text, b.stop_reason) == (a.prompt, a.ids, a.text, a.stop_reason)
            assert len(b.logits) == len(a.logits) and b.route and b.failovers == 0 and b.wrong_results == 0
            assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) < 1e-5
        # Uneven lengths: a generation that ends leaves the batch, the others go on.
        short = model.generate_batch(["ROMEO:", "JULIET:"], 3, SEEDED)
        assert [len(r.ids) for r in short] == [3, 3]
        # Two at a time: a thread that has finished one prompt takes the next.
        pairs = model.generate_batch(PROMPTS, 20, SEEDED, at_once=2)
        assert [r.ids for r in pairs] == [r.ids for r in alone] and [r.text for r in pairs] == [r.text for r in alone]
        assert recorded.made[-1].widest == 2
        with pytest.raises(ValueError, match="at_once"):
            model.generate_batch(PROMPTS, 4, at_once=0)
        mixed = model.generate_batch(PROMPTS[:2], 0, SEEDED)  # nothing to compute: no session
        assert [r.ids for r in mixed] == [[], []] and [r.stop_reason for r in mixed] == ["length", "length"]
    assert no_batch_threads()
    assert sessions_left(swarm) == 0


def test_a_batch_is_refused_before_any_peer_is_asked(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        with pytest.raises(TypeError, match="list of texts"):
            model.generate_batch("ROMEO:", 4)
        with pytest.raises(TypeError, match="list of texts"):
            model.generate_batch(["ROMEO:", 3], 4)
        with pytest.raises(PromptError, match=r"^prompts\[1\]: prompt is 201 tokens; the model's context is 128$") as e:
            model.generate_batch(["ROMEO:", "word " * 200], 4)
        again = pickle.loads(pickle.dumps(e.value))  # (review188: it would not unpickle)
        assert (again.index, again.why, str(again)) == (1, e.value.why, str(e.value))
        with pytest.raises(ValueError, match="^max_new_tokens"):  # (not one prompt's)
            model.generate_batch(["ROMEO:"], -1)
        assert model.generate_batch([], 4) == []
        assert sessions_on(swarm.addresses[0]) == 0
    local = SwarmModel.local(tiny_model_dir)
    assert [r.ids for r in local.generate_batch(PROMPTS[:2], 6, SEEDED)] == \
        [local.generate(p, 6, SEEDED).ids for p in PROMPTS[:2]]


def test_prompts_run_one_after_another_still_report_each_as_it_ends(tiny_model_dir, cluster_factory):
    """A local model, a batch of one prompt and at_once=1 run the prompts one after another, not
    in step: `on_done(k, result)` is still called once for each, in order, its result filled (the
    CLI prints each prompt's result from it), and `on_wait` once all before it are done."""
    local = SwarmModel.local(tiny_model_dir)
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        for runs, prompts, at_once in ((local, PROMPTS[:3], 16), (model, PROMPTS[:1], 16), (model, PROMPTS[:2], 1)):
            done: list = []
            waits: list = []
            results = runs.generate_batch(prompts, 4, SEEDED, at_once=at_once,
                                          on_done=lambda k, r, d=done: d.append((k, list(r.ids), r.stop_reason)),
                                          on_wait=lambda d=done, w=waits: w.append(len(d)))
            assert done == [(k, r.ids, "length") for k, r in enumerate(results)]
            assert [len(r.ids) for r in results] == [4] * len(prompts)
            assert waits and waits[-1] == len(prompts)


def test_a_batch_takes_its_prompts_in_order_and_stops_whole_at_a_generations_error(tiny_model_dir, cluster_factory,
                                                                                    recorded, monkeypatch):
    """Prompts are begun in the list's order (the CLI prints each once those before it are done),
    and a generation's error stops the batch: the others stop after their step under way, no
    later prompt is begun, and the error comes out."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    stream, begun = SwarmModel.stream, []

    def failing_b(self, prompt, *args, **kwargs):
        begun.append(prompt)
        if prompt == "B":
            raise RuntimeError("a node failed (a test's)")
        yield from stream(self, prompt, *args, **kwargs)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        done: list[int] = []
        model.generate_batch(["A", "C", "D", "E"], 3, SEEDED, at_once=2, on_done=lambda k, r: done.append(k))
        assert sorted(done[:2]) == [0, 1] and sorted(done) == [0, 1, 2, 3]
        monkeypatch.setattr(SwarmModel, "stream", failing_b)
        with pytest.raises(RuntimeError, match="a test's"):
            model.generate_batch(["A", "B", "C", "D"], 60, SEEDED, at_once=2)
        assert sorted(begun) == ["A", "B"]  # C and D never begun
        assert recorded.made[-1].rounds < 30  # A stopped long before its 60 tokens
    assert no_batch_threads()
    assert sessions_left(swarm) == 0


def test_a_generation_that_ended_holds_up_no_one_while_its_thread_opens_the_next(tiny_model_dir, cluster_factory,
                                                                                  monkeypatch):
    """A generation leaves the head batch as it ends: its thread's next prompt joins at its first
    logits, so a slow open of that one (a refresh, a dead peer's timeout) holds up no generation
    still running (review181, for generate_batch's threads)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    session, opened, first_done, events = SwarmModel.session, [], threading.Event(), []

    def third_open_slow(self, *args, **kwargs):
        opened.append(1)
        if len(opened) == 3:  # the third prompt's, on the thread whose first prompt has ended
            # An open that lasts until the first generation has ended (up to 30 s): held up by
            # this thread, it would end only at the wait's timeout.
            events.append("first ended during the open" if first_done.wait(30) else "open timed out")
        return session(self, *args, **kwargs)

    def done(k: int, result) -> None:
        if k == 0:
            first_done.set()
    short = " the" * 125  # 125 tokens: the context leaves it 4 new ones, the others 40
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        monkeypatch.setattr(SwarmModel, "session", third_open_slow)
        results = model.generate_batch(["ROMEO:", short, "JULIET:"], 40, SEEDED, at_once=2, on_done=done)
        assert [len(r.ids) for r in results] == [40, 4, 40] and len(opened) == 3
        assert events == ["first ended during the open"]  # the first went on meanwhile


def test_a_batch_fails_over_a_node_killed_midway(tiny_model_dir, cluster_factory, recorded):
    """Each generation fails over by itself; every prompt's tokens still those of a lone run, and
    the bans its sibling learned are the model's afterwards."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses,
                            options=SwarmOptions(timeout=5.0, ban_seconds=60)) as model:
        alone = [model.generate(p, 16, SEEDED).ids for p in PROMPTS]
        killed: list[str] = []

        def kill_the_busiest_first_stage(batch: HeadBatch) -> None:
            if batch.rounds == 4 and not killed:  # every generation has a session open by now
                address = max(swarm.addresses[:2], key=sessions_on)
                killed.append(address)
                swarm.kill(swarm.addresses.index(address), signal.SIGKILL)
                swarm.nodes[swarm.addresses.index(address)].proc.wait(10)
        recorded.at_round = staticmethod(kill_the_busiest_first_stage)
        together = model.generate_batch(PROMPTS, 16, SEEDED)
        assert killed and [r.ids for r in together] == alone
        assert sum(r.failovers for r in together) >= 1
        assert killed[0] in model.swarm.bans  # learned by a sibling, kept by the model
    assert no_batch_threads()


def test_a_batch_stopped_by_close_ends_every_generation_and_session(tiny_model_dir, cluster_factory, recorded):
    """The model closed from another thread midway: generate_batch raises, no thread of it is left,
    and every node's sessions are closed."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)

    def close_at_round_5(batch: HeadBatch) -> None:
        if batch.rounds == 5:
            threading.Thread(target=model.close).start()  # as another thread of the application would
            time.sleep(0.2)
    recorded.at_round = staticmethod(close_at_round_5)
    with pytest.raises(RuntimeError, match="closed"):
        model.generate_batch(PROMPTS, 40, SEEDED)
    assert no_batch_threads()
    assert sessions_left(swarm) == 0


def interrupt_at_round(n: int):
    """A RecordedBatch.at_round that sends this process SIGINT before the head's n-th pass."""
    def at_round(batch: HeadBatch) -> None:
        if batch.rounds == n:
            os.kill(os.getpid(), signal.SIGINT)
    return at_round


def test_ctrl_c_stops_every_generation_of_a_batch_and_closes_its_sessions(tiny_model_dir, cluster_factory, recorded):
    """SIGINT to the process midway (the main thread waits for the generations): KeyboardInterrupt
    comes out once every generation has stopped after its step, and no session is left open."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        recorded.at_round = staticmethod(interrupt_at_round(5))
        with pytest.raises(KeyboardInterrupt):
            model.generate_batch(PROMPTS, 60, SEEDED)
        assert no_batch_threads()
        [batch] = recorded.made
        assert 5 <= batch.rounds < 60
        recorded.at_round = staticmethod(lambda batch: None)
        assert [len(r.ids) for r in model.generate_batch(PROMPTS[:2], 3, SEEDED)] == [3, 3]  # the model goes on
    assert sessions_left(swarm) == 0


def test_a_second_ctrl_c_still_stops_the_batch(tiny_model_dir, cluster_factory, recorded, monkeypatch):
    """Review174: a second Ctrl-C that cut the first one's stop (its wait for the batch's lock,
    held by a head pass) left the batch running behind the raised KeyboardInterrupt, every prompt
    to its end, holding its sessions. Here a SIGINT comes midway and the stop it starts is cut by
    another KeyboardInterrupt, once (made, not signalled: a second real signal's moment cannot be
    chosen); the batch still stops, and KeyboardInterrupt comes out only after its threads."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    cut = []
    real_stop = HeadBatch.stop

    def stop_cut_once(batch: HeadBatch) -> None:
        real_stop(batch)
        if not cut:
            cut.append(1)
            raise KeyboardInterrupt  # the second Ctrl-C, in the stop's wait
    monkeypatch.setattr(RecordedBatch, "stop", stop_cut_once)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        recorded.at_round = staticmethod(interrupt_at_round(3))
        with pytest.raises(KeyboardInterrupt):
            model.generate_batch(PROMPTS * 4, 60, SEEDED, at_once=4)
        assert cut and no_batch_threads()
        [batch] = recorded.made
        assert batch.stopped and batch.rounds < 60  # of 240 (16 prompts of 60 tokens, 4 at a time)
    assert sessions_left(swarm) == 0


def test_a_batch_wider_than_the_nodes_session_limit_goes_on_narrower(tiny_model_dir, cluster_factory, recorded):
    """Review174: nodes that hold 2 sessions each, 6 prompts 4 at a time: a generation whose open
    is refused (the batch's own sessions fill the nodes) gives its prompt back and its thread
    ends; every prompt still gets what it gets alone."""
    limit = ["--max-sessions", "2"]
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2), args=limit), NodeSpec((2, 4), args=limit)])
    prompts = [*PROMPTS, "ROMEO: a second", "JULIET: a second"]
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        alone = [model.generate(p, 8, SEEDED).ids for p in prompts]
        assert model.swarm.sibling().contacts == model.swarm.contacts  # (a sibling asks them again too)
        together = model.generate_batch(prompts, 8, SEEDED, at_once=4)
        assert [r.ids for r in together] == alone and all(r.stop_reason == "length" for r in together)
        assert recorded.made[-1].widest <= 2
    assert no_batch_threads()



def test_a_ctrl_c_inside_a_workers_start_comes_after_the_thread_began(monkeypatch):
    """Review178: Ctrl-C landing inside `Thread.start` could come before or after the new thread
    began, and nothing told which (a batcher counted one that ran as never started). The
    interrupt is held back until the thread has started, then raised."""
    ran = threading.Event()
    worker = batch_module.Worker(ran.set, "nanoswarm-batch-test")
    start = threading.Thread.start

    def interrupted_start(thread) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # (the signal's handler would run here)
        start(thread)
    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        worker.start()
    assert worker.started and ran.wait(2) and worker.ended.wait(2)
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def test_a_workers_start_runs_every_held_signal_and_puts_every_handler_back(monkeypatch):
    """Review179: with two signals held back during a start, the second was never run (its
    handler, SIG_DFL for SIGTERM, would end the process); and a signal whose own handler ran (and
    raised) while the handlers were put back left the rest recording for good."""
    terms: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
    try:
        start = threading.Thread.start

        def interrupted_start(thread) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            start(thread)
        monkeypatch.setattr(threading.Thread, "start", interrupted_start)
        handlers = {s: signal.getsignal(s) for s in batch_module.HELD_SIGNALS}
        worker = batch_module.Worker(lambda: None, "nanoswarm-batch-test")
        with pytest.raises(KeyboardInterrupt):
            worker.start()
        assert worker.started and terms == [signal.SIGTERM]
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        monkeypatch.setattr(threading.Thread, "start", start)

        swap, first = signal.signal, [True]

        def pending_at_restore(s, handler):  # as CPython does: a pending signal's handler runs first
            if s == signal.SIGINT and handler is handlers[signal.SIGINT] and first[0]:
                first[0] = False
                raise KeyboardInterrupt
            return swap(s, handler)
        monkeypatch.setattr(signal, "signal", pending_at_restore)
        with pytest.raises(KeyboardInterrupt):
            batch_module.Worker(lambda: None, "nanoswarm-batch-test").start()
        assert {s: signal.getsignal(s) for s in handlers} == handlers

        def raising_after_restore(s, handler):  # the handler runs just after the swap: not swapped again
            previous = swap(s, handler)
            if s == signal.SIGINT and handler is handlers[signal.SIGINT]:
                raise KeyboardInterrupt
            return previous
        monkeypatch.setattr(signal, "signal", raising_after_restore)
        with pytest.raises(KeyboardInterrupt):
            batch_module.Worker(lambda: None, "nanoswarm-batch-test").start()  # (it looped for good)
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        signal.signal(signal.SIGTERM, before)


def test_on_wait_sees_every_result_done_before_an_error(tiny_model_dir, cluster_factory, monkeypatch):
    """Review182: `on_wait` is called once more after the last generation has stopped, also
    when the batch then raises: a prompt done 20 ms before another's failure was never shown
    (both threads ended within one 0.1 s wait, and the error went out without a last call)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    stream, first_done = SwarmModel.stream, threading.Event()

    def failing_second(self, prompt, *args, **kwargs):
        if prompt == "B":
            first_done.wait(30)
            time.sleep(0.02)
            raise RuntimeError("a node failed (a test's)")
        yield from stream(self, prompt, *args, **kwargs)
        first_done.set()
    monkeypatch.setattr(SwarmModel, "stream", failing_second)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model:
        for _ in range(3):
            first_done.clear()
            done: list[int] = []
            shown: list[list[int]] = []  # what on_wait saw done, each time it was called
            with pytest.raises(RuntimeError, match="a test's"):
                model.generate_batch(["A", "B"], 6, SamplingParams(temperature=0), at_once=2,
                                     on_done=lambda k, result, d=done: d.append(k),
                                     on_wait=lambda d=done, s=shown: s.append(list(d)))
            assert shown and shown[-1] == [0]


def test_a_swarms_siblings_share_one_background_read(tiny_model_dir, cluster_factory, monkeypatch):
    """A batch's threads (siblings of the model's table), stale together, read the swarm once
    between them, each taking that read in at its next open (each read it on its own: a batcher
    of 16 workers read the bootstraps 16 times a minute). Not taken for a table: a read begun
    before its own last, one done a minute or more ago, one that does not ask its peers that
    went or time again the round trips it would (review186; SharedReads.serves)."""
    from nanoswarm.client import table_reads
    from nanoswarm.client.background import BackgroundFetch

    cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    reads, gate, init, run = [], threading.Event(), BackgroundFetch.__init__, BackgroundFetch._run

    def counted(fetch, *args, **kwargs) -> None:
        reads.append(fetch)
        init(fetch, *args, **kwargs)

    def held(fetch, *args) -> None:  # each read waits for the gate: none is done before all asked
        gate.wait(30)
        run(fetch, *args)

    def later(*tables, seconds: float = 3600) -> None:  # `seconds` on for these tables and reads
        for t in tables:
            for name in ("_asked", "_refreshed", "started", "finished"):
                if hasattr(t, name):
                    setattr(t, name, getattr(t, name) - seconds)

    def released(fetch) -> None:
        gate.set()
        assert fetch.done.wait(10)
        gate.clear()
    with SwarmModel.connect(tiny_model_dir, bootstrap=cluster.addresses[:1]) as model:
        siblings = [model.swarm.sibling() for _ in range(3)]
        new = cluster.start_node(NodeSpec((0, 4))).address
        monkeypatch.setattr(BackgroundFetch, "__init__", counted)
        monkeypatch.setattr(BackgroundFetch, "_run", held)
        try:
            for round_ in range(2):
                later(*siblings, *reads)
                for s in siblings:
                    s.refresh_stale()
                if round_ == 0:
                    assert len(reads) == 1 and all(s._fetching is reads[0] for s in siblings)
                else:  # siblings[0] read, [1] would ask `new`, which went, [2] time the bootstrap again
                    assert len(reads) == 4 and [s._fetching for s in siblings] == reads[1:]
                    assert [r.asks_gone for r in reads[1:]] == [frozenset(), frozenset([new]), frozenset()]
                for r in reads[-(1 + 2 * round_):]:
                    released(r)
                for s in siblings:
                    s.refresh_stale()
                    assert s._fetching is None and time.monotonic() - s._asked < 1
                    assert (new in s.peers) == (round_ == 0 or s is not siblings[1])  # it left: dropped by its read
                if round_ == 0:
                    cluster.kill(1, signal.SIGTERM)  # it leaves: no bootstrap lists it
                    for s in siblings:
                        s.peers[new].rtt = 0.0
                    siblings[1].ban(new, "disconnected: connection closed by the peer", "disconnected")
                    siblings[2].timed[cluster.addresses[0]] = None  # silent when timed: timed again
            assert siblings[2].timed[cluster.addresses[0]] is not None  # timed again by its own read
            later(siblings[0], seconds=table_reads.TABLE_SECONDS + 1)  # stale; the last read, done a moment
            reads[-1].started -= table_reads.TABLE_SECONDS + 1  # ago, begun before its own last (review187)
            siblings[0].refresh_stale()
            assert len(reads) == 5 and siblings[0]._fetching is reads[-1]
            released(reads[-1])
            siblings[0].refresh_stale()
            later(model.swarm)
            later(reads[-1], seconds=table_reads.TABLE_SECONDS)  # done a minute ago: not taken
            model.swarm.refresh_stale()
            assert len(reads) == 6 and model.swarm._fetching is reads[-1]
            later(siblings[0])
            siblings[0].refresh_stale()  # the model's read under way
            assert len(reads) == 6 and siblings[0]._fetching is reads[-1]
            released(reads[-1])
            later(siblings[2])
            siblings[2].refresh_stale()  # done: taken in at once
            assert len(reads) == 6 and siblings[2]._fetching is None and time.monotonic() - siblings[2]._asked < 1
        finally:
            gate.set()
            for s in siblings:
                s.close()


@pytest.mark.parametrize("way", ["generate_batch", "batcher"])
def test_a_peer_that_left_is_dropped_from_the_models_table_by_a_batch_only_program(tiny_model_dir, cluster_factory,
                                                                                     way):
    """Review187: a program that only runs batches (or a batcher) took the model's background
    read in at the next batch's start (a new worker's), a minute or more on, when the read's
    answers of peers that went say too little to drop anyone: a peer that left stayed in the
    model's table for good, planned again (a failover) each time its ban ran out. The read begun
    at a batch's start is taken in at its end (a batcher's: at a request's end)."""
    cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 4)), NodeSpec((0, 4))])
    with SwarmModel.connect(tiny_model_dir, bootstrap=cluster.addresses[:1]) as model:
        left = cluster.addresses[1]
        cluster.kill(1, signal.SIGTERM)  # it leaves: the bootstrap lists it no more
        cluster.nodes[1].proc.wait(10)
        model.swarm.ban(left, "disconnected: connection closed by the peer", "disconnected")
        model.swarm._asked -= 3600
        model.swarm._refreshed -= 3600
        def read_done(*_) -> None:  # the model's read, begun at the start, done
            fetch = model.swarm._fetching  # (None: taken in already)
            assert fetch is None or fetch.done.wait(10)
        if way == "generate_batch":
            model.generate_batch(PROMPTS[:2], 4, SEEDED, on_done=read_done)
            assert left not in model.swarm.peers  # (at the batch's end: review190, not at the next start)
            read = model.swarm._reads.latest

            def an_hour_on(*_) -> None:
                for x in (model.swarm, read):
                    for name in ("_asked", "_refreshed", "started", "finished"):
                        if hasattr(x, name):
                            setattr(x, name, getattr(x, name) - 1800)
            model.generate_batch(PROMPTS[:2], 2, SEEDED, on_done=an_hour_on)
            assert model.swarm._fetching is None and model.swarm._reads.latest is read  # none started at
            # the end of a batch that went stale (review188: a program ending then threw it away)
        else:
            with model.batcher() as batcher:
                batcher.generate(PROMPTS[0], 4, SEEDED)
                read_done()
                batcher.generate(PROMPTS[1], 4, SEEDED)  # (taken in at its end, after its caller's answer)
        assert left not in model.swarm.peers and left in model.swarm.bans  # (its ban kept, should it come back)
