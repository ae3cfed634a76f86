"""Messages: a msgpack header frame plus each tensor's raw bytes, in frames of at most PART_BYTES.

Header: {"v": PROTOCOL_VERSION, "id": request id, "type": message type, ...fields,
         "tensors": [[wire format, [shape...]], ...]}
Replies carry the request's id. docs/protocol.md describes every type and field.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .errors import ErrorCode, ProtocolError
from .tensors import (
    WIRE_FORMATS,
    Buffer,
    all_finite,
    check_frame,
    frame_finite,
    frame_tensor,
    from_frame,
    nbytes_for,
    to_frame,
)

PROTOCOL_VERSION = 2  # 2: a tensor of more than PART_BYTES comes in several frames
# A tensor's bytes go in consecutive frames of PART_BYTES, the last holding the rest. ZeroMQ's
# heartbeats (client/transport.py) count only whole frames as signs of life: one frame of a
# long prompt's hidden states took longer than a heartbeat on a slow link, and the link was
# dropped mid-transfer (2.5 MB over 1 Mbit/s: 21 s). A part takes 2 s at 1 Mbit/s.
PART_BYTES = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_DIMS = 4
MAX_HOPS = 64  # entries of a relayed step's `next`
MAX_TENSORS = MAX_HOPS + 1  # a relayed step carries the outputs of the hops before it
MAX_ID_CHARS = 64  # a session id (nodes issue 40 hex digits); a reply that repeats one stays small
MAX_CONTACT_CHARS = 512  # a contact named in a relayed step's `next` or an `admit`'s pin
_ID_FIELDS = ("session", "from")

_INT = (int,)
_STR = (str,)
_LIST = (list,)
_BOOL = (bool,)
_OPT_STR = (str, type(None))
_OPT_LIST = (list, type(None))

# type -> {field: (allowed python types, required)}. Checked before anything reads the fields.
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    # requests
    "info": {"manifest": (_BOOL, False)},  # true: the reply carries the model's manifest
    "forward": {"model_id": (_OPT_STR, False), "layers": (_OPT_LIST, False), "wire": (_OPT_STR, False)},
    "open": {"model_id": (_OPT_STR, False), "max_length": (_INT, True),
             "layers": (_OPT_LIST, False),
             # the heads the client takes from the node, all for a layer stage (handler `_check_heads`)
             "heads": (_OPT_LIST, False)},
    "step": {"session": (_STR, True), "pos": (_INT, True),
             "phase": (_OPT_STR, False), "block": ((int, type(None)), False),
             "wire": (_OPT_STR, False),
             # relay (node/relay.py): the id the chain's replies carry, the hops after this node,
             # and this node's place in the chain
             "reply": ((int, type(None)), False), "next": (_OPT_LIST, False),
             "hop": ((int, type(None)), False), "busy": (_OPT_LIST, False), "rewind": (_BOOL, False),
             "trail": (_BOOL, False), "from": (_OPT_STR, False),
             # the reply to the client carries only the last `last` positions of the output (of
             # the last hop's, if relayed): all a client sampling the next token needs
             "last": ((int, type(None)), False),
             # a head group's all-reduce (node/all_reduce.py): every member's [contact, session],
             # in member order, this member's index, and how long it waits for another's partial
             "group": (_OPT_LIST, False), "member": ((int, type(None)), False),
             "wait": ((float, int, type(None)), False),
             # an all-reduce step's rewind number (0 until its session's first rewind): a
             # rewound one names a greater one than any before it, and its partials carry it
             "epoch": ((int, type(None)), False)},
    # a member's partial sum of one phase of an all-reduce step, to another member of its group
    "partial": {"session": (_STR, True), "pos": (_INT, True), "block": (_INT, True), "phase": (_STR, True),
                "member": (_INT, True), "epoch": ((int, type(None)), False)},
    "close": {"session": (_STR, True)},
    # the hop before (its CURVE key, z85, and its session) whose relayed steps the session
    # takes, and the hop after ([contact, session]) it passes them on to; null: none
    "admit": {"session": (_STR, True), "relay_from": (_OPT_LIST, True), "relay_to": (_OPT_LIST, True)},
    "records": {"records": (_LIST, False), "want": (_BOOL, False),
                # a client's request: that model's records only, in pages by peer id
                "model_id": (_OPT_STR, False), "after": (_OPT_STR, False)},
    # replies
    "info_reply": {"peer_id": (_STR, True), "model_id": (_STR, True), "layers": (_LIST, True),
                   "heads": (_OPT_LIST, False)},
    "opened": {"session": (_STR, True), "layers": (_LIST, True),
               "max_tokens_per_step": (_INT, False), "max_message_bytes": (_INT, False),
               "trail_optional": (_BOOL, False), "admits": (_BOOL, False),
               # it takes `last` (a layer step's, an all-reduce step's); an earlier version says nothing
               "last_positions": (_BOOL, False),
               # an `attn` step of the session's first block takes `rewind`; an earlier version says nothing
               "head_rewind": (_BOOL, False),
               # an all-reduce step takes `rewind` (with a greater `epoch`), ending one still running
               "group_rewind": (_BOOL, False),
               # the node's heads; a node of an earlier version says none, nor checks `open`'s
               "heads": (_OPT_LIST, False),
               # it takes a head group's all-reduce steps (`group`); an earlier version says nothing
               "all_reduce": (_BOOL, False)},
    "result": {"busy_us": ((int, type(None)), False), "busy": (_OPT_LIST, False)},
    "closed": {"session": (_STR, True)},
    "admitted": {"session": (_STR, True)},
    # now: the answering node's wall clock (keys/clock.py), so that skewed clocks are told
    "records_reply": {"records": (_LIST, True), "after": (_OPT_STR, False),
                      "now": ((float, int, type(None)), False)},
    "leaving": {"sessions": (_LIST, False)},
    "error": {"code": (_STR, True), "message": (_STR, True)},
}


@dataclass
class Message:
    """A decoded message. Its tensor frames are checked (format, shape, byte length) but become
    torch tensors only when asked for: a node relaying a step passes most of them on untouched."""

    type: str
    id: int
    fields: dict[str, Any] = field(default_factory=dict)
    specs: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # format, shape
    frames: list = field(default_factory=list)  # the tensors' raw buffers

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def tensor(self, i: int) -> torch.Tensor:
        return frame_tensor(self.frames[i], *self.specs[i])  # decode checked its length

    @functools.cached_property
    def tensors(self) -> list[torch.Tensor]:
        return [self.tensor(i) for i in range(len(self.frames))]


def encode(msg_type: str, req_id: int, fields: dict[str, Any] | None = None,
           tensors: list[torch.Tensor] | tuple = (), wire: str = "float32") -> list:
    """Frames for a message; tensor frames are buffers, not copies, where possible."""
    return encode_frames(msg_type, req_id, fields, [(wire, list(t.shape)) for t in tensors],
                         [to_frame(t, wire) for t in tensors])


def encode_frames(msg_type: str, req_id: int, fields: dict[str, Any] | None,
                  specs: list[tuple[str, list[int]]], tensor_frames: list) -> list:
    """Frames for a message whose tensors are encoded already (`specs`: format and shape each),
    e.g. one tensor frame sent in two messages."""
    header = {"v": PROTOCOL_VERSION, "id": req_id, "type": msg_type, **(fields or {})}
    if specs:
        header["tensors"] = [list(spec) for spec in specs]
    return [msgpack.packb(header, use_bin_type=True), *(part for f in tensor_frames for part in _parts(f))]


def _parts(buf: Buffer) -> list:
    """A tensor's frame as the frames it is sent in: itself up to PART_BYTES, else views of
    PART_BYTES (no copies)."""
    view = memoryview(buf)
    if view.nbytes <= PART_BYTES:
        return [buf]
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return [view[i:i + PART_BYTES] for i in range(0, view.nbytes, PART_BYTES)]


def part_count(nbytes: int) -> int:
    """How many frames a tensor of `nbytes` comes in (one, also when empty)."""
    return max(1, -(-nbytes // PART_BYTES))


def error_frames(req_id: int, code: ErrorCode, message: str) -> list:
    return encode("error", req_id, {"code": code.value, "message": message})


def peek_id(header_bytes: bytes) -> int:
    """Best-effort request id of a message that failed to decode, so the error reply can carry it."""
    if len(header_bytes) > MAX_HEADER_BYTES:
        return 0
    try:
        header = msgpack.unpackb(header_bytes, raw=False)  # msgpack bounds lengths by the input's
        rid = header.get("id", 0) if isinstance(header, dict) else 0
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63 else 0
    except Exception:  # any garbage: reply with id 0
        return 0


# What a node takes; every other type is a reply (or a notice) and is `unknown_type` there.
REQUEST_TYPES = frozenset({"info", "forward", "open", "step", "close", "admit", "records", "partial"})
# The reply each request takes (besides `error`): a reply of another type is the peer's nonsense.
REPLY_TYPES = {"info": "info_reply", "forward": "result", "open": "opened", "step": "result",
               "close": "closed", "admit": "admitted", "records": "records_reply"}


def decode(frames: list, max_message_bytes: int | None = None, finite: bool = False,
           types: frozenset[str] | None = None) -> Message:
    """Parse and type-check one message; raises ProtocolError with the code to reply with.
    With `finite`, a tensor holding NaN or Inf is refused too (nodes check theirs after the
    forward pass instead: node/steps.py). With `types`, any other type is `unknown_type`, before
    its fields are looked at (a node takes requests only: REQUEST_TYPES)."""
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED, "empty message")
    if max_message_bytes is not None:
        total = sum(len(f) for f in frames)
        if total > max_message_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"message is {total} bytes, the limit is {max_message_bytes}")
    raw = frames[0]
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header is {len(raw)} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True,  # a zmq.Frame is a buffer
                                 max_bin_len=MAX_HEADER_BYTES, max_str_len=MAX_HEADER_BYTES)
    except Exception as e:  # msgpack raises several types for bad input
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header is not a map")
    version = header.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_VERSION,
                            f"protocol version {version!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    req_id, msg_type = header.get("id"), header.get("type")
    if not isinstance(req_id, int) or isinstance(req_id, bool) or not 0 <= req_id < 2**63:
        raise ProtocolError(ErrorCode.MALFORMED, "field 'id' must be a non-negative integer")
    if not isinstance(msg_type, str):
        raise ProtocolError(ErrorCode.MALFORMED, "field 'type' must be a string")
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type[:64]!r}")
    if types is not None and msg_type not in types:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg_type!r} is a reply, not a request")
    del header["v"], header["id"], header["type"]
    specs = header.pop("tensors", [])
    _check_fields(msg_type, schema, header)  # what is left are the message's own fields
    specs, buffers = _check_tensors(specs, frames[1:], finite)
    return Message(msg_type, req_id, header, specs, buffers)


def _check_fields(msg_type: str, schema: dict, fields: dict) -> None:
    for name, (types, required) in schema.items():
        if name not in fields:
            if required:
                raise ProtocolError(ErrorCode.MALFORMED, f"{msg_type}: field {name!r} is missing")
            continue
        value = fields[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            raise ProtocolError(ErrorCode.MALFORMED,
                                f"{msg_type}: field {name!r} must be {names}, got {type(value).__name__}")
    for name in _ID_FIELDS:  # (two lookups a message, not one test per field: decode is on the hot path)
        value = fields.get(name)
        if isinstance(value, str) and len(value) > MAX_ID_CHARS and name in schema:
            raise ProtocolError(ErrorCode.MALFORMED, f"{msg_type}: field {name!r} is a session id, at most "
                                f"{MAX_ID_CHARS} characters")


def _check_tensors(specs: Any, frames: list, finite: bool) -> tuple[list, list]:
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"'tensors' must be a list of at most {MAX_TENSORS}")
    checked = [_check_spec(spec) for spec in specs]
    sizes = [nbytes_for(wire, shape) for wire, shape in checked]
    counts = [1 if n <= PART_BYTES else part_count(n) for n in sizes]
    if sum(counts) != len(frames):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"header describes {len(specs)} tensors in {sum(counts)} "
                            f"frames (of at most {PART_BYTES} bytes) but {len(frames)} frames came")
    buffers, first = [], 0
    for (wire, shape), size, count in zip(checked, sizes, counts):
        if count == 1:
            buf = frames[first].buffer if hasattr(frames[first], "buffer") else frames[first]
        else:  # one copy, of a long prompt's states only
            buf = b"".join(f.buffer if hasattr(f, "buffer") else f for f in frames[first:first + count])
        first += count
        if len(buf) != size:
            check_frame(buf, wire, shape)  # raises, saying what was expected
        if finite:
            ok = frame_finite(buf, wire)  # numpy on the bytes: no torch call on the hot path
            if not (ok or (ok is None and all_finite(from_frame(buf, wire, shape)))):
                raise ProtocolError(ErrorCode.BAD_VALUE, "tensor holds NaN or Inf")
        buffers.append(buf)
    return checked, buffers


def _check_spec(spec: Any) -> tuple[str, tuple[int, ...]]:
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
            and isinstance(spec[1], list)):
        raise ProtocolError(ErrorCode.BAD_TENSOR, "a tensor spec must be [format, shape]")
    wire, shape = spec[0], tuple(spec[1])
    if wire not in WIRE_FORMATS:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"unknown tensor format {wire[:32]!r}")
    if (len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool)
                                         and 0 <= d < 2**31 for d in shape)):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"bad tensor shape {list(shape[:8])!r}")
    return wire, shape


def parse_range(value: Any, limit: int, what: str) -> tuple[int, int]:
    """A half-open [a, b) range from the wire, checked against 0..limit."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] < value[1] <= limit):
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} must be [a, b) with 0 <= a < b <= {limit}")
    return value[0], value[1]


def parse_next(value: Any, why: str = "a hop in 'next' must be [contact, session]") -> list[tuple[str, str]]:
    """A relayed step's `next`: [[contact, session], ...], at most MAX_HOPS (the contacts are the
    node's to judge: it relays only to peers it knows)."""
    if not isinstance(value, list) or len(value) > MAX_HOPS:
        raise ProtocolError(ErrorCode.MALFORMED, f"'next' must be a list of at most {MAX_HOPS} hops")
    hops = []
    for hop in value:
        if not (isinstance(hop, list) and len(hop) == 2 and isinstance(hop[0], str) and isinstance(hop[1], str)
                and len(hop[0]) <= MAX_CONTACT_CHARS and len(hop[1]) <= MAX_ID_CHARS):
            raise ProtocolError(ErrorCode.MALFORMED, why)
        hops.append((hop[0], hop[1]))
    return hops


def finite_float(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
