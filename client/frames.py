"""Whole messages through interrupts: a client's sends and reads that Ctrl-C cannot cut in two.

pyzmq sends and reads a message's frames one call each, so Ctrl-C (or the CLI's SIGTERM) can land
between them. Cut short, a sent message waited on the socket for the rest and the next request
went out as its tail (the node refused the whole: a stream's `close` lost, a step sent again timed
out and a healthy node was banned); a read one left the rest to be read as the next reply
(nonsense: bad_reply, a ban), or as the next monitor event, which pyzmq cannot parse (reviews). So
the message is finished before the interrupt goes on.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq


def _finish(rest: Callable[[], object]) -> None:
    """Do `rest` of a message an interrupt cut short, through further interrupts (the first is
    raised once it is done); a ZeroMQ error (a closed socket, no room) ends it."""
    for _ in range(8):
        try:
            rest()
            return
        except zmq.ZMQError:
            return
        except BaseException:
            continue


def send_whole(socket: zmq.Socket, frames: list) -> None:
    """send_multipart without blocking (zmq.Again: no room, nothing sent: libzmq takes a
    message's other parts with its first). One cut short is ended by an empty last frame, a
    message the node refuses on its own (its reply is a late one, dropped); if it had ended, the
    frame alone is one."""
    try:
        socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
    except zmq.ZMQError:
        raise
    except BaseException:
        _finish(lambda: socket.send(b"", zmq.NOBLOCK))
        raise


def recv_whole(socket: zmq.Socket, copy: bool = False) -> list:
    """One message's frames; the rest of one cut short is skipped."""
    def skip_rest() -> None:
        while socket.getsockopt(zmq.RCVMORE):
            socket.recv(copy=False)

    try:
        return socket.recv_multipart(copy=copy)
    except zmq.ZMQError:
        raise
    except BaseException:
        _finish(skip_rest)
        raise
