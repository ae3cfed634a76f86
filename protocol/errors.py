"""Error codes: the stable names a peer puts in an `error` reply (docs/protocol.md lists them)."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    MALFORMED = "malformed"                # not msgpack, header not a map, a field missing or ill-typed
    BAD_VERSION = "bad_version"            # protocol version we do not speak
    UNKNOWN_TYPE = "unknown_type"          # message type we do not know
    BAD_TENSOR = "bad_tensor"              # tensor frame count, dtype or byte length does not match
    BAD_SHAPE = "bad_shape"                # tensor shape does not fit the model or the request
    BAD_VALUE = "bad_value"                # NaN or Inf in a tensor
    BAD_POSITION = "bad_position"          # position negative, a gap, or a repeat (past max_length: too_large)
    UNKNOWN_SESSION = "unknown_session"    # no such session on this node
    SESSION_CLOSED = "session_closed"      # the session was closed or expired
    WRONG_MODEL = "wrong_model"            # request names another model id
    NOT_SERVED = "not_served"              # blocks or heads this node does not serve
    TOO_LARGE = "too_large"                # message, step or session over a configured maximum
    BUSY = "busy"                          # capacity limit (sessions, KV memory, requests in flight)
    DUPLICATE_REQUEST = "duplicate_request"  # request id already seen from this peer
    LEAVING = "leaving"                    # node is shutting down; move elsewhere
    RELAY_FAILED = "relay_failed"          # the next hop of a relayed step could not be reached or refused it
    INTERNAL = "internal"                  # a bug on the node; the node keeps serving


MAX_SHOWN = 300  # characters of a peer's text shown to the user (a header may hold ~64 KiB of it)


def shown(text: object, limit: int = MAX_SHOWN) -> str:
    """A peer's text (an error's code and message, a field of its `info`) made safe for a
    terminal and a log line: at most `limit` characters, and any character that is not printable
    (ESC, which starts a terminal's escape sequences; newlines that would forge log lines; bidi
    overrides) written as its escape, so `\\x1b[2J` is shown and not obeyed."""
    text = str(text)
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in cut)
    return cut + ("..." if len(text) > limit else "")


class ProtocolError(Exception):
    """A request (or reply) that cannot be served, with the code to send back."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
