"""A swarm model's links read while it sits idle (`IdleReads`).

A client reads its links' monitor events, closes the links that dropped and hold nothing, and
closes the sessions of streams dropped unfinished, at each session step (`Swarm.drain_events`).
A `SwarmModel` that sat idle between generations did none of it: a link knocking at an address
where a node of another key now listens queued ~40 events a second (~21 MB an hour, review198)
and knocked all the while, and a stream dropped during another thread's step held its nodes'
sessions and KV caches until the model's next use or their idle timeout. So a thread of the
model's own reads them every IDLE_READ_SECONDS, when no other thread holds the model's lock: the
sockets are then this thread's, as a generating thread's are during its step (ZeroMQ lets a
socket move between threads with a full memory barrier, which the lock is). It never waits for
the lock: a thread that holds it is stepping, and reads them itself.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import SwarmModel

log = logging.getLogger(__name__)

IDLE_READ_SECONDS = 10.0  # a knocking link's unread events stay under ~60 KB


class IdleReads:
    """A daemon thread that reads `model`'s links now and then (`read_idle_links`) until the
    model is closed (`stop`) or collected: it holds the model weakly, so a model dropped unclosed
    is not kept alive by it."""

    def __init__(self, model: SwarmModel):
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=_read_until_stopped,
                                       args=(weakref.ref(model), self._stopped, IDLE_READ_SECONDS),
                                       name="nanoswarm-idle-reads", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stopped.set()


def _read_until_stopped(ref: weakref.ref, stopped: threading.Event, every: float) -> None:
    while not stopped.wait(every):
        model = ref()
        if model is None:
            return
        if read_idle_links(model) and model.swarm is not None and model.swarm.has_abandoned:
            # A stream stopped by its caller while this thread held the lock could not take it,
            # and left its sessions to be closed later (review205): at once, not a read later.
            read_idle_links(model)
        del model  # (not held between reads: the model may be collected meanwhile)


def read_idle_links(model: SwarmModel) -> bool:
    """Read `model`'s links (Swarm.drain_events) if no thread holds its lock; whether it did."""
    lock = model._lock
    if not lock.acquire(blocking=False):
        return False
    try:
        if model.closed or model.swarm is None:
            return False
        model.swarm.drain_events()
        return True
    except Exception as e:  # noqa: BLE001 - a thread of no caller's: the next step reads them again
        # (its text, not the error: a handler that keeps records would keep the model alive
        # through the error's traceback, review205)
        log.warning("reading an idle model's links: %s", repr(e))
        return False
    finally:
        lock.release()
