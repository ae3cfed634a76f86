"""Which cores a local swarm's nodes compute on.

A forward pass on a CPU runs as a team of OpenMP threads that meet at a barrier after every
parallel region, so a region takes as long as its slowest thread. When several nodes share a
machine, Linux sometimes wakes a node's worker thread on the core its main thread already runs
on (the other core was busy for a moment: another node's thread finishing, a ZeroMQ thread), and
it leaves the two there for the rest of the pass: one computes while the other waits for the core
or spins at the barrier. On the 2-core test VM about one 128-token prefill pass in two, on a
random node of a 4-stage swarm, took 28-50 ms instead of 16-18, its two threads each 5-18 ms
runnable but not running (docs/performance.md). Binding each OpenMP thread of a node to a core of
its own (OMP_PLACES, OMP_PROC_BIND) makes that impossible.

libgomp reads the binding once, when torch loads, and binds the main thread at once: threads
started after that inherit the main thread's single core, so ZeroMQ's I/O threads are given back
every core the process started with (`float_io_threads`).
"""

from __future__ import annotations

import os

import zmq

from nanoswarm import START_CPUS


def openmp_places(index: int, threads: int, cpus: list[int]) -> str:
    """OMP_PLACES for the `index`-th node of a local swarm: one core for each of its `threads`
    OpenMP threads, taken in turn from `cpus` (so nodes share cores only when there are more
    threads than cores)."""
    n = len(cpus)
    return ",".join(f"{{{cpus[(index * threads + j) % n]}}}" for j in range(min(threads, n)))


# Variables by which a user binds OpenMP threads themselves (libgomp's, the standard's, Intel's).
BINDING_VARS = ("OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def bind_openmp(env: dict, index: int, threads: int | None) -> dict:
    """Set the OpenMP binding of the `index`-th node, which runs `threads` torch threads, in
    `env` (the environment it will start with), unless binding is off (NANOSWARM_BIND=0), the
    environment already binds (the user's choice wins), or the node runs one thread (nothing to
    keep apart, and a bound single thread could not move off a busy core) or torch's default
    (None: how many that is depends on torch's count of physical cores)."""
    if env.get("NANOSWARM_BIND", "1") == "0" or any(k in env for k in BINDING_VARS):
        return env
    cpus = sorted(START_CPUS)  # not this thread's own, which OpenMP may have bound to one core
    if threads is None or threads < 2 or len(cpus) < 2:
        return env
    env["OMP_PLACES"] = openmp_places(index, threads, cpus)
    env["OMP_PROC_BIND"] = "close"
    return env


def float_io_threads(ctx: zmq.Context) -> None:
    """Let `ctx`'s I/O threads run on every core this process started with, not only on the one
    OpenMP bound the main thread to (they would wait behind the forward pass it runs). Call it
    before the context's first socket: libzmq starts its threads then."""
    if START_CPUS and hasattr(os, "sched_getaffinity") and os.sched_getaffinity(0) != START_CPUS:
        for cpu in sorted(START_CPUS):
            ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)


def child_cpus(env: dict) -> frozenset[int] | None:
    """The cores a child process should start on instead of the calling thread's: a forked child
    inherits the affinity of the thread that forked it, and where this process loaded torch with
    an OpenMP binding (one of BINDING_VARS in its environment) that thread may be bound to one
    core, so every node would compute on it. Then the cores this package saw at import; None to
    leave the child as forked (no binding here, NANOSWARM_BIND=0 in `env`, or a restriction the
    user made on purpose)."""
    if (env.get("NANOSWARM_BIND", "1") == "0" or not START_CPUS or not hasattr(os, "sched_getaffinity")
            or not any(k in os.environ for k in BINDING_VARS)):
        return None
    return START_CPUS if os.sched_getaffinity(0) != START_CPUS else None
