"""The training loss with its output layer fused: cross_entropy(ln_f(h) @ W^T, targets) without
the [tokens, 50257] logits ever existing at once.

With a 50257-token vocabulary and narrow blocks, the output layer and its softmax are most of a
training step's work. train.py runs them through this function; the losses it reports come from
its eval_loss, plain float32, so the speed trick never touches the numbers in its summary.
"""

from __future__ import annotations

import torch

from .model import GPT

# Rows of the output layer handled at once by the fused loss: 128 x 50257 float32 logits is
# ~26 MB, small enough to stay near the cache while the softmax passes over it.
HEAD_CHUNK = 128


class _FusedHeadLoss(torch.autograd.Function):
    """cross_entropy(h @ W^T, targets), mean over rows, with the gradient computed in forward.

    Done chunk by chunk, the full [tokens, 50257] logits never exist: each chunk's softmax is
    turned into its gradient in place while it is still warm in cache, which on one CPU thread
    is ~2x faster than F.linear + F.cross_entropy (whose log_softmax backward dominates).
    The three matmuls run in `dtype` (bfloat16 where the CPU has native support: another ~2x on
    them); the softmax itself always runs in float32.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        n = h.shape[0]
        w, hl = weight.to(dtype), h.to(dtype)
        grad_h = torch.empty_like(h)
        probs = torch.empty(n, weight.shape[0], dtype=dtype)  # d loss / d logits, all rows
        total = torch.zeros((), dtype=torch.float64)
        rows = torch.arange(HEAD_CHUNK)
        for s in range(0, n, HEAD_CHUNK):
            t = targets[s:s + HEAD_CHUNK]
            logits = (hl[s:s + HEAD_CHUNK] @ w.t()).float()
            top = logits.amax(dim=1, keepdim=True)
            picked = logits.gather(1, t[:, None])
            p = logits.sub_(top).exp_()  # in place: the chunk's logits are not needed again
            norm = p.sum(dim=1, keepdim=True)
            total += (norm.log() + top - picked).sum().double()
            p.div_(norm)
            p[rows[:len(t)], t] -= 1.0
            probs[s:s + HEAD_CHUNK] = p.div_(n)
            grad_h[s:s + HEAD_CHUNK] = probs[s:s + HEAD_CHUNK] @ w
        # One big matmul for the weight gradient rather than one accumulation per chunk, each
        # of which would read and write the whole 50257-row gradient.
        grad_w = (probs.t() @ hl).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return (total / n).to(h.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def head_matmul_dtype() -> torch.dtype:
    """bfloat16 for the output-layer matmuls where the CPU runs it natively, else float32
    (emulated bfloat16 would be slower than float32)."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
    except (AttributeError, RuntimeError):
        pass
    return torch.float32


def training_loss(model: GPT, x: torch.Tensor, y: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same loss as cross_entropy(model(x), y), with the output layer fused (see above)."""
    h = model.head.ln_f(model.blocks(model.embeddings(x)))
    return _FusedHeadLoss.apply(h.reshape(-1, h.shape[-1]), model.head.lm_head.weight,
                                y.reshape(-1), dtype)
