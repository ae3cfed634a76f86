"""Wire formats round-trip within their stated error bounds; float32 is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import SCHEMAS, decode, encode
from nanoswarm.protocol.tensors import (
    Q80_ABS_ERROR,
    Q80_GROUP,
    WIRE_FORMATS,
    abs_max,
    all_finite,
    fits_wire,
    from_frame,
    nbytes_for,
    q80_error_bound,
    to_frame,
)

FP16_MAX = 65504.0
Q80_MAX = float(np.float32(FP16_MAX * 126))  # beyond ~FP16_MAX * 127 the scale overflows float16


def shapes() -> st.SearchStrategy:
    return hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=70)


def arrays(max_abs: float, width: int = 32) -> st.SearchStrategy:
    return shapes().flatmap(lambda shape: hnp.arrays(
        np.float32, shape, elements=st.floats(-max_abs, max_abs, allow_nan=False, width=width)))


def roundtrip(x: torch.Tensor, wire: str) -> torch.Tensor:
    frame = to_frame(x, wire)
    assert len(frame) == nbytes_for(wire, tuple(x.shape))
    return from_frame(bytes(frame), wire, tuple(x.shape)).float()


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "q80"])
@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 5),
    lambda: torch.randn(5, 3).t(),                     # not contiguous
    lambda: torch.randn(3, 5, requires_grad=True),     # numpy() refuses it
    lambda: torch.randn(3, 5).half(),                  # another dtype than the wire's
    lambda: torch.randn(3, 5).bfloat16(),              # no numpy dtype at all
    lambda: torch.zeros(0, 5),                         # empty
], ids=["plain", "transposed", "grad", "half", "bf16", "empty"])
def test_any_tensor_makes_a_frame(make, wire):
    """to_frame's fast path (numpy() of the tensor as it is) falls back for everything it cannot take."""
    t = make()
    back = from_frame(to_frame(t, wire), wire, tuple(t.shape))
    assert back.shape == t.shape
    if t.numel():
        ref = t.detach().float()
        assert float((back.float() - ref).abs().max()) <= 0.05 * float(ref.abs().max())


@settings(max_examples=100, deadline=None)
@given(arrays(float(np.finfo(np.float32).max)))
def test_float32_is_exact(a):
    x = torch.from_numpy(a)
    y = roundtrip(x, "float32")
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))  # bit for bit, -0.0 included


@settings(max_examples=100, deadline=None)
@given(arrays(FP16_MAX))
def test_float16_within_half_an_ulp(a):
    x = torch.from_numpy(a)
    err = (roundtrip(x, "float16") - x).abs()
    assert bool((err <= x.abs() * 2.0**-11 + 2.0**-25).all())  # round to nearest, 11-bit mantissa


@settings(max_examples=100, deadline=None)
@given(arrays(float(np.float32(3.0e38))))
def test_bfloat16_within_half_an_ulp(a):
    x = torch.from_numpy(a)
    err = (roundtrip(x, "bfloat16") - x).abs()
    assert bool((err <= x.abs() * 2.0**-8 + 2.0**-133).all())  # 8-bit mantissa, float32's range


def _q80_groups(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % Q80_GROUP
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, Q80_GROUP)


@settings(max_examples=150, deadline=None)
@given(arrays(Q80_MAX))
def test_q80_within_one_step_of_its_group(a):
    x = torch.from_numpy(a)
    y = roundtrip(x, "q80")
    assert y.shape == x.shape
    err = _q80_groups(y - x).abs()
    bound = _q80_groups(x).abs().amax(dim=1, keepdim=True) / 127 + Q80_ABS_ERROR
    assert bool((err <= bound).all())
    assert float((y - x).abs().max()) <= q80_error_bound(x)


@settings(max_examples=100, deadline=None)
@given(shapes(), st.floats(1e-3, 3e3), st.integers(0, 2**31))
def test_q80_relative_bound_for_activation_sized_groups(shape, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale
    groups = _q80_groups(x)
    absmax = groups.abs().amax(dim=1, keepdim=True)
    err = _q80_groups(roundtrip(x, "q80") - x).abs()
    assert bool((err[absmax[:, 0] >= 1e-3] <= absmax[absmax[:, 0] >= 1e-3] / 127).all())


@pytest.mark.parametrize("wire", WIRE_FORMATS)
def test_bytes_per_format(wire):
    x = torch.randn(1, 3, 768)
    sizes = {"float32": 4 * 2304, "float16": 2 * 2304, "bfloat16": 2 * 2304, "q80": 2304 // 32 * 34}
    assert len(to_frame(x, wire)) == nbytes_for(wire, (1, 3, 768)) == sizes[wire]


@pytest.mark.parametrize("wire", WIRE_FORMATS)
def test_through_a_message(wire):
    x = torch.randn(2, 5, 33) * 10
    msg = decode([bytes(f) for f in encode("result", 7, {}, [x], wire)])
    y = msg.tensors[0].float()
    bound = {"float32": 0.0, "float16": float(x.abs().max()) * 2.0**-11,
             "bfloat16": float(x.abs().max()) * 2.0**-8, "q80": q80_error_bound(x)}[wire]
    assert float((y - x).abs().max()) <= bound


@pytest.mark.parametrize("wire", WIRE_FORMATS)
def test_a_large_tensor_goes_in_parts_and_comes_back_whole(wire):
    """Frames of at most PART_BYTES (ZeroMQ's heartbeats see only whole frames arrive), views of
    the tensor's bytes, not copies; joined on arrival. A wrong frame count is refused."""
    from nanoswarm.protocol.messages import PART_BYTES

    small, x = torch.randn(1, 1, 768), torch.randn(1, 400, 768)  # 3 KB; 1.2 MB in float32, 326 KB in q80
    frames = encode("result", 7, {}, [small, x, small], wire)
    whole = nbytes_for(wire, tuple(x.shape))
    parts = frames[2:-1]
    assert len(parts) == -(-whole // PART_BYTES) and [len(p) for p in parts[:-1]] == [PART_BYTES] * (len(parts) - 1)
    assert sum(len(p) for p in parts) == whole and len(parts) > 1
    msg = decode([bytes(f) for f in frames])
    assert [t.shape for t in msg.tensors] == [small.shape, x.shape, small.shape]
    assert torch.equal(msg.tensors[1], decode(encode("result", 7, {}, [x], wire)).tensors[0])
    if wire == "float32":
        assert torch.equal(msg.tensors[1], x) and torch.equal(msg.tensors[2], small)
        x.view(-1)[0] = 12.5  # the parts view the tensor's memory
        assert torch.frombuffer(parts[0], dtype=torch.float32)[0].item() == 12.5
    for bad in (frames[:-2] + frames[-1:], frames + [b""], [frames[0], *frames[1:2], b"".join(map(bytes, parts)),
                                                          *frames[-1:]]):
        with pytest.raises(ProtocolError, match=r"header describes 3 tensors in \d+ frames"):
            decode(bad)


@pytest.mark.parametrize("wire", WIRE_FORMATS)
def test_wrong_length_is_refused(wire):
    frame = bytes(to_frame(torch.randn(4, 40), wire))
    with pytest.raises(ProtocolError):
        from_frame(frame[:-1], wire, (4, 40))
    with pytest.raises(ProtocolError):
        from_frame(frame, wire, (4, 41))


def test_float32_frame_is_not_a_copy():
    x = torch.randn(1, 1, 768)
    frame = to_frame(x, "float32")
    x[0, 0, 0] = 12.5  # the frame views the tensor's memory: no per-step copy on the hot path
    assert torch.frombuffer(frame, dtype=torch.float32)[0].item() == 12.5


@settings(max_examples=100, deadline=None)
@given(arrays(float(np.finfo(np.float32).max)), st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fast_finite_checks_agree_with_torch(a, bad, dtype):
    x = torch.from_numpy(a).to(dtype)
    if bad is not None:
        x.view(-1)[len(x.view(-1)) // 2] = bad
    assert all_finite(x) == bool(torch.isfinite(x).all())
    want = float(x.float().abs().max())
    got = abs_max(x)
    assert (math.isnan(got) and math.isnan(want)) or got == want


def test_a_half_precision_nodes_own_overflow_is_not_blamed_on_the_wire():
    """A float16 node whose computation overflows answers bad_value saying so, not that float32
    could not carry the result; an input already out of range says that instead."""
    from nanoswarm.node.steps import _unsendable
    from nanoswarm.protocol.tensors import to_frame

    x = torch.ones(1, 1, 8, dtype=torch.float16)
    y = torch.ones(1, 1, 8, dtype=torch.float16)
    y[0, 0, 3] = math.inf
    assert _unsendable(x, y, "float32", to_frame(y, "float32")) == \
        "this node's float16 computation overflowed to NaN or Inf"
    x[0, 0, 0] = math.inf
    assert "this node's float16 (values beyond 65504 overflow)" in _unsendable(x, y, "float32", to_frame(y, "float32"))
    big = torch.full((1, 1, 8), 1e6)  # a float32 node's finite result that float16 cannot carry
    assert _unsendable(big, big, "float16", to_frame(big, "float16")) == \
        "the result does not fit float16 (overflow to NaN or Inf)"


@pytest.mark.parametrize("wire,limit", [("float16", FP16_MAX), ("q80", FP16_MAX * 127), ("float32", None),
                                        ("bfloat16", None)])
def test_fits_wire_is_the_range_a_format_carries(wire, limit):
    """What a node refuses to send (bad_value): q80 carries a float16 scale times 127, so its
    range is 127x float16's; float32 and bfloat16 carry any finite float32."""
    assert fits_wire(torch.full((1, 1, 8), 3.0e38), wire) is (limit is None)
    if limit is not None:
        assert fits_wire(torch.full((1, 1, 8), -limit), wire)
        assert torch.isfinite(roundtrip(torch.full((1, 1, 8), -limit), wire)).all()
        # (within a few parts in a thousand: q80 limited at 128x float16 took values whose float16
        # scale is infinite, review204)
        assert not fits_wire(torch.full((1, 1, 8), -limit * 1.005), wire)
    for bad in (math.nan, math.inf):
        x = torch.ones(1, 1, 8)
        x[0, 0, 5] = bad
        assert not fits_wire(x, wire)


# Values a msgpack header can hold, of every type a schema names and some it names nowhere.
_FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                          st.text(max_size=8), st.binary(max_size=4), st.lists(st.integers(0, 3), max_size=2),
                          st.dictionaries(st.text(max_size=2), st.integers(-2**63, 2**63), max_size=1))
# Strings short and near the 64 characters a session id may have.
_TEXT = st.one_of(st.text(max_size=8), st.text(min_size=63, max_size=66))
_VALID = {int: st.integers(0, 2**31), str: _TEXT, list: st.lists(st.integers(0, 3), max_size=2),
          bool: st.booleans(), float: st.floats(allow_nan=False), type(None): st.none()}


@st.composite
def _headers(draw) -> tuple[str, dict]:
    """A message type and fields its schema takes (every required one, some optional ones), then
    up to two of them broken: dropped, or given a value of any type."""
    msg_type = draw(st.sampled_from(["step", "step", "step", "partial", "open", "admit", "result", "error"]))
    fields = {name: draw(st.one_of([_VALID[t] for t in types]))
              for name, (types, required) in SCHEMAS[msg_type].items() if required or draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from([*sorted(fields), "other"]), max_size=2)):
        if draw(st.booleans()):
            fields.pop(name, None)
        else:
            fields[name] = draw(st.one_of(_FIELD_VALUES, _TEXT))
    return msg_type, fields


def _schema_says(msg_type: str, fields: dict) -> str | None:
    """What the schema refuses in `fields`: the first wrong field in the schema's order, or None."""
    for name, (types, required) in SCHEMAS[msg_type].items():
        if name not in fields:
            if required:
                return f"field {name!r} is missing"
            continue
        value = fields[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"field {name!r} must be"
    for name in ("session", "from"):
        if isinstance(fields.get(name), str) and len(fields[name]) > 64 and name in SCHEMAS[msg_type]:
            return f"field {name!r} is a session id"
    return None


@settings(max_examples=500, deadline=None)
@given(_headers())
def test_a_headers_fields_are_refused_exactly_as_their_schema_says(header):
    """What decode takes and refuses of a header's fields, and with which words, is what the
    message type's schema says (protocol/messages.py): a missing required field, a value of a type
    the schema does not name (a bool where an int is asked for), a session id over 64 characters."""
    msg_type, fields = header
    expected = _schema_says(msg_type, fields)
    try:
        decode(encode(msg_type, 7, fields))
    except ProtocolError as e:
        assert e.code is ErrorCode.MALFORMED and expected is not None and expected in e.message, (e.message, expected)
    else:
        assert expected is None


def test_decode_refuses_each_input_a_mutation_of_its_checks_let_through():
    """Untrusted headers and frames that a mutation of each check let through, unnoticed by the
    tests before (review206): each is refused with its code."""
    import msgpack

    from nanoswarm.protocol.messages import (
        MAX_HOPS,
        MAX_TENSORS,
        encode_frames,
        finite_float,
        parse_next,
        parse_range,
        peek_id,
    )  # fmt: skip

    def header(**fields) -> bytes:
        return msgpack.packb({"v": 2, "type": "info", **fields})

    def refused(frames: list, code: ErrorCode, **kw) -> None:
        with pytest.raises(ProtocolError) as e:
            decode(frames, **kw)
        assert e.value.code == code, e.value

    frames = encode("info", 1, {})
    size = sum(len(f) for f in frames)
    refused(frames, ErrorCode.TOO_LARGE, max_message_bytes=size - 1)
    assert decode(frames, max_message_bytes=size).id == 1
    refused([header(id=1, a="x" * 40000, b="y" * 40000)], ErrorCode.TOO_LARGE)  # each field fits, not both
    for bad in (2**63, True, -1):
        refused([header(id=bad)], ErrorCode.MALFORMED)
        assert peek_id(header(id=bad)) == 0
    assert peek_id(header(id=2**63 - 1)) == 2**63 - 1
    nan = torch.full((1, 64), float("nan"))
    for wire in ("float32", "bfloat16", "float16", "q80"):
        refused(encode("result", 1, {}, [nan], wire=wire), ErrorCode.BAD_VALUE, finite=True)
    for spec, data in ((["float32", [-1, -8]], b"\0" * 32), (["float32", [1, 1, 1, 1, 8]], b"\0" * 32),
                       (["int8", [8]], b"\0" * 8), (["float32", [8]], b"\0" * 31)):
        refused(encode_frames("result", 1, {}, [tuple(spec)], [data]), ErrorCode.BAD_TENSOR)
    many = [("float32", [1])] * (MAX_TENSORS + 1)
    refused(encode_frames("result", 1, {}, many, [b"\0" * 4] * len(many)), ErrorCode.BAD_TENSOR)
    with pytest.raises(ProtocolError):
        parse_range([2, 2], 4, "layers")
    assert parse_range([0, 4], 4, "layers") == (0, 4)
    with pytest.raises(ProtocolError):
        parse_next([["c", "s"]] * (MAX_HOPS + 1))
    with pytest.raises(ProtocolError):
        parse_next([["c", "s" * 65]])
    with pytest.raises(ProtocolError):
        parse_next([["c" * 513, "s"]])
    assert parse_next([["c", "s"]] * MAX_HOPS) == [("c", "s")] * MAX_HOPS
    assert not finite_float(True) and finite_float(1) and not finite_float(math.inf)


# Review209: a mutation of node/steps.py that no test caught before.
def test_a_half_precision_nodes_finite_result_the_wire_cannot_carry_blames_the_wire():
    """A bfloat16 node's finite result past float16's range: the wire could not carry it, and the
    refusal says so, not that the node's own computation overflowed."""
    from nanoswarm.node.steps import _unsendable
    from nanoswarm.protocol.tensors import to_frame

    big = torch.full((1, 1, 8), 1e6, dtype=torch.bfloat16)
    assert _unsendable(big, big, "float16", to_frame(big, "float16")) == \
        "the result does not fit float16 (overflow to NaN or Inf)"


# Review228: mutations of protocol/messages.py that passed the tests above.
def test_decode_takes_or_refuses_what_a_mutation_of_its_checks_got_wrong():
    """A reply type sent to a node is `unknown_type` before its fields are looked at (mutation:
    no `types` check, and an `opened` without its session was `malformed`); a session id field a
    type does not have is no session id, whatever its length (mutation: without `name in
    schema`, an `open` with a long unknown `session` was refused); a dimension of 2**31 is refused
    even in an empty tensor (mutation: without `< 2**31`, [0, 2**31] was taken); and the id of a
    header over MAX_HEADER_BYTES is not looked for (mutation: `peek_id` unpacked it anyway)."""
    import msgpack

    from nanoswarm.protocol.messages import MAX_HEADER_BYTES, REQUEST_TYPES, encode_frames, peek_id

    with pytest.raises(ProtocolError) as e:
        decode(encode("opened", 1, {}), types=REQUEST_TYPES)
    assert e.value.code is ErrorCode.UNKNOWN_TYPE
    assert decode(encode("open", 1, {"max_length": 8, "session": "s" * 65})).fields["session"] == "s" * 65
    with pytest.raises(ProtocolError) as e:
        decode(encode_frames("result", 1, {}, [("float32", [0, 2**31])], [b""]))
    assert e.value.code is ErrorCode.BAD_TENSOR
    assert decode(encode_frames("result", 1, {}, [("float32", [0, 2**31 - 1])], [b""])).specs[0][1] == (0, 2**31 - 1)
    big = msgpack.packb({"v": 2, "id": 5, "type": "info", "pad": "x" * MAX_HEADER_BYTES})
    assert len(big) > MAX_HEADER_BYTES and peek_id(big) == 0
    assert peek_id(msgpack.packb({"v": 2, "id": 5, "type": "info", "pad": "x" * 100})) == 5
