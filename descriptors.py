"""A process's file descriptors: the limit raised where the system allows, and words for running
out of them.

Every link is a ZeroMQ socket, and every connection a node accepts takes a descriptor. A node at
its limit accepted nothing more, and libzmq retried the failed accept at once, a core's worth of
CPU for as long as connections waited, with nothing logged; a client at its limit was told that
its peers' contacts were bad, or that nothing listened at them (review141). Many systems start
a process with a soft limit of 1,024 under a hard limit far above it: a node (and, since the
forty-eighth session, every command) takes the hard one (`raise_limit`), as servers commonly do,
and what still runs out is named for what it is.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time

try:
    import resource
except ImportError:  # Windows: no such limits to raise
    resource = None  # type: ignore[assignment]

# Descriptors this close to the limit count as none left (a connect takes a few: socket, pipes).
MARGIN = 4
WARN_EVERY = 60.0  # seconds between a node's warnings that its descriptors ran out
NOTED_FOR = 60.0  # seconds a shortage seen counts for an error that follows it (`explain`)

log = logging.getLogger(__name__)
_noted = -math.inf  # when this process last found itself out of descriptors


class OutOfDescriptors(OSError):
    """This process has no file descriptor left for a socket: nothing a peer did."""


def raise_limit() -> tuple[int, int] | None:
    """Take the hard limit on open files as the soft one: every connection is a descriptor, and at
    the common soft limit of 1024 a thousand idle TCP connections (no handshake needed) left
    libzmq retrying a failed accept at full speed and new clients unanswered (docs/reliability.md).
    (old, new) when raised, else None. Its children inherit it (a local swarm's nodes)."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    # An infinite hard limit is not a soft one every kernel takes (macOS caps it near 10,240).
    for want in ([hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16, 10240]):
        if want <= soft:
            return None
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return soft, want
        except (ValueError, OSError) as e:
            log.debug("open-file limit %d refused: %s", want, e)
    return None


def usage() -> tuple[int, int] | None:
    """(descriptors open, soft limit) of this process, or None where either cannot be read."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1, soft  # less the one listdir itself opened
        except OSError as e:
            if out_of_descriptors(e):  # not even one left to list them with
                return soft, soft
    return None


def shortage() -> str | None:
    """Words for this process being out of descriptors, if it is (within MARGIN of its limit)."""
    global _noted
    used = usage()
    if used is None or used[0] < used[1] - MARGIN:
        return None
    _noted = time.monotonic()
    return f"this process has {used[0]} of its {used[1]} file descriptors open: raise its limit (ulimit -n)"


def out_of_descriptors(e: BaseException) -> bool:
    """Whether `e` (a ZMQError or an OSError) says the process or the system has no descriptor left."""
    return getattr(e, "errno", None) in (errno.EMFILE, errno.ENFILE)


def explain(e: BaseException) -> str | None:
    """What to put before `e`'s line for the user when this process ran out of descriptors on the
    way to it: `e` was caused by it, or a shortage was seen within NOTED_FOR (review143: a route
    that failed for it began "no peer serves layers 3:4", the cause only further on)."""
    if isinstance(e, OutOfDescriptors):
        return None  # it says so itself
    cause: BaseException | None = e
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen and not out_of_descriptors(cause):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if cause is not None and not out_of_descriptors(cause):
        cause = None  # (a chain that loops: nothing found)
    if cause is None and time.monotonic() - _noted > NOTED_FOR:
        return None
    return "this process ran out of file descriptors: raise its limit (ulimit -n)"


def check(e: BaseException) -> None:
    """Raise OutOfDescriptors for an error that says no descriptor is left (`e` as its cause)."""
    global _noted
    if out_of_descriptors(e):
        _noted = time.monotonic()
        used = usage()
        detail = f" ({used[0]} open, the limit is {used[1]})" if used else ""
        out = OutOfDescriptors(f"this process is out of file descriptors{detail}: raise its limit (ulimit -n)")
        out.errno = e.errno  # (its text without OSError's "[Errno 24]": the user reads it as the error line)
        raise out from e


class ShortageWatch:
    """A node's check, on a timer, that it has descriptors left: at its limit it accepts no
    connection more, libzmq retries the accept at once (a core's worth of CPU while connections
    wait), and nothing else says so. Warned at most once a WARN_EVERY."""

    def __init__(self) -> None:
        self._warned = -math.inf

    def check(self) -> None:
        short = shortage()
        if short is not None and time.monotonic() - self._warned >= WARN_EVERY:
            self._warned = time.monotonic()
            log.warning("%s; connections past the limit wait unaccepted, and ZeroMQ spins a core retrying them",
                        short)
