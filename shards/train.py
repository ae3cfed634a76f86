"""Train the project's small demo GPT on tiny Shakespeare, on a CPU, in nanoGPT's style.

The swarm needs a model it is allowed to ship and can run end to end on small machines, so the
project trains its own: GPT-2's tokenizer and vocabulary (so every tool that speaks GPT-2 ids
works unchanged), a few narrow blocks, the exact-erf GELU and biases as nanoGPT uses them, and
the best checkpoint (by validation loss) written in nanoGPT's ckpt.pt layout, which
loaders.load_checkpoint and the sharding command already read.

With a 50257-token vocabulary and narrow blocks, the output layer and its softmax are most of
the work, so the training loss runs them through a fused, chunked function (head_loss.py)
instead of materialising all logits; the losses that are reported come from eval_loss, plain
float32 and the same computation as GPT.forward, so the speed trick never touches the numbers in
the summary.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoswarm.files import read_regular_file

from .head_loss import HEAD_CHUNK, head_matmul_dtype, training_loss
from .loaders import check_size_limits
from .model import GPT, ModelConfig, linear, onednn_linear
from .tokenizer import get_encoding
from .train_checkpoint import resume_run, save_eval_point

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).parent / "data" / "tinyshakespeare.txt"
# The demo model's shape: 4 blocks x 4 heads, 192 wide. Stored in float16 its weights take about
# 23 MB, 19.3 MB of it the token embedding (50257 x 192), which fits the 40 MB budget for the
# demo shards with room for the manifest; wider models cost more CPU time per token in the
# 50257-wide output layer than they win in loss within a ~20 minute single-thread budget.
DEFAULT_CONFIG = ModelConfig(n_layer=4, n_head=4, n_embd=192, vocab_size=50257, block_size=128,
                             bias=True, gelu="exact")


# ---- data ----

# Far more text than a CPU trains on in a day; the ids take twice its size in memory.
MAX_TEXT_BYTES = 1 << 30


def tokenize_file(path: str | Path) -> torch.Tensor:
    """GPT-2 BPE ids of a UTF-8 text file, as int64 (what nn.Embedding and cross_entropy take).
    A regular file only, of at most MAX_TEXT_BYTES: a FIFO hung the command, /dev/zero filled memory."""
    try:
        text = read_regular_file(path, MAX_TEXT_BYTES).decode("utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read it as training text: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return torch.tensor(get_encoding().encode_ordinary(text), dtype=torch.long)


def split_ids(ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the head of the token stream, validate on its tail (nanoGPT's split): a
    contiguous tail keeps validation text unseen, where random windows would overlap training."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def get_batch(ids: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the split and the same windows shifted by one token (the targets)."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    x = torch.stack([ids[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1:s + 1 + block_size] for s in starts.tolist()])
    return x, y


# ---- losses ----

def unigram_val_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Nats per token on the validation split of a unigram model fit on the training split with
    add-one (Laplace) smoothing: the baseline a trained model has to beat clearly, since it is
    what "learned the token frequencies, nothing about context" scores."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[val_ids].mean())


@torch.no_grad()
def eval_loss(model: GPT, ids: torch.Tensor, block_size: int, batch_size: int = 16,
              max_windows: int | None = None) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` over `ids`, cut into non-overlapping
    windows of block_size inputs: every token after the first is predicted exactly once, so the
    number is deterministic and comparable across runs (unlike nanoGPT's random-batch estimate).
    All float32; max_windows caps the work for quick checks."""
    was_training = model.training
    model.eval()
    # The head as Head.forward runs it in inference: through oneDNN, or without it x @ W^T
    # against a contiguous copy of W^T (both ~2x faster than F.linear on CPU; shards/model.py).
    weight = model.head.lm_head.weight
    weight_t = weight.t().contiguous() if onednn_linear() is None else None
    n_windows = (len(ids) - 1 + block_size - 1) // block_size  # the last one may be shorter
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    total, count = 0.0, 0
    for first in range(0, n_windows, batch_size):
        starts = [w * block_size for w in range(first, min(first + batch_size, n_windows))]
        # Only the very last window can be short; it goes alone so the rest batch unpadded.
        short = [s for s in starts if s + block_size + 1 > len(ids)]
        for group in ([s for s in starts if s not in short], *([s] for s in short)):
            if not group:
                continue
            length = min(block_size, len(ids) - 1 - group[0])
            x = torch.stack([ids[s:s + length] for s in group])
            y = torch.stack([ids[s + 1:s + 1 + length] for s in group]).reshape(-1)
            h = model.head.ln_f(model.blocks(model.embeddings(x))).reshape(-1, weight.shape[1])
            for c in range(0, len(y), HEAD_CHUNK):  # chunks keep the logits near the cache
                chunk = h[c:c + HEAD_CHUNK]
                logits = linear(chunk, weight, None) if weight_t is None else chunk @ weight_t
                total += float(F.cross_entropy(logits, y[c:c + HEAD_CHUNK], reduction="sum"))
            count += len(y)
    model.train(was_training)
    if count == 0:
        raise ValueError(f"{len(ids)} tokens are too few to evaluate")
    return total / count


# ---- optimisation ----

def make_optimizer(model: GPT, lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW as nanoGPT sets it up: decay the matrices (and the embeddings), not the biases or
    LayerNorm gains, which only shift and scale and gain nothing from being pulled to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(it: int, lr: float, warmup: int, max_iters: int, min_lr: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at max_iters."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= max_iters:
        return min_lr
    progress = (it - warmup) / max(1, max_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


@torch.no_grad()
def estimate_train_loss(model: GPT, ids: torch.Tensor, eval_iters: int, batch_size: int,
                        generator: torch.Generator) -> float:
    """Train loss on `eval_iters` random batches: the whole training split would take a minute
    or more per evaluation on one thread, and this number is only for the progress display."""
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(eval_iters):
        x, y = get_batch(ids, batch_size, model.config.block_size, generator)
        logits = model(x)
        losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))))
    model.train(was_training)
    return sum(losses) / len(losses)


def _progress(progress: Callable[[str], None] | None, message: str) -> None:
    # One line per report (not a \r-redrawn line), so the progress reads well in a log file too.
    # The CLI shows it on stderr; a library caller without a callback finds it in the log.
    if progress is not None:
        progress(message)
    else:
        log.info("%s", message)


def _evaluate(model: GPT, it: int, train_ids: torch.Tensor, val_ids: torch.Tensor, eval_iters: int,
              batch_size: int, generator: torch.Generator, start: float) -> dict:
    """An eval point's history entry: the validation loss over the whole split, the train loss
    estimated from `eval_iters` batches (drawn from the training generator: part of the recipe),
    and the run's time so far (since `start`, this evaluation included)."""
    val = eval_loss(model, val_ids, model.config.block_size)
    est = estimate_train_loss(model, train_ids, eval_iters, batch_size, generator)
    return {"iter": it, "train_loss_est": est, "val_loss": val, "elapsed_s": time.monotonic() - start}


def _train_step(model: GPT, optimizer: torch.optim.Optimizer, train_ids: torch.Tensor, generator: torch.Generator,
                lr: float, batch_size: int, head_dtype: torch.dtype, grad_clip: float) -> tuple[float, int]:
    """One optimizer step on a random batch at learning rate `lr`: its loss and its token count."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = get_batch(train_ids, batch_size, model.config.block_size, generator)
    loss = training_loss(model, x, y, head_dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item(), x.numel()


class TrainingDiverged(ValueError):
    """The loss went to NaN or Inf: the run's result is not a model worth using."""


def training_bytes(config: ModelConfig, batch_size: int) -> int:
    """Roughly what a training run holds at its peak: float32 weights, gradients and AdamW's two
    moments, plus one batch's activations: the fused head loss's one row of the vocabulary per
    token (head_loss.py; float32 at most) and each block's saved intermediates (attention
    goes through SDPA, which keeps no T x T matrices on the CPU). An estimate, on the high side,
    to refuse at once what cannot fit."""
    c = config
    params = 12 * c.n_layer * c.n_embd ** 2 + (c.vocab_size + c.block_size) * c.n_embd
    tokens = batch_size * c.block_size
    activations = tokens * (c.vocab_size + 20 * c.n_layer * c.n_embd)
    return 4 * (4 * params + activations)


def check_fits(config: ModelConfig, batch_size: int) -> None:
    """ValueError for a run this machine's memory cannot hold, before anything is allocated
    (it allocated for a minute or more, then failed with torch's words), and for a model shape
    that `nanoswarm shard` would refuse."""
    check_size_limits(config)
    need = training_bytes(config, batch_size)
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not reported here: nothing to compare with
        return
    if have > 0 and need > have:  # (-1: indeterminate)
        raise ValueError(f"training this model needs about {need / 2**30:.1f} GiB (weights, optimizer state and "
                         f"one batch), more than this machine's {have / 2**30:.1f} GiB: lower --n-layer, "
                         "--n-embd, --batch-size or --block-size")


# ---- the training run ----

def train(text_path: str | Path = DEFAULT_TEXT, out_path: str | Path = "out/demo-ckpt.pt",
          config: ModelConfig = DEFAULT_CONFIG, max_iters: int = 700, batch_size: int = 16,
          lr: float = 2e-3, warmup: int = 50, eval_interval: int = 100, eval_iters: int = 5,
          seed: int = 1337, threads: int = 1, val_fraction: float = 0.1,
          progress: Callable[[str], None] | None = None,
          weight_decay: float = 0.1, min_lr: float | None = None, log_interval: int = 10,
          grad_clip: float = 1.0, resume: bool = False) -> dict:
    """Train a GPT of shape `config` on `text_path` and write the best checkpoint (lowest
    validation loss at an eval point) to `out_path` in nanoGPT's format. Returns a summary.

    Validation loss at every eval point is eval_loss over the whole validation split (it is
    small), so the checkpoint choice does not ride on sampling noise; the train loss shown there
    is an `eval_iters`-batch estimate. `threads` sets torch's intra-op threads for the run.
    With `resume`, the run continues from the checkpoint at `out_path` that an interrupted run
    of the same settings left (its best eval point), and ends where that run would have.

    The defaults are the run that produced the demo model (docs/demo-model.md). The train-loss
    estimate draws its batches from the same seeded generator as training, so eval_interval and
    eval_iters are part of the recipe: change them and the training batches change too.
    `progress` gets a line at each eval and log point (without it, the lines are logged).
    """
    if progress is not None and not callable(progress):  # (it was a flag once: refused now, not at the first line)
        raise TypeError(f"progress must be a callable taking a line, or None, not {progress!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    out_path = Path(out_path)
    min_lr = lr / 10 if min_lr is None else min_lr  # nanoGPT's choice (Chinchilla's ~lr/10)
    if config.vocab_size < get_encoding().n_vocab:
        raise ValueError(f"vocab_size {config.vocab_size} cannot hold GPT-2's {get_encoding().n_vocab} ids")
    check_fits(config, batch_size)

    ids = tokenize_file(text_path)
    train_ids, val_ids = split_ids(ids, val_fraction)
    if len(train_ids) <= config.block_size or len(val_ids) < 2:
        raise ValueError(f"{text_path}: {len(ids)} tokens are too few for block_size {config.block_size}")
    unigram = unigram_val_loss(train_ids, val_ids, config.vocab_size)

    model = GPT(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # the tied head counts once
    optimizer = make_optimizer(model, lr, weight_decay, betas=(0.9, 0.99))
    head_dtype = head_matmul_dtype()
    # The text's token ids, hashed: a resumed run must see the same text, not only the same path.
    text_sha256 = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    settings = {"text_path": str(text_path), "text_sha256": text_sha256, "max_iters": max_iters,
                "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "warmup": warmup, "weight_decay": weight_decay,
                "betas": [0.9, 0.99], "grad_clip": grad_clip, "eval_interval": eval_interval,
                "eval_iters": eval_iters, "seed": seed, "threads": threads,
                "val_fraction": val_fraction, "head_matmul_dtype": str(head_dtype)}
    log.debug("training %s (%d parameters) on %d train / %d val tokens; unigram val loss %.4f",
              config, n_params, len(train_ids), len(val_ids), unigram)
    _progress(progress, f"{n_params / 1e6:.2f}M parameters, {len(train_ids)} train / {len(val_ids)} "
                        f"val tokens, unigram val loss {unigram:.4f}, head matmuls in {head_dtype}")

    best_val, best_iter, best_state = math.inf, -1, None
    history: list[dict] = []
    first = 0
    if resume:
        first, best_val, history = resume_run(out_path, model, optimizer, generator, settings)
        best_iter, best_state = first, {k: v.detach().clone() for k, v in model.state_dict().items()}
        _progress(progress, f"resuming at iter {first} (val {best_val:.4f}) from {out_path}")
    start = time.monotonic()
    train_time = 0.0  # excludes evaluations, so tokens/s measures training alone
    window_time, window_tokens, loss_sum, loss_n = 0.0, 0, 0.0, 0
    for it in range(first, max_iters + 1):
        if (it % eval_interval == 0 or it == max_iters) and not (resume and it == first):  # done before
            history.append(_evaluate(model, it, train_ids, val_ids, eval_iters, batch_size, generator, start))
            val, est = history[-1]["val_loss"], history[-1]["train_loss_est"]
            if not math.isfinite(val):  # NaN weights never recover: stop now, not at --max-iters
                _progress(progress, f"iter {it:5d} | eval: val {val}")
                raise TrainingDiverged(
                    f"training diverged: validation loss {val} at iter {it}; start afresh with --overwrite and a "
                    "lower --lr (" + (f"{out_path} holds the best eval point, iter {best_iter} (val {best_val:.4f})"
                                      if best_state is not None else f"nothing was written to {out_path}") + ")")
            if val < best_val:
                best_val, best_iter = val, it
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save_eval_point(model, out_path, it, best_val, settings, optimizer, generator, history)
            _progress(progress, f"iter {it:5d} | eval: train~{est:.4f} val {val:.4f} "
                                f"(best {best_val:.4f} @ {best_iter}) | {time.monotonic() - start:7.1f}s")
        if it == max_iters:
            break

        step_start = time.monotonic()
        loss, tokens = _train_step(model, optimizer, train_ids, generator, lr_at(it, lr, warmup, max_iters, min_lr),
                                   batch_size, head_dtype, grad_clip)
        step_time = time.monotonic() - step_start
        train_time, window_time = train_time + step_time, window_time + step_time
        window_tokens += tokens
        loss_sum, loss_n = loss_sum + loss, loss_n + 1

        if (it + 1) % log_interval == 0:
            _progress(progress, f"iter {it + 1:5d} | loss {loss_sum / loss_n:.4f} | "
                                f"lr {optimizer.param_groups[0]['lr']:.2e} | "
                                f"{window_tokens / max(window_time, 1e-9):6.0f} tok/s | "
                                f"{time.monotonic() - start:7.1f}s")
            window_time, window_tokens, loss_sum, loss_n = 0.0, 0, 0.0, 0

    # Report on the checkpoint that was written, not on the last iterate.
    model.load_state_dict(best_state)
    _progress(progress, f"loss of the best checkpoint over all {len(train_ids)} training tokens ...")
    train_loss = eval_loss(model, train_ids, config.block_size)
    wall = time.monotonic() - start
    summary = {"out_path": str(out_path), "config": config.to_dict(), "n_params": n_params,
               "max_iters": max_iters, "best_iter": best_iter, "val_loss": best_val,
               "train_loss": train_loss, "unigram_val_loss": unigram,
               "n_train_tokens": len(train_ids), "n_val_tokens": len(val_ids),
               "tokens_per_s": (max_iters - first) * batch_size * config.block_size / max(train_time, 1e-9),
               "resumed_from": first if resume else None,
               "train_time_s": train_time, "wall_time_s": wall, "settings": settings,
               "history": history}
    log.debug("done in %.1fs: best val loss %.4f at iter %d (unigram %.4f), train loss %.4f; wrote %s",
              wall, best_val, best_iter, unigram, train_loss, out_path)
    _progress(progress, f"done in {wall:.1f}s: val {best_val:.4f} (iter {best_iter}), "
                        f"train {train_loss:.4f}, unigram {unigram:.4f} -> {out_path}")
    return summary
