"""A node's torch threads under contention (node/threads.py): fewer while a thread of its OpenMP
team waits for a core most of the time it wants one, its own again once the cores are free."""

from __future__ import annotations

import os
import threading
import time

import pytest

from nanoswarm import START_CPUS, openmp_defaults
from nanoswarm.node import threads as th
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.node.threads import ThreadGovernor, read_schedstat, read_team

# Linux with schedstats only; elsewhere the governor is off (tested below with a reader that
# returns nothing).
needs_schedstat = pytest.mark.skipif(not os.path.exists(th.SCHEDSTAT),
                                     reason="needs Linux's per-thread schedstat (/proc/thread-self/schedstat)")


class Fake:
    """The team's schedstat (its main thread's, and an OpenMP worker's once `worker` is set),
    advanced window by window, and what the governor set."""

    def __init__(self, own: set[int] | None = None):
        self.run = self.wait = 0
        self.worker: list[int] | None = None  # ns run, ns waited
        self.now = 100.0
        self.threads: list[int] = []
        self.cpus: list[set[int]] = []
        self.own = own

    def governor(self, threads: int = 2) -> ThreadGovernor:
        g = ThreadGovernor(threads, read=self.read, set_threads=self.threads.append,
                           set_cpus=self.cpus.append, own_cpus=lambda: self.own)
        g.check(self.now)  # the first reading: no window yet
        return g

    def read(self) -> dict[int, tuple[int, int]]:
        return {1: (self.run, self.wait)} | ({} if self.worker is None else {2: tuple(self.worker)})

    def window(self, g: ThreadGovernor, ran_ms: float, waited_ms: float, seconds: float = th.CHECK_SECONDS,
               worker: tuple[float, float] = (0, 0)) -> None:
        self.run += int(ran_ms * 1e6)
        self.wait += int(waited_ms * 1e6)
        if self.worker is not None:
            self.worker[0] += int(worker[0] * 1e6)
            self.worker[1] += int(worker[1] * 1e6)
        self.now += seconds
        g.check(self.now)


def test_a_contended_node_computes_with_one_thread_and_its_own_again_once_the_cores_are_free():
    f = Fake(own={0})
    g = f.governor(2)
    assert g.enabled and g.state == {"now": 2, "own": 2}
    # Waiting for a core 75% of the time it wants one: one thread once that lasted REDUCE_SECONDS.
    windows = round(th.REDUCE_SECONDS / th.CHECK_SECONDS)
    for _ in range(windows - 1):
        f.window(g, 50, 150)
    assert f.threads == [] and g.current == 2
    f.window(g, 50, 150)
    assert f.threads == [1] and g.current == 1 and g.state == {"now": 1, "own": 2}
    assert f.cpus == [set(START_CPUS)]  # off the core every node's first thread shares
    # Still contended with one thread (half the time waiting): it stays there.
    for _ in range(20):
        f.window(g, 100, 100)
    assert f.threads == [1]
    # Free: its own threads and cores again after RESTORE_SECONDS, not before.
    for _ in range(round(th.RESTORE_SECONDS / th.CHECK_SECONDS) - 1):
        f.window(g, 50, 5)
    assert f.threads == [1]
    f.window(g, 50, 5)
    assert f.threads == [1, 2] and g.state == {"now": 2, "own": 2} and f.cpus == [set(START_CPUS), {0}]
    g.restore()  # (the node stops: already its own)
    assert f.threads == [1, 2]
    for _ in range(windows):
        f.window(g, 50, 150)
    g.restore()  # the node stops while reduced: the program that ran it gets its threads back
    assert f.threads == [1, 2, 1, 2] and f.cpus[-1] == {0} and g.current == 2


def test_a_short_spell_of_waiting_or_an_idle_node_behind_a_busy_neighbour_changes_nothing():
    f = Fake()
    g = f.governor(2)
    for _ in range(40):  # one contended window in three: never REDUCE_SECONDS in a row
        f.window(g, 50, 150)
        f.window(g, 50, 150)
        f.window(g, 100, 5)
    # An idle node whose few wake-ups wait behind another process's compute: 3 ms run, 7 ms
    # waited in a second (a whole window, from the 1 s timer) is no evidence of contention.
    for _ in range(10):
        f.window(g, 3, 7, seconds=1.0)
    assert f.threads == [] and g.current == 2
    assert f.cpus == []  # (and nothing to unbind where OpenMP bound nothing: own None)


def test_a_worker_kept_off_its_core_counts_though_the_main_thread_spins_for_it():
    """A program that takes a core from the node's OpenMP worker only: the main thread, spinning at
    the barrier for the worker, counts as running; the worker's wait is the evidence."""
    f = Fake()
    f.worker = [0, 0]
    g = f.governor(2)
    windows = round(th.REDUCE_SECONDS / th.CHECK_SECONDS)
    # A worker that wants little (the spin after a pass) waits behind others: no evidence.
    for _ in range(2 * windows):
        f.window(g, 200, 20, worker=(2, 20))
    assert f.threads == []
    for _ in range(windows - 1):
        f.window(g, 200, 20, worker=(100, 150))  # main 9% waiting, the worker 60%
    assert f.threads == []
    f.window(g, 200, 20, worker=(100, 150))
    assert f.threads == [1]
    # A thread id the kernel gave a new thread meanwhile (its counters went down): not a window.
    assert th._worst_share({5: (100_000_000, 0)}, {5: (90_000_000, 300_000_000)}, 0.25) is None
    # Reduced, the worker sleeps (wants nothing) and the main thread computes with a core free.
    for _ in range(round(th.RESTORE_SECONDS / th.CHECK_SECONDS)):
        f.window(g, 150, 10)
    assert f.threads == [1, 2]


def test_a_node_contended_again_soon_after_taking_its_threads_back_waits_longer_before_the_next_try():
    """One node beside a busy loop: with one thread the cores are free, with two contended."""
    f = Fake()
    g = f.governor(2)
    reduce, restore = (round(s / th.CHECK_SECONDS) for s in (th.REDUCE_SECONDS, th.RESTORE_SECONDS))
    holds = []
    for _ in range(6):
        for _ in range(reduce):
            f.window(g, 50, 100)
        assert g.current == 1
        holds.append(g.restore_seconds)
        windows = 0
        while g.current == 1:
            f.window(g, 150, 10)
            windows += 1
        assert windows == round(holds[-1] / th.CHECK_SECONDS)
    assert holds == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]  # doubled each time, up to RESTORE_MAX_SECONDS
    assert th.RESTORE_SECONDS == 2.0 and th.RESTORE_MAX_SECONDS == 16.0
    # Idle: its own threads after RESTORE_SECONDS however long the last wait, and the next
    # contention starts over.
    for _ in range(reduce):
        f.window(g, 50, 100)
    for _ in range(restore):
        f.window(g, 0, 0)
    assert g.current == 2
    for _ in range(reduce):
        f.window(g, 50, 100)
    assert g.current == 1 and g.restore_seconds == th.RESTORE_SECONDS
    while g.current == 1:
        f.window(g, 150, 10)
    for _ in range(reduce):
        f.window(g, 50, 100)
    assert g.current == 1 and g.restore_seconds == 2 * th.RESTORE_SECONDS  # (a rebound)
    # Contended again long after a restore that held: that restore was right, start over too.
    while g.current == 1:
        f.window(g, 150, 10)
    for _ in range(round(th.REBOUND_SECONDS / th.CHECK_SECONDS)):
        f.window(g, 150, 60)  # (neither contended nor free)
    for _ in range(reduce):
        f.window(g, 50, 100)
    assert g.current == 1 and g.restore_seconds == th.RESTORE_SECONDS


def test_an_idle_spell_gives_a_backed_off_node_its_threads_after_restore_seconds():
    """review149: busy windows with the cores free, then idle ones (a client finished while the
    node waited out a long back-off): its own threads RESTORE_SECONDS into the idle spell."""
    f = Fake()
    g = f.governor(2)
    reduce = round(th.REDUCE_SECONDS / th.CHECK_SECONDS)
    for _ in range(3):  # three restores that came too soon: 16 s now
        for _ in range(reduce):
            f.window(g, 50, 100)
        while g.current == 1:
            f.window(g, 150, 10)
    for _ in range(reduce):
        f.window(g, 50, 100)
    assert g.current == 1 and g.restore_seconds == 16.0
    for _ in range(4):
        f.window(g, 150, 10)  # a second of free cores, still busy
    for _ in range(round(th.RESTORE_SECONDS / th.CHECK_SECONDS) - 1):
        f.window(g, 0, 0)
    assert g.current == 1
    f.window(g, 0, 0)
    assert g.current == 2
    for _ in range(reduce):  # the next contention starts the back-off over
        f.window(g, 50, 100)
    assert g.current == 1 and g.restore_seconds == th.RESTORE_SECONDS


def test_a_node_of_many_threads_takes_them_back_a_doubling_at_a_time_while_busy():
    """review149: a node of 4 threads on 2 cores went from one straight back to 4, contended at
    once; now 1 -> 2 -> 4, each step held like the first, and contention right after a step is
    a rebound."""
    f = Fake(own={0})
    g = f.governor(4)
    reduce, restore = (round(s / th.CHECK_SECONDS) for s in (th.REDUCE_SECONDS, th.RESTORE_SECONDS))
    for _ in range(2 * reduce):
        f.window(g, 50, 100)
    assert f.threads == [2, 1]
    for _ in range(restore):
        f.window(g, 150, 10)
    assert f.threads == [2, 1, 2] and f.cpus[-1] == set(START_CPUS)  # (not its own core yet)
    for _ in range(restore):
        f.window(g, 150, 10)
    assert f.threads == [2, 1, 2, 4] and f.cpus[-1] == {0}
    for _ in range(reduce):
        f.window(g, 50, 100)  # contended at once: that step came too soon
    assert f.threads == [2, 1, 2, 4, 2] and g.restore_seconds == 2 * th.RESTORE_SECONDS
    for _ in range(reduce):
        f.window(g, 50, 100)  # the same contention: one rebound, not two
    assert f.threads == [2, 1, 2, 4, 2, 1] and g.restore_seconds == 2 * th.RESTORE_SECONDS
    # Back: to 2, below the count that came too soon, after RESTORE_SECONDS (review150: each step
    # waiting the whole back-off took a node of 8 three of them); to 4 after the back-off.
    for _ in range(restore - 1):
        f.window(g, 150, 10)
    assert g.current == 1
    f.window(g, 150, 10)
    assert g.current == 2
    for _ in range(2 * restore - 1):
        f.window(g, 150, 10)
    assert g.current == 2
    f.window(g, 150, 10)
    assert g.current == 4


def test_the_holds_count_seconds_of_contention_not_one_long_window_or_a_rebound_from_its_reduction():
    """review150: (1) the first window after an idle spell is long (the 1 s timer's); a few busy
    moments in it are not a second of contention. (2) A rebound is contention that began within
    REBOUND_SECONDS of the restore, though its reduction comes REDUCE_SECONDS later. (3) An idle
    spell at its own threads starts the back-off over."""
    f = Fake()
    g = f.governor(2)
    f.window(g, 0, 0, seconds=1.0)
    f.window(g, 60, 60, seconds=1.0)  # 12% of the window wanted, half of it waiting
    windows = round(th.REDUCE_SECONDS / th.CHECK_SECONDS)
    for _ in range(windows - 2):
        f.window(g, 50, 100)
    assert f.threads == []  # (the long window counted as one check's worth)
    f.window(g, 50, 100)
    assert f.threads == [1]
    while g.current == 1:
        f.window(g, 150, 10)
    for _ in range(round(th.REBOUND_SECONDS / th.CHECK_SECONDS) - 2):
        f.window(g, 150, 10)  # free at its own threads until half a second before REBOUND_SECONDS
    for _ in range(windows):
        f.window(g, 50, 100)
    assert f.threads == [1, 2, 1] and g.restore_seconds == 2 * th.RESTORE_SECONDS  # (a rebound)
    while g.current == 1:
        f.window(g, 150, 10)
    for _ in range(round(th.RESTORE_SECONDS / th.CHECK_SECONDS)):
        f.window(g, 0, 0)  # idle at its own threads
    for _ in range(windows):
        f.window(g, 50, 100)
    assert g.current == 1 and g.restore_seconds == th.RESTORE_SECONDS


def test_a_node_of_many_threads_halves_them_while_contended_and_an_idle_one_takes_them_back():
    f = Fake(own={0})
    g = f.governor(8)
    per_step = round(th.REDUCE_SECONDS / th.CHECK_SECONDS)
    for _ in range(per_step):
        f.window(g, 20, 200)
    assert f.threads == [4] and g.state == {"now": 4, "own": 8}  # halved, not down to one at once
    for _ in range(per_step):
        f.window(g, 20, 200)
    assert f.threads == [4, 2]
    f.window(g, 100, 50)  # 33%: neither contended enough to halve again nor free: the clock restarts
    for _ in range(per_step - 1):
        f.window(g, 20, 200)
    assert f.threads == [4, 2]
    f.window(g, 20, 200)
    assert f.threads == [4, 2, 1] and f.cpus == [set(START_CPUS)] * 3
    for _ in range(10):
        f.window(g, 20, 200)  # one thread: nothing left to halve
    assert f.threads == [4, 2, 1]
    f.window(g, 0, 0, seconds=1.0)  # the 1 s timer of an idle node
    assert g.current == 1
    f.window(g, 1, 1, seconds=1.0)  # RESTORE_SECONDS since the first idle window began
    assert f.threads == [4, 2, 1, 8] and g.state == {"now": 8, "own": 8} and f.cpus[-1] == {0}


def test_checks_are_rate_limited_and_off_for_one_thread_or_without_schedstat():
    f = Fake()
    g = f.governor(2)
    reads = []
    g._read = lambda: reads.append(1) or f.read()
    g.check(f.now + th.CHECK_SECONDS / 2)  # a batch right after the last check: not read
    assert reads == []
    g.check(f.now + th.CHECK_SECONDS)
    assert reads == [1]
    assert not ThreadGovernor(1, read=lambda: {1: (0, 0)}).enabled  # nothing to reduce
    assert not ThreadGovernor(2, read=lambda: None).enabled  # no schedstat (not Linux, or hidden)
    gone = Fake()
    h = gone.governor(2)
    h._read = lambda: None  # schedstat gone meanwhile: the governor stops, the threads stay
    gone.window(h, 50, 150)
    assert not h.enabled and gone.threads == []
    reduced = Fake()
    h = reduced.governor(2)
    for _ in range(round(th.REDUCE_SECONDS / th.CHECK_SECONDS)):
        reduced.window(h, 50, 150)
    h._read = lambda: None  # gone while reduced (review150): its own threads, not one for good
    reduced.window(h, 50, 150)
    assert not h.enabled and reduced.threads == [1, 2] and h.state == {"now": 2, "own": 2}


@needs_schedstat
def test_schedstat_is_read_from_the_kernel_for_the_calling_thread():
    first = read_schedstat()
    assert first is not None and all(isinstance(v, int) and v >= 0 for v in first)
    end = time.thread_time() + 0.05
    while time.thread_time() < end:  # 50 ms on a core
        pass
    second = read_schedstat()
    assert second is not None and second[0] - first[0] >= 40e6
    assert read_schedstat("/nonexistent/schedstat") is None


@needs_schedstat
def test_the_team_read_from_the_kernel_is_the_caller_and_openmp_workers_not_python_or_zeromq_threads():
    import torch
    import zmq

    torch.set_num_threads(2)  # (conftest gives the test's count back)
    a = torch.randn(256, 256)
    for _ in range(20):
        a @ a  # OpenMP's worker exists once a parallel region ran
    idle = threading.Event()
    python = threading.Thread(target=idle.wait, daemon=True)
    python.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # (its I/O thread and reaper)
    try:
        before = read_team()
        for _ in range(200):
            a @ a
        after = read_team()
        assert before is not None and after is not None
        own = threading.get_native_id()
        assert own in after and python.native_id not in after
        zmq_threads = {int(t) for t in os.listdir(th.TASKS) if th._comm(int(t)).startswith("ZMQbg")}
        assert len(zmq_threads) >= 2 and not zmq_threads & set(after)  # (ours, and any earlier context's)
        workers = [t for t in after if t != own and t in before and after[t][0] > before[t][0]]
        assert workers  # the worker computed its half of the matmuls
    finally:
        idle.set()
        sock.close(linger=0)
        ctx.term()


def _info(address: str) -> dict:
    from nanoswarm.client.transport import PeerConnection

    conn = PeerConnection(address, timeout=10.0)
    try:
        return conn.request("info").fields
    finally:
        conn.close()


def test_a_node_of_several_threads_says_how_many_it_computes_with(tiny_model_dir, cluster_factory):
    """Real nodes: one of 2 threads watches its cores and says so in `info` (its own count, here
    uncontended); one of a single thread, or started with NANOSWARM_ADAPT_THREADS=0, does not."""
    cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 4)), NodeSpec((0, 4), args=["--threads", "1"])],
                              threads=2)
    watching, single = (_info(a) for a in cluster.addresses)
    if os.path.exists(th.SCHEDSTAT):
        assert watching["threads"] == {"now": 2, "own": 2}
    assert "threads" not in single
    fixed = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))], threads=2, env={"NANOSWARM_ADAPT_THREADS": "0"})
    assert "threads" not in _info(fixed.addresses[0])


class _Info:
    """A node's `info` as `settle_threads` reads it: `threads` from a list, one a request."""

    def __init__(self, states: list):
        self.states = states
        self.asked = 0

    def request(self, msg_type: str, timeout: float):
        self.asked += 1
        state = self.states[min(self.asked, len(self.states)) - 1]
        return type("Reply", (), {"fields": {} if state is None else {"threads": state}})()


def test_the_bench_waits_for_the_nodes_to_compute_with_their_own_threads_before_a_concurrent_run():
    from nanoswarm.bench.measure import settle_threads

    back = _Info([{"now": 1, "own": 2}, {"now": 1, "own": 2}, {"now": 2, "own": 2}])
    plain = _Info([None])  # a node that does not say (one thread, another version)
    settle_threads([back, plain])
    assert back.asked == 3 and plain.asked == 3
    stuck = _Info([{"now": 1, "own": 2}])
    t0 = time.monotonic()
    settle_threads([stuck], timeout=0.6)  # never back: the run goes on after the timeout
    assert 0.6 <= time.monotonic() - t0 < 2.0 and stuck.asked >= 2  # asked again (3 when no sleep overshoots)


def test_openmp_defaults_set_a_spin_for_passive_workers_and_leave_the_users_values():
    # ~0.4 ms on the Intel test VM: 10,000 (~0.13 ms) let a node's worker fall asleep between the
    # parallel regions of one decode step 8-16 times (docs/performance.md, fifty-second session).
    assert openmp_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"}
    assert openmp_defaults({"GOMP_SPINCOUNT": "5"})["GOMP_SPINCOUNT"] == "5"
    # Another policy the user chose: libgomp's own spin for it, not ours.
    assert openmp_defaults({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
