"""Socket monitors that cannot stop a ZeroMQ context.

libzmq's I/O thread sends a monitored socket's events (a drop, a retry, a handshake) to the
monitor's reader, an inproc PAIR, and waits while it cannot: when the reader's queue is full, or
when the reader was closed while the socket was still monitored. Waiting, it serves no other
socket of the context, for good: every link of the process stops (the sixty-seventh session
wedged a client so in 75 s idle, its one link knocking at an address that a node of another key
had taken; two tests that closed a reader first wedged CI's pytest workers). So a reader's queue
has no bound (`monitor_socket`), and a socket made a `MonitoredSocket` stops its monitor before it
closes, however it closes: by our code, or by pyzmq when it is collected unclosed (review197).
"""

from __future__ import annotations

import itertools
import weakref

import zmq

_monitors = itertools.count()  # each monitor's inproc endpoint gets a name of its own


class MonitoredSocket(zmq.Socket):
    """A socket whose monitor (`monitor_socket`) is stopped, and its reader closed, before it
    closes. It holds its reader weakly and the reader holds it: no cycle, so a socket dropped
    unclosed is closed at once (by pyzmq's `__del__`), not at the next collection."""

    _reader: weakref.ref | None = None  # (declared: pyzmq takes other attribute names for options)

    @property
    def reader(self) -> zmq.Socket | None:
        return self._reader() if self._reader is not None else None

    def close(self, linger: int | None = None) -> None:
        if not self.closed:
            stop_monitor(self)
        super().close(linger=linger)


class MonitorReader(zmq.Socket):
    """A monitor's reader that stops its socket's monitor before it closes: garbage collection
    may close a dropped socket's reader first (it keeps the socket alive till then)."""

    owner: MonitoredSocket | None = None

    def close(self, linger: int | None = None) -> None:
        owner, self.owner = self.owner, None
        # (its reader, or none: a collection of a cycle holding both clears the socket's weak
        # reference first, then closes them in any order)
        if owner is not None and not owner.closed and owner.reader in (self, None):
            owner._reader = None
            try:
                owner.disable_monitor()
            except zmq.ZMQError:
                pass
        super().close(linger=linger)


def monitor_socket(socket: zmq.Socket, events: int) -> zmq.Socket:
    """A reader of `socket`'s monitor `events`, its queue unbounded: events wait there until read,
    and whoever holds a link reads them (an idle one knocking at a refusing address makes ~40 a
    second, ~6 KB). pyzmq's own name for the monitor's inproc endpoint is the socket's
    descriptor number, which a new socket may take while the endpoint of a closed one is still
    bound (libzmq unbinds it when it reaps the monitor, later): CI's suite saw a link fail to open
    with "Address already in use" (the forty-sixth session)."""
    endpoint = f"inproc://nanoswarm-monitor-{next(_monitors)}"
    socket.monitor(endpoint, events)
    reader = socket.context.socket(zmq.PAIR, socket_class=MonitorReader)
    reader.setsockopt(zmq.RCVHWM, 0)  # (before connecting: the inproc pipe's bound is set then)
    reader.setsockopt(zmq.LINGER, 0)
    reader.connect(endpoint)
    if isinstance(socket, MonitoredSocket):
        socket._reader, reader.owner = weakref.ref(reader), socket
    return reader


def stop_monitor(socket: zmq.Socket, reader: zmq.Socket | None = None) -> None:
    """Stop `socket`'s monitor, then close its reader (`socket.reader` by default): the one safe
    order, whatever closes `socket` next."""
    if isinstance(socket, MonitoredSocket):
        reader, socket._reader = reader if reader is not None else socket.reader, None
    try:
        socket.disable_monitor()
    except zmq.ZMQError:  # never monitored, or closed meanwhile
        pass
    if reader is not None:
        if isinstance(reader, MonitorReader):
            reader.owner = None  # (stopped already)
        reader.close(linger=0)
