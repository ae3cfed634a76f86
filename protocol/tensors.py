"""Tensors on the wire: each tensor's raw bytes, described in the header (sent in frames of at
most 256 KiB: protocol/messages.py).

Wire formats:
- float32, float16, bfloat16: the tensor's bytes, little-endian, C order. float32 is exact.
- q80: blockwise int8 like distributed-llama's Q80: groups of 32 values share one float16 scale
  (absmax / 127). The frame is all scales (float16) followed by all int8 values; the element
  count is padded to a multiple of 32 with zeros. Error per element <= absmax(group) / 127 +
  2**-17 (Q80_ABS_ERROR: a float16 scale below 2**-14 loses precision and one under 2**-25 is
  0, so a group of values all below ~4e-6 decodes to zeros); for activations the first term
  dominates.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .errors import ErrorCode, ProtocolError

# A frame as received or sent: bytes, or anything else with the buffer protocol (zmq.Frame).
Buffer = bytes | bytearray | memoryview

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIRE_FORMATS = (*TORCH_DTYPES, "q80")
Q80_GROUP = 32

# torch.frombuffer warns on read-only buffers (ZeroMQ frames are); we never write into them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def nbytes_for(wire: str, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    if wire == "q80":
        groups = -(-n // Q80_GROUP)
        return groups * 2 + groups * Q80_GROUP
    return n * TORCH_DTYPES[wire].itemsize


def to_frame(t: torch.Tensor, wire: str = "float32") -> memoryview:
    """A buffer for `t` in the wire format, without copying when it is already contiguous CPU
    data of that dtype (ZeroMQ sends buffer-protocol objects as they are)."""
    if wire == "q80":
        return _q80_encode(t) if t.numel() else memoryview(b"")
    dtype = TORCH_DTYPES[wire]
    # The hot path (a float32 step on CPU) takes two torch calls: every call costs tens of us
    # when the process wakes with cold caches (docs/performance.md). numpy() refuses tensors on
    # a GPU, with grad, or in bfloat16; the cast refuses non-contiguous and empty ones.
    if t.dtype is dtype:
        try:
            return memoryview(t.numpy()).cast("B")
        except (TypeError, RuntimeError):
            pass
    if t.numel() == 0:  # memoryview cannot cast an empty shape
        return memoryview(b"")
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
        t = t.to("cpu", dtype).contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bits as int16
        t = t.view(torch.int16)
    # Not bytes(t.untyped_storage()): that is a per-element Python loop (ms per KB).
    return memoryview(_numpy(t)).cast("B")


def _numpy(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (detached only when it has to be: one call less)."""
    return (t.detach() if t.requires_grad else t).numpy()


def check_frame(buf: Buffer, wire: str, shape: tuple[int, ...]) -> None:
    """A frame's byte length must be what its format and shape need."""
    expected = nbytes_for(wire, shape)
    if len(buf) != expected:
        raise ProtocolError(ErrorCode.BAD_TENSOR,
                            f"tensor frame has {len(buf)} bytes, {wire}{list(shape)} needs {expected}")


def from_frame(buf: Buffer, wire: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor in `buf` (bytes, memoryview or zmq.Frame buffer); float32 for q80."""
    check_frame(buf, wire, shape)
    return frame_tensor(buf, wire, shape)


def frame_tensor(buf: Buffer, wire: str, shape: tuple[int, ...]) -> torch.Tensor:
    """from_frame for a frame whose length was checked already (protocol/messages.py decode)."""
    if len(buf) == 0:
        return torch.zeros(shape, dtype=torch.float32 if wire == "q80" else TORCH_DTYPES[wire])
    if wire == "q80":
        return _q80_decode(buf, shape)
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[wire]).view(shape)


def frame_dtype(wire: str) -> torch.dtype:
    """The dtype of the tensor frame_tensor makes from a frame of `wire` format."""
    return TORCH_DTYPES.get(wire, torch.float32)  # q80 decodes to float32


def _q80_encode(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu", torch.float32).reshape(-1)
    pad = (-flat.numel()) % Q80_GROUP
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, Q80_GROUP)
    scale = (groups.abs().amax(dim=1) / 127.0).to(torch.float16)
    # Divide by the scale the receiver multiplies with (a subnormal float16 one too); a zero
    # scale means the group is (nearly) all zeros: any divisor gives q = 0.
    safe = torch.where(scale > 0, scale.float(), 1.0)
    q = torch.round(groups / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    out = np.empty(scale.numel() * 2 + q.numel(), dtype=np.uint8)
    out[: scale.numel() * 2] = scale.view(torch.int16).numpy().view(np.uint8)
    out[scale.numel() * 2:] = q.numpy().view(np.uint8).reshape(-1)
    return memoryview(out)


def _q80_decode(buf: Buffer, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    groups = -(-n // Q80_GROUP)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    scale = raw[: groups * 2].view(torch.float16).float()
    q = raw[groups * 2:].view(torch.int8).float().view(groups, Q80_GROUP)
    return (q * scale[:, None]).reshape(-1)[:n].view(shape)


_NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)


def abs_max(t: torch.Tensor) -> float:
    """The largest |value| of `t`; NaN if it holds a NaN, inf if an Inf (0 when empty).

    numpy takes one vectorised pass. torch.isfinite(t).all() takes several, and with 2 threads it
    spent ~0.25 ms on a 128x768 prefill tensor, three times per stage (docs/performance.md)."""
    if not t.numel():
        return 0.0
    if t.is_cpu and t.dtype in _NUMPY_FLOATS:
        a = _numpy(t)
        return max(float(a.max()), -float(a.min()))  # max/min propagate NaN
    return float(t.detach().abs().max())


def frame_finite(buf: Buffer, wire: str) -> bool | None:
    """Whether a tensor frame holds only finite values, read from its bytes with numpy (no torch
    call, and an overflow to float16's inf is seen); None for formats numpy cannot read."""
    dtype = _NUMPY_WIRES.get(wire)
    return None if dtype is None else bool(np.isfinite(np.frombuffer(buf, dtype)).all())


_NUMPY_WIRES = {"float32": np.float32, "float16": np.float16}


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite (fast on CPU: see abs_max)."""
    if t.is_cpu and t.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(_numpy(t)).all())
    return bool(torch.isfinite(t).all())


# Largest magnitude a format can carry (q80: a float16 scale times 127); the others carry float32's.
WIRE_MAX = {"float16": 65504.0, "q80": 65504.0 * 127}


def fits_wire(t: torch.Tensor, wire: str) -> bool:
    """Whether `t` is finite and stays finite in the format `wire`."""
    limit = WIRE_MAX.get(wire)
    if limit is None:
        return all_finite(t)
    m = abs_max(t)  # NaN or inf when t holds one
    return math.isfinite(m) and m <= limit


# What q80's float16 scales add to its error for groups of small values (module docstring).
Q80_ABS_ERROR = 2.0**-17


def q80_error_bound(t: torch.Tensor) -> float:
    """The largest error q80 may cause for `t`: one quantisation step of its widest group, plus
    what a float16 scale loses for small ones (Q80_ABS_ERROR)."""
    return float(t.detach().float().abs().max()) / 127.0 + Q80_ABS_ERROR if t.numel() else 0.0
