"""How many torch threads a CPU node computes with while its machine's cores are contended.

A node computes a forward pass as a team of OpenMP threads (`--threads`), and between the
parallel regions of a pass the workers spin a little (GOMP_SPINCOUNT) so the next region starts
at once. That is right while the node has its cores to itself. When more threads want the cores
than there are (a local swarm's nodes and its clients on one machine, or a volunteer's own
programs), each region waits for its slowest thread, the spinning takes CPU the others need, and
the node gets less done per second of CPU than one thread would. 8 independent clients on a
4-stage local swarm here (2 cores): 39.0-40.7 tok/s with nodes of 2 threads, 55.0-55.4 with nodes
of one; one client alone: 27.0-28.2 against 22.5-22.9 (docs/performance.md, fiftieth session).

So a node watches how long the threads of its team (its main thread and OpenMP's workers) wait
for a core while they want one, from the kernel's schedstat. Once one of them waits more than
REDUCE_ABOVE of that time for REDUCE_SECONDS, the node computes with half its threads (one, from
two; halved again after as long if that is still too many), its main thread unbound from the core
OpenMP bound it to (node/affinity.py: on a small machine other nodes' first threads share it).
Once under RESTORE_BELOW for RESTORE_SECONDS it doubles them again, a step at a time up to its
own (a node of 4 on 2 cores went from one straight to 4, contended at once: review149); idle for
RESTORE_SECONDS, it takes its own at once. Each switch empties oneDNN's kernel cache
(torch.set_num_threads does): ~1.5 ms a prompt shape to build again, not measurable in decode.

The team's worst thread, not the main thread alone: a program that takes a core from a worker
only leaves the main thread spinning at the barrier, which counts as running (review148: one busy
loop beside a 4-stage swarm, 10.1-10.9 tok/s with nodes of 2 threads and no switch while the
governor read the main thread alone, 18.5-18.7 with nodes of one).

Fewer threads can end the contention they were the answer to: one node of 2 threads beside a
busy loop waits ~47% with both and ~0 with one, so it went back and forth every ~3 s (21.1 tok/s
against 23.4 with one thread throughout, 18.4 with two). So a node contended again within
REBOUND_SECONDS of taking threads back waits twice as long before it tries that count again
(up to RESTORE_MAX_SECONDS; the counts below it after RESTORE_SECONDS); an idle spell of
RESTORE_SECONDS, or contention that comes back later, starts over. The price: with fewer threads
a node cannot tell whether the program that contended is gone, so a node that stays busy after
it went keeps fewer threads for up to about RESTORE_MAX_SECONDS. A hold counts seconds of
contention: the first window after an idle spell (the 1 s timer's) counts as one check's worth.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from nanoswarm import START_CPUS

log = logging.getLogger(__name__)

SCHEDSTAT = "/proc/thread-self/schedstat"  # run ns, wait-for-a-core ns, timeslices (Linux)
TASKS = "/proc/self/task"  # the process's threads, by kernel thread id
CHECK_SECONDS = 0.25  # judged at most this often (after a batch; idle, on the 1 s timer)
# Of the time a team thread wanted a core (ran or waited), it waited this much. Measured in 0.25 s
# windows on a 4-stage local swarm of 2-thread nodes (2 cores): one client alone, the worst
# thread 0-28%; beside one busy loop 40-62%; 8 independent clients 55-75%; reduced to one thread
# beside the loop 4-56% (mostly under 40%), beside 8 clients 31-65%.
REDUCE_ABOVE = 0.4
REDUCE_SECONDS = 1.0
RESTORE_BELOW = 0.25
RESTORE_SECONDS = 2.0
REBOUND_SECONDS = 4.0  # contention that began this soon after taking threads back: that was too soon
RESTORE_MAX_SECONDS = 16.0
# A window in which no team thread wanted a core (ran or waited) for this share of it says
# nothing of contention: an idle node, whose few wake-ups wait behind a busy neighbour (a
# one-process round of the bench held both cores for a second: 3 ms run, 7 ms waited). It counts
# toward restoring, never toward reducing.
MIN_WANTED = 0.1


def read_schedstat(path: str = SCHEDSTAT) -> tuple[int, int] | None:
    """(ns run, ns waited runnable) of the calling thread; None where the kernel does not say."""
    try:
        with open(path) as f:
            run, wait = f.read().split()[:2]
        return int(run), int(wait)
    except (OSError, ValueError):
        return None


def read_team() -> dict[int, tuple[int, int]] | None:
    """schedstat (`read_schedstat`) of the calling thread and of the process's threads that are
    neither Python's nor ZeroMQ's, by thread id: the OpenMP team the caller leads (torch's other
    native helpers sleep and want no core). None where the kernel does not say."""
    own = read_schedstat()
    if own is None:
        return None
    team = {threading.get_native_id(): own}
    python = {t.native_id for t in threading.enumerate()}
    try:
        tids = [int(name) for name in os.listdir(TASKS)]
    except (OSError, ValueError):
        return team
    for tid in tids:
        if tid in team or tid in python or _comm(tid).startswith("ZMQbg"):  # (its I/O and reaper)
            continue
        stat = read_schedstat(f"{TASKS}/{tid}/schedstat")
        if stat is not None:  # (None: it ended meanwhile)
            team[tid] = stat
    return team


def _comm(tid: int) -> str:
    try:
        with open(f"{TASKS}/{tid}/comm") as f:
            return f.read()
    except OSError:
        return ""


class ThreadGovernor:
    """Halves the calling thread's torch threads (down to 1) while the cores are contended, and
    gives it back its own `threads` once they are free (the module's doc). `check` is called from
    the node's loop thread, the OpenMP team's first. `read` gives each team thread's ns run and
    ns waited, by thread id."""

    def __init__(self, threads: int, read: Callable[[], dict[int, tuple[int, int]] | None] = read_team,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 set_cpus: Callable[[set[int]], None] | None = None,
                 own_cpus: Callable[[], set[int] | None] | None = None, name: str = "this node"):
        self.full = threads
        self.name = name  # (in its log lines: a local swarm's nodes share one stderr)
        self.current = threads
        self._read = read
        self._set_threads = set_threads
        self._set_cpus = set_cpus if set_cpus is not None else _set_own_cpus
        self._own_cpus = (own_cpus or _own_cpus)()
        self.enabled = threads > 1 and read() is not None
        self.state = {"now": threads, "own": threads}  # for the node's `info` (`threads`), kept current
        self._last: tuple[float, dict[int, tuple[int, int]]] | None = None  # when, each thread's reading
        self._toward: int | None = None  # the count the windows have pointed to, since `_since`
        self._since = 0.0
        self._idle_since: float | None = None  # the windows since then said nothing (no evidence)
        self.restore_seconds = RESTORE_SECONDS  # doubled after each restore that came too soon
        self._restored: float | None = None  # when it last took threads back while busy
        self._tried: int | None = None  # the count whose restore came too soon: steps below it wait less

    def check(self, now: float | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last[0] < CHECK_SECONDS:
            return
        stat = self._read()
        if stat is None:  # (schedstat gone: its own threads, and no more checks)
            self.restore()
            self.enabled = False
            return
        last, self._last = self._last, (now, stat)
        if last is None:
            return
        share = _worst_share(last[1], stat, now - last[0])
        if share is not None:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = last[0]
        if share is not None and share > REDUCE_ABOVE and self.current > 1:
            toward = max(1, self.current // 2)
        elif (share is None or share < RESTORE_BELOW) and self.current < self.full:
            toward = min(self.full, 2 * self.current)  # (a step at a time, each tried like the first)
        else:
            toward = None
        if toward != self._toward:  # (a new direction, or none: the time held starts again)
            # From the window's start, but no further back than a check: a window after an idle
            # spell is long, and its few busy moments are not seconds of contention (review150).
            self._toward, self._since = toward, max(last[0], now - CHECK_SECONDS)
        idle = self._idle_since is not None and now - self._idle_since >= RESTORE_SECONDS
        if toward is None:
            if idle:  # (its own threads, idle: whatever comes next is new work)
                self._start_over()
        elif toward < self.current:
            if now - self._since >= REDUCE_SECONDS:
                self._switch(toward, share, now)
        elif idle:
            self._switch(self.full, None, None)
        elif now - self._since >= self._hold(toward):
            self._switch(toward, share, now)

    def restore(self) -> None:
        """Its own threads and cores again (the node stops: a program that ran it goes on)."""
        if self.current != self.full:
            self._switch(self.full, None, None)

    def _hold(self, toward: int) -> float:
        """How long the cores must be free before it takes `toward` threads: the back-off for the
        count that came too soon and above, RESTORE_SECONDS for the steps below it."""
        return self.restore_seconds if self._tried is None or toward >= self._tried else RESTORE_SECONDS

    def _start_over(self) -> None:
        self._restored, self._tried, self.restore_seconds = None, None, RESTORE_SECONDS

    def _switch(self, threads: int, share: float | None, now: float | None) -> None:
        """`now` is None for a restore that says nothing of contention (idle, stopping): the next
        contention starts the back-off over."""
        down = threads < self.current
        if down:
            if self._restored is not None:  # (the first reduction since a restore)
                if self._since - self._restored < REBOUND_SECONDS:  # (contended again that soon)
                    self.restore_seconds = min(2 * self.restore_seconds, RESTORE_MAX_SECONDS)
                    self._tried = self.current
                else:
                    self._start_over()
                self._restored = None
        elif now is None:
            self._start_over()
        else:
            self._restored = now
        self._toward = None
        self._set_threads(threads)
        if self._own_cpus is not None:
            self._set_cpus(set(START_CPUS) if threads < self.full else self._own_cpus)
        self.current = self.state["now"] = threads
        if down:
            log.info("the cores are contended (a thread of %s waited for one %.1f%% of the time it wanted "
                     "one): computing with %d torch thread%s instead of %d, %d once the cores have been "
                     "free for %.0f s", self.name, 100 * (share or 0), threads, "s" * (threads > 1),
                     self.full, min(self.full, 2 * threads), self._hold(min(self.full, 2 * threads)))
        elif threads < self.full:
            log.info("%s: computing with %d of its %d torch threads", self.name, threads, self.full)
        else:
            log.info("%s: computing with its %d torch threads again", self.name, threads)


def _worst_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                 seconds: float) -> float | None:
    """The largest share of its wanted time (ran + waited) a team thread waited in the window;
    None where none wanted a core for MIN_WANTED of it (no evidence)."""
    shares = []
    for tid, (run, wait) in after.items():
        if tid in before and run >= before[tid][0] and wait >= before[tid][1]:  # (else a new thread, its id reused)
            ran, waited = (run - before[tid][0]) / 1e9, (wait - before[tid][1]) / 1e9
            if ran + waited >= MIN_WANTED * seconds:
                shares.append(waited / (ran + waited))
    return max(shares, default=None)


def _own_cpus() -> set[int] | None:
    """The cores OpenMP bound this thread to, where that is fewer than the process started with."""
    if not START_CPUS or not hasattr(os, "sched_getaffinity"):
        return None
    own = os.sched_getaffinity(0)
    return set(own) if own != START_CPUS else None


def _set_own_cpus(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)  # (0: the calling thread)
    except OSError as e:
        log.debug("cannot move this thread to cores %s: %s", sorted(cpus), e)
