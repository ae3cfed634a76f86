"""How many torch threads a CPU node computes with while its machine's cores are contended.

A node computes a forward pass as a team of OpenMP threads (`--threads`), and between the
parallel regions of a pass the workers spin a little (GOMP_SPINCOUNT) so the next region starts
at once. That is right while the node has its cores to itself. When more threads want the cores
than there are (a local swarm's nodes and its clients on one machine, or a volunteer's own
programs), each region waits for its slowest thread, the spinning takes CPU the others need, and
the node gets less done per second of CPU than one thread would. 8 independent clients on a
4-stage local swarm here (2 cores): 39.0-40.7 tok/s with nodes of 2 threads, 55.0-55.4 with nodes
of one; one client alone: 27.0-28.2 against 22.5-22.9 (docs/performance.md, fiftieth session).

So a node watches how long its main thread (the team's first) waits for a core while it wants
one, from the kernel's schedstat: past REDUCE_ABOVE of the time for REDUCE_SECONDS it computes with
half its threads (one, from two; halved again after as long if that is still too many), its main
thread unbound from the core OpenMP bound it to (node/affinity.py: on a small machine other
nodes' first threads share it), and once under RESTORE_BELOW for RESTORE_SECONDS it goes back to
its own. Each switch empties oneDNN's kernel cache (torch.set_num_threads does): ~1.5 ms a prompt
shape to build again, not measurable in decode.

What it sees is the main thread's wait: more threads than cores among the nodes and clients
(review148: 8 independent clients, all four nodes of a local swarm switched within 2 s). Not
yet a program that takes one core from the node's OpenMP worker only: the main thread, spinning
at the barrier for that worker, counts as running (review148: one busy loop beside a 4-stage
swarm, 10.1-10.9 tok/s with nodes of 2 threads, no switch, against 18.5-18.7 with nodes of one).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from nanoswarm import START_CPUS

log = logging.getLogger(__name__)

SCHEDSTAT = "/proc/thread-self/schedstat"  # run ns, wait-for-a-core ns, timeslices (Linux)
CHECK_SECONDS = 0.25  # judged at most this often (after a batch; idle, on the 1 s timer)
REDUCE_ABOVE = 0.6    # of the time the main thread wanted a core (ran or waited), it waited this much
REDUCE_SECONDS = 1.0
RESTORE_BELOW = 0.25
RESTORE_SECONDS = 2.0
# A window in which the thread wanted a core (ran or waited) for less than this share of it says
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


class ThreadGovernor:
    """Halves the calling thread's torch threads (down to 1) while the cores are contended, and
    gives it back its own `threads` once they are free (the module's doc). `check` is called from
    the node's loop thread, the OpenMP team's first."""

    def __init__(self, threads: int, read: Callable[[], tuple[int, int] | None] = read_schedstat,
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
        self._last: tuple[float, int, int] | None = None  # when, run ns, wait ns
        self._toward: int | None = None  # the count the windows have pointed to, since `_since`
        self._since = 0.0

    def check(self, now: float | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last[0] < CHECK_SECONDS:
            return
        stat = self._read()
        if stat is None:
            self.enabled = False
            return
        last, self._last = self._last, (now, *stat)
        if last is None:
            return
        ran, waited = (stat[0] - last[1]) / 1e9, (stat[1] - last[2]) / 1e9
        share = waited / (ran + waited) if ran + waited >= MIN_WANTED * (now - last[0]) else None
        if share is not None and share > REDUCE_ABOVE and self.current > 1:
            toward, hold = max(1, self.current // 2), REDUCE_SECONDS
        elif (share is None or share < RESTORE_BELOW) and self.current < self.full:
            toward, hold = self.full, RESTORE_SECONDS
        else:
            toward, hold = None, 0.0
        if toward != self._toward:  # (a new direction, or none: the time held starts again)
            self._toward, self._since = toward, last[0]  # (the window began then)
        if toward is not None and now - self._since >= hold:
            self._switch(toward, share)

    def restore(self) -> None:
        """Its own threads and cores again (the node stops: a program that ran it goes on)."""
        if self.current != self.full:
            self._switch(self.full, None)

    def _switch(self, threads: int, share: float | None) -> None:
        self._toward = None
        self._set_threads(threads)
        if self._own_cpus is not None:
            self._set_cpus(set(START_CPUS) if threads < self.full else self._own_cpus)
        self.current = self.state["now"] = threads
        if threads < self.full:
            log.info("the cores are contended (%s waited for one %.0f%% of the time it wanted one): "
                     "computing with %d torch thread%s instead of %d until they are free", self.name,
                     100 * (share or 0), threads, "s" * (threads > 1), self.full)
        else:
            log.info("%s: computing with its %d torch threads again", self.name, threads)


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
