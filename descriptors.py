"""A process's file descriptors: the limit raised where the system allows, and words for running
out of them.

Every link is a ZeroMQ socket, and every connection a node accepts takes a descriptor. A node at
its limit accepted nothing more, and libzmq retried the failed accept at once, a core's worth of
CPU for as long as connections waited, with nothing logged; a client at its limit was told that
its peers' contacts were bad, or that nothing listened at them (review141). Many systems start
a process with a soft limit of 1,024 under a hard limit far above it: the command line takes the
hard one (`raise_limit`), as servers commonly do, and what still runs out is named for what it is.
"""

from __future__ import annotations

import errno
import os

try:
    import resource
except ImportError:  # Windows: no such limits to raise
    resource = None  # type: ignore[assignment]

# A soft limit raised this far at most: far above a node's 64 gossip links, 64 relay links and
# thousands of clients, and below what an "unlimited" hard limit would let a runaway take.
RAISE_TO = 1 << 16
# Descriptors this close to the limit count as none left (a connect takes a few: socket, pipes).
MARGIN = 4


class OutOfDescriptors(OSError):
    """This process has no file descriptor left for a socket: nothing a peer did."""


def raise_limit() -> tuple[int, int] | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (at most RAISE_TO); (old, new)
    when raised, else None. Its children inherit it (a local swarm's nodes)."""
    if resource is None:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = RAISE_TO if hard == resource.RLIM_INFINITY else min(hard, RAISE_TO)
        if soft == resource.RLIM_INFINITY or soft >= target:
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    except (OSError, ValueError):  # a sandbox that refuses: the limit stays
        return None


def usage() -> tuple[int, int] | None:
    """(descriptors open, soft limit) of this process, or None where either cannot be read."""
    if resource is None:
        return None
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            count = len(os.listdir(folder)) - 1  # less the one listdir itself opened
            break
        except OSError:
            continue
    else:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (count, soft) if soft != resource.RLIM_INFINITY else None


def shortage() -> str | None:
    """Words for this process being out of descriptors, if it is (within MARGIN of its limit)."""
    used = usage()
    if used is None or used[0] < used[1] - MARGIN:
        return None
    return f"this process has {used[0]} of its {used[1]} file descriptors open: raise its limit (ulimit -n)"


def out_of_descriptors(e: BaseException) -> bool:
    """Whether `e` (a ZMQError or an OSError) says the process or the system has no descriptor left."""
    return getattr(e, "errno", None) in (errno.EMFILE, errno.ENFILE)


def check(e: BaseException) -> None:
    """Raise OutOfDescriptors for an error that says no descriptor is left (`e` as its cause)."""
    if out_of_descriptors(e):
        used = usage()
        detail = f" ({used[0]} open, the limit is {used[1]})" if used else ""
        raise OutOfDescriptors(e.errno, f"this process is out of file descriptors{detail}: raise its limit "
                               "(ulimit -n)") from e
