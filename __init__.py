"""nanoswarm: peer-to-peer volunteer compute sharing for GPT inference."""

import os as _os

__version__ = "0.1.0"

# The CPUs this process may run on, read on import, before torch loads: with OMP_PROC_BIND set
# (the local harness sets it for its nodes: node/cluster.py), libgomp binds the main thread to
# its first place when torch loads, and threads started after that (ZeroMQ's) inherit that one
# core unless told otherwise (node/daemon.py).
def _start_cpus() -> frozenset[int]:
    try:
        return frozenset(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else frozenset()
    except OSError:  # a sandbox that refuses the call: no binding, nothing handed back
        return frozenset()


START_CPUS: frozenset[int] = _start_cpus()


def openmp_defaults(env: dict | None = None) -> dict:
    """OpenMP wait settings for processes that share cores with other nanoswarm processes.

    libgomp reads them once, when torch loads, so they are set on import of this package (before
    any torch import of ours). An idle OpenMP worker spins for GOMP_SPINCOUNT iterations (here
    30,000) before it sleeps: ~0.4 ms on the Intel test VM (~13 ns an iteration; longer on the
    AMD one, where 10,000 took ~0.35 ms). Long enough to stay awake between the parallel regions
    of one forward pass, which in a node woken with cold caches can be a few tenths of a
    millisecond apart: with 10,000 (~0.13 ms on the Intel VM) a node's worker was put to sleep and
    woken again 8-16 times in a 3-block decode step, and a 4-stage swarm's token took ~6% longer
    (one process ~4%: docs/performance.md). Short enough that a node idle between tokens gives its
    core back: libgomp's own default (300,000) kept every idle node spinning, and
    OMP_WAIT_POLICY=PASSIVE (sleep at once) pays a wake-up per region. The price: a worker spins
    where it slept before, within a pass and for that long after it, CPU that other processes on
    the same cores do not get (~1 ms more a decode step a node here; a local swarm of stages that
    compute for less than the spin, such as the tiny test shape's, decoded 3-8% slower than with
    10,000). Values the user set win.
    """
    env = _os.environ if env is None else env
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # runtimes other than libgomp: sleep when idle
    if "GOMP_SPINCOUNT" not in env and env.get("OMP_WAIT_POLICY") == "PASSIVE":
        env["GOMP_SPINCOUNT"] = "30000"
    return env


def onednn_defaults(env: dict | None = None) -> dict:
    """Bounds on the caches of compiled kernels that oneDNN (float32 linear layers on a CPU:
    shards/model.py) and its wrapper ideep keep, one set per input shape, so per prompt length.

    With their defaults (1,024 entries each) a node that served 300 prompt lengths through 3
    GPT-2-small blocks grew by ~1.2 GB; with 32 each it stays within ~110 MB, and a kernel made
    again costs ~1.5 ms (docs/performance.md). Both are read when oneDNN first runs, so they are
    set on import of this package too. Values the user set win.
    """
    env = _os.environ if env is None else env
    env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    env.setdefault("LRU_CACHE_CAPACITY", "32")  # ideep's cache of the same kernels
    return env


def runtime_defaults(env: dict | None = None) -> dict:
    """openmp_defaults and onednn_defaults: what every nanoswarm process should start with."""
    return onednn_defaults(openmp_defaults(env))


runtime_defaults()
