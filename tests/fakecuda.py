"""A stand-in for a CUDA device on a CPU-only torch, for tests of the `--device cuda` path.

Tensors "on the GPU" are CPU tensors tagged as such: under `FakeCuda` (a torch function mode)
they say `device == cuda:0`, refuse `.numpy()`, and any torch call that mixes one with a CPU
tensor of one or more dimensions raises torch's own device-mismatch error (CUDA takes 0-dim CPU
scalars, and copies across devices). `.to("cuda")`, `.cuda()`, `.cpu()` and factories given
`device="cuda"` move between the two as on a GPU. The kernels stay CPU kernels, so results are
exact; what it checks is where tensors are, which is what a CPU test cannot otherwise see. Only
top-level torch calls are checked (the mode is off inside its own handler): enough for our code,
which meets tensors of two devices there, not inside torch's functions. `patch_torch_cuda`
answers the `torch.cuda` calls a GPU node makes (memory, synchronize) as a GPU would.
(Review172, sixty-second session.)"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.arange, torch.full, torch.tensor, torch.randn,
              torch.rand}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like}
_CROSS_OK = {"copy_", "__setitem__"}  # as on CUDA: a copy between devices is allowed


def tag(t: torch.Tensor) -> torch.Tensor:
    t._fakecuda = True
    return t


def on_gpu(t: object) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_fakecuda", False)


def _untag(t: torch.Tensor) -> torch.Tensor:
    if on_gpu(t):
        del t._fakecuda
    return t


def _names_cuda(d: object) -> bool:
    return (isinstance(d, torch.device) and d.type == "cuda") or (isinstance(d, str) and d.startswith("cuda"))


def to_gpu(module: torch.nn.Module) -> torch.nn.Module:
    """`module`'s parameters and buffers "on the GPU" (as `load_blocks(..., device="cuda")`)."""
    for t in [*module.parameters(), *module.buffers()]:
        tag(t)
    return module


class FakeCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: device, is_cpu, is_cuda
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            if on_gpu(args[0]) and prop in ("device", "is_cpu", "is_cuda"):
                return {"device": CUDA, "is_cpu": False, "is_cuda": True}[prop]
            return func(*args, **kwargs)
        if func in _FACTORIES or func in _LIKE:
            gpu = _names_cuda(kwargs.get("device")) or (func in _LIKE and "device" not in kwargs
                                                       and on_gpu(args[0]))
            if gpu:
                return tag(func(*args, **{**kwargs, "device": "cpu"}))
            return func(*args, **kwargs)
        if name in ("numpy", "__array__") and on_gpu(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if name == "cpu":
            return _untag(args[0].clone()) if on_gpu(args[0]) else func(*args, **kwargs)
        if name == "cuda":
            return args[0] if on_gpu(args[0]) else tag(args[0].clone())
        if name == "to":
            return self._to(func, args, kwargs)
        self._check_devices(name, args, kwargs)
        out = func(*args, **kwargs)
        if name in _CROSS_OK:  # the destination stays where it is
            return out
        if any(on_gpu(t) for t in tree_flatten((args, kwargs))[0]):
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    tag(o)
        return out

    @staticmethod
    def _to(func, args, kwargs):
        x = args[0]
        dev = kwargs.get("device")
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                dev = a
            elif isinstance(a, torch.Tensor):
                dev = CUDA if on_gpu(a) else torch.device("cpu")
        if dev is None:  # a dtype only: stays where it is
            out = func(*args, **kwargs)
            return tag(out) if on_gpu(x) else out
        cpu_args = ["cpu" if isinstance(a, (str, torch.device)) else a for a in args]
        cpu_kwargs = {**kwargs, "device": "cpu"} if "device" in kwargs else kwargs
        out = func(*cpu_args, **cpu_kwargs)
        if _names_cuda(dev):
            if out is x:
                return x if on_gpu(x) else tag(x.clone())
            return tag(out)
        if on_gpu(x):  # to the CPU: a copy, untagged
            return _untag(out.clone() if out is x or out.data_ptr() == x.data_ptr() else out)
        return out

    @staticmethod
    def _check_devices(name: str, args, kwargs) -> None:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name not in _CROSS_OK and any(on_gpu(t) for t in tensors) \
                and any(not on_gpu(t) and t.dim() > 0 for t in tensors):
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                               f"devices, cuda:0 and cpu! (in {name})")


def patch_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The `torch.cuda` calls a GPU node makes, answered as a GPU with nothing on it would; returns
    the names of the calls made, in order."""
    calls: list[str] = []

    def answer(name: str, value: object = None):
        def call(*args, **kwargs):
            calls.append(name)
            return value
        return call
    for name, value in (("synchronize", None), ("memory_reserved", 0), ("memory_allocated", 0),
                        ("max_memory_reserved", 0), ("empty_cache", None), ("mem_get_info", (8 << 30, 16 << 30))):
        monkeypatch.setattr(torch.cuda, name, answer(name, value))
    return calls
