"""Where the model runs: the devices a node or a client may be given (`--device`)."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """cpu, cuda or cuda:N, checked against the GPUs torch sees (before any weights are read)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RuntimeError(f"--device {device} was asked for, but torch sees no CUDA device")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {device}: torch sees {count} CUDA device{'s' if count > 1 else ''} "
                         f"(cuda:0..cuda:{count - 1})")
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    torch.cuda.set_device(dev)  # contexts and default allocations on this GPU, not on cuda:0
    exact_float32()
    return dev


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """A compute dtype the device runs natively: GPUs before Ampere (compute capability 8.0) have
    no bfloat16 units, and cuBLAS fails or emulates it far slower than float16."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not _native_bfloat16(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"--dtype bfloat16: {device} ({name}) has no native bfloat16; use float16 or float32")


def _native_bfloat16(device: torch.device) -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch: compute capability 8.0 and up has it
        return torch.cuda.get_device_capability(device) >= (8, 0)


def exact_float32() -> None:
    """float32 on a GPU computed as float32, not TF32 (10-bit mantissa): a swarm's float32 logits
    must match one process's within ~1e-5, and clients spot-check nodes' float32 work against
    their own to 1e-4; TF32 errs by ~1e-3. torch's default already, pinned here against a
    changed default or a library that turns it on; a driver override (NVIDIA_TF32_OVERRIDE=1)
    still wins, and is warned of.

    Matrix products only: our model runs no convolution or RNN, and cuDNN's attention takes
    float16 and bfloat16 only. Setting cuDNN's precision too made torch refuse, in the whole
    process, a later read of `cudnn.allow_tf32` or a `cudnn.flags()` block (a mix of its old and
    new APIs, it said): an application's own cuDNN code, or torch.compile's, failed."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # older torch
        torch.backends.cuda.matmul.allow_tf32 = False
    if os.environ.get("NVIDIA_TF32_OVERRIDE", "") not in ("", "0"):
        log.warning("NVIDIA_TF32_OVERRIDE is set: float32 on the GPU runs as TF32, and its results differ "
                    "from float32 by ~1e-3 (spot checks count that as wrong)")


def tf32_on() -> bool:
    """Whether float32 matrix products on a GPU run as TF32 now: something in this process (an
    application's `torch.set_float32_matmul_precision("high")`, a library) turned it back on after
    `exact_float32`. Read through torch's new API where it has one: once that API has set a
    precision (as `exact_float32` does), torch 2.13 refuses reads of the old one (`allow_tf32`,
    `get_float32_matmul_precision`) with a RuntimeError about mixing them."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # an older torch
        return bool(matmul.allow_tf32)
    if precision == "none":  # not set for cuBLAS: the backends' own setting holds
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"
