"""The GPT-2 model, cut into the pieces a swarm runs: embeddings, blocks, head.

Reads like nanoGPT's model.py, with two differences that the swarm needs:
- every block can run a sub-range of its attention heads (and the matching share of the MLP), so
  a block can be split across peers Megatron-style; a full block is just the slice of all heads;
- blocks run against a KV cache, so a peer keeps per-session state and sees one new position per
  decode step.
The client runs `Embeddings` and `Head`; peers run `Block`s. `GPT` ties them together for
training and as the single-process reference.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

GELU_FORMS = ("tanh", "exact")


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024
    bias: bool = True
    # GPT-2 checkpoints were trained with the tanh approximation, nanoGPT uses the exact erf form;
    # the wrong one shifts logits by ~1e-3, so the form is part of the config.
    gelu: str = "tanh"

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {GELU_FORMS}, got {self.gelu!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def onednn_linear() -> Callable[..., torch.Tensor] | None:
    """oneDNN's linear kernel (the op torch.compile emits for CPU linears), or None where this
    torch lacks it or it disagrees with F.linear. Checked once, on first use. x86-64 only: the
    only CPUs it was measured on (ARM builds have other BLAS choices)."""
    if (os.environ.get("NANOSWARM_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available()
            or platform.machine().lower() not in ("x86_64", "amd64")):
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)  # not the global generator: sampling seeds it
            x, w, b = (torch.randn(*shape, generator=g, dtype=torch.float32) for shape in ((3, 64), (48, 64), (48,)))
            if torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-5, atol=1e-5):
                return op
    except Exception as exc:  # no such op in this build, or another signature: F.linear it is
        log.debug("oneDNN linear unavailable (%s: %s); using F.linear", type(exc).__name__, exc)
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through oneDNN for float32 inference on CPU.

    torch's float32 CPU linear calls MKL, whose matrix-vector path (a one-token step) runs on one
    thread here and whose matrix path runs slowly on AMD CPUs; with oneDNN's kernel GPT-2-small
    blocks took about half the time on this repository's 2-core VM, for decode, batched decode
    and prefill alike, and the head 0.6x (docs/performance.md). It has no backward, so training
    keeps F.linear. It ignores a bias's strides, so only a contiguous bias goes to it (ours all
    are). NANOSWARM_ONEDNN=0 turns it off; nanoswarm.onednn_defaults bounds its kernel caches.
    """
    if (x.is_cpu and x.dtype is torch.float32 and weight.dtype is torch.float32 and not torch.is_grad_enabled()
            and (bias is None or bias.is_contiguous())):
        op = onednn_linear()
        if op is not None:
            return op(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoints) whose inference runs through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class KVCache:
    """Keys and values of one session for a run of consecutive blocks, preallocated.

    Preallocating to the session's max length makes the memory a session costs known when it
    opens (so a node can refuse it up front) and keeps allocations off the per-token path. A
    node makes its caches inside its loop's inference mode (node/daemon.py): they are inference
    tensors, written only in inference mode (in-place writes outside it raise).
    """

    def __init__(self, n_blocks: int, n_heads: int, head_dim: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_blocks, 1, n_heads, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0  # positions already stored (the same for every block)

    @staticmethod
    def bytes_for(n_blocks: int, n_heads: int, head_dim: int, max_length: int,
                  dtype: torch.dtype = torch.float32) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_blocks * n_heads * max_length * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def head_slice_width(config: ModelConfig, heads: tuple[int, int]) -> tuple[int, int]:
    """Columns of the MLP hidden layer that go with heads [a, b): the same share of 4*n_embd."""
    per_head = 4 * config.n_embd // config.n_head
    return heads[0] * per_head, heads[1] * per_head


class CausalSelfAttention(nn.Module):
    """Attention over heads [a, b) of a block. Its c_proj gives a partial sum unless a == 0 and
    b == n_head; the output bias lives only in the slice that holds head 0 so that summing the
    slices adds it exactly once."""

    def __init__(self, config: ModelConfig, heads: tuple[int, int]):
        super().__init__()
        self.n_local = heads[1] - heads[0]
        self.head_dim = config.head_dim
        width = self.n_local * self.head_dim
        self.c_attn = Linear(config.n_embd, 3 * width, bias=config.bias)
        self.c_proj = Linear(width, config.n_embd, bias=config.bias and heads[0] == 0)

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None, block: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_local * self.head_dim, dim=2)
        q = q.view(B, T, self.n_local, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_local, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_local, self.head_dim).transpose(1, 2)
        if caches is None:  # training / reference: the whole sequence at once
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # One session per batch row: each has its own cache length, so attention runs per
            # row while the linear layers (the memory-bound part of decode) run batched.
            y = torch.cat([self._attend_cached(q[i:i + 1], k[i:i + 1], v[i:i + 1], c, block)
                           for i, c in enumerate(caches)])
        y = y.transpose(1, 2).reshape(B, T, self.n_local * self.head_dim)
        return self.c_proj(y)

    @staticmethod
    def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, block: int) -> torch.Tensor:
        start, T = cache.length, q.shape[2]
        end = start + T
        cache.k[block, :, :, start:end] = k
        cache.v[block, :, :, start:end] = v
        keys, values = cache.k[block, :, :, :end], cache.v[block, :, :, :end]
        if T == 1:
            return F.scaled_dot_product_attention(q, keys, values)
        if start == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        # New positions see the whole cache plus the new positions up to themselves.
        mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, heads: tuple[int, int]):
        super().__init__()
        lo, hi = head_slice_width(config, heads)
        self.c_fc = Linear(config.n_embd, hi - lo, bias=config.bias)
        self.c_proj = Linear(hi - lo, config.n_embd, bias=config.bias and heads[0] == 0)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    """A transformer block, or the share of one that serves heads [a, b).

    A full block is `x + attn(ln_1(x))`, then `+ mlp(ln_2(x))`. A head slice computes only the
    two partial sums; whoever holds all slices adds them to the residual (see client/head_group.py).
    """

    def __init__(self, config: ModelConfig, heads: tuple[int, int] | None = None):
        super().__init__()
        self.heads = heads or (0, config.n_head)
        self.full = self.heads == (0, config.n_head)
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, self.heads)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, self.heads)

    def attn_partial(self, x: torch.Tensor, caches: list[KVCache] | None, block: int) -> torch.Tensor:
        return self.attn(self.ln_1(x), caches, block)

    def mlp_partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, block: int = 0) -> torch.Tensor:
        x = x + self.attn_partial(x, caches, block)
        return x + self.mlp_partial(x)


class Blocks(nn.Module):
    """Blocks [start, stop) (optionally heads [a, b) of each): what one peer serves."""

    def __init__(self, config: ModelConfig, start: int, stop: int,
                 heads: tuple[int, int] | None = None):
        super().__init__()
        if not 0 <= start < stop <= config.n_layer:
            raise ValueError(f"block range {start}:{stop} is outside 0:{config.n_layer}")
        if heads is not None and not 0 <= heads[0] < heads[1] <= config.n_head:
            raise ValueError(f"head range {heads[0]}:{heads[1]} is outside 0:{config.n_head}")
        self.config, self.start, self.stop = config, start, stop
        self.heads = heads or (0, config.n_head)
        # Keys match the checkpoint's global block numbers: h.4.attn... for block 4.
        self.h = nn.ModuleDict({str(i): Block(config, self.heads) for i in range(start, stop)})

    def new_cache(self, max_length: int, n_blocks: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(n_blocks or self.stop - self.start, self.heads[1] - self.heads[0],
                       self.config.head_dim, max_length, p.device, p.dtype)

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None,
                start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Run full blocks [start, stop) (default: all served); caches hold exactly those
        blocks, one cache per batch row, and advance by x's length."""
        start = self.start if start is None else start
        stop = self.stop if stop is None else stop
        for j, i in enumerate(range(start, stop)):
            x = self.h[str(i)](x, caches, j)
        if caches is not None:
            for c in caches:
                c.length += x.shape[1]
        return x


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        if init:
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            # Built on the meta device to take loaded weights (shards/weights.py), and only so:
            # elsewhere the weights would be uninitialised memory. No random init, which on the
            # meta device imports torch._dynamo, ~1 s of every client's first connect (review124).
            self.wte = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.n_embd))
            self.wpe = nn.Embedding.from_pretrained(torch.empty(config.block_size, config.n_embd))

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[-1], device=ids.device)
        return self.wte(ids) + self.wpe(pos)


class Head(nn.Module):
    """Final LayerNorm and the output projection (tied to wte in GPT-2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._weight_t: torch.Tensor | None = None

    def freeze_for_inference(self) -> None:
        # Where oneDNN is missing (see `linear`), x @ W^T with W^T stored contiguous runs ~2x
        # faster than MKL's F.linear for the 50257-wide head; worth a copy of the weight then.
        w = self.lm_head.weight
        if w.is_cpu and w.dtype is torch.float32 and onednn_linear() is None:
            self._weight_t = w.detach().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(x)
        if self._weight_t is not None:
            return x @ self._weight_t
        return linear(x, self.lm_head.weight, None)


class GPT(nn.Module):
    """The whole model in one process: for training and as the swarm's reference."""

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, init)
        self.blocks = Blocks(config, 0, config.n_layer)
        self.head = Head(config)
        self.head.lm_head.weight = self.embeddings.wte.weight  # tied, as in GPT-2
        if not init:  # on the meta device, weights to be loaded (shards/weights.py): see Embeddings
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor, caches: list[KVCache] | None = None,
                start: int = 0) -> torch.Tensor:
        return self.head(self.blocks(self.embeddings(ids, start), caches))

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under GPT-2's names (wte.weight, h.0.ln_1.weight, ln_f.weight, ...),
        nn.Linear layout; the tied lm_head is left out."""
        out = {}
        for name, t in self.state_dict().items():
            for prefix in ("embeddings.", "blocks.", "head."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if name != "lm_head.weight":
                out[name] = t
        return out

    def load_flat_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        # This model's lm_head is wte (tied): an lm_head.weight of other values would overwrite
        # wte with the head's weights, without a word (review212). An untied model is served
        # from its shards (shards/weights.py), never loaded here.
        head, wte = sd.get("lm_head.weight"), sd.get("wte.weight")
        if head is not None and wte is not None and not torch.equal(head, wte):
            raise ValueError("the checkpoint's lm_head.weight is not its wte.weight: this model ties the two "
                             "(GPT-2's layout) and cannot hold an untied head")
        own = self.state_dict()
        mapped = {}
        for name in own:
            short = name
            for prefix in ("embeddings.", "blocks.", "head."):
                if short.startswith(prefix):
                    short = short[len(prefix):]
            if short == "lm_head.weight":
                short = "wte.weight"  # (the same tensor: checked above)
            if short not in sd:
                raise KeyError(f"checkpoint has no weight {short!r}")
            mapped[name] = sd[short]
        self.load_state_dict(mapped, strict=True)
