"""A training run's checkpoint (shards/train.py): written at each eval point that improves on
the best, in nanoGPT's layout plus what a resumed run needs (optimizer moments, the batch
generator's state, the settings, the history), and read back by `nanoswarm train --resume`,
which refuses a checkpoint of other settings."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .loaders import CheckpointError, _torch_load, load_nanogpt
from .model import GPT
from .writers import save_nanogpt_checkpoint

log = logging.getLogger(__name__)


def save_eval_point(model: GPT, out_path: Path, it: int, best_val: float, settings: dict,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, history: list[dict]) -> None:
    """The checkpoint at eval point `it`, taken before that iteration's training step: weights
    (nanoGPT's layout), and what a resumed run needs to continue exactly as this one would have
    (optimizer moments, the batch generator's state, the settings it must keep)."""
    # torch.save writes the tensors out before returning, so no copy of the weights is needed.
    save_nanogpt_checkpoint(model.config, model.flat_state_dict(), out_path,
                            extra={"iter_num": it, "best_val_loss": best_val, "config": settings,
                                   "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                   "history": history})


# Settings a resumed run may change: the thread count sets the speed, and may change the last bits
# of the results (said when it changed).
_RESUMABLE_CHANGES = {"threads"}


def resume_run(out_path: Path, model: GPT, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               settings: dict) -> tuple[int, float, list[dict]]:
    """Load the checkpoint a run of the same settings left at `out_path` (weights, optimizer,
    generator); returns (its eval iteration, its validation loss, the history so far)."""
    ckpt = _torch_load(out_path)  # weights_only: plain tensors and settings, nothing that runs
    needed = ("optimizer", "generator", "iter_num", "best_val_loss", "config")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise CheckpointError(f"{out_path}: not a checkpoint `nanoswarm train` can resume (it keeps no "
                              "optimizer state)")
    unchecked = {"text_sha256"} - ckpt["config"].keys()  # a checkpoint from before texts were hashed
    if unchecked:
        log.warning("%s predates text hashing: resuming without checking that --text is the same text", out_path)
    # The text is its token ids' hash: the same text under another path (or from another
    # directory) is the same run.
    free = _RESUMABLE_CHANGES | unchecked | ({"text_path"} if not unchecked else set())
    changed = [f"{k} ({ckpt['config'].get(k)!r} there, {settings.get(k)!r} now)"
               for k in sorted(settings.keys() | ckpt["config"].keys())
               if k not in free and settings.get(k) != ckpt["config"].get(k)]
    config, flat = load_nanogpt(out_path)
    if config != model.config:
        changed.append(f"model shape ({config} there, {model.config} now)")
    if "threads" in settings and settings["threads"] != ckpt["config"].get("threads", settings["threads"]):
        log.warning("resuming with %s threads where the run had %s: the weights may differ in their last bits "
                    "from an uninterrupted run's", settings["threads"], ckpt["config"]["threads"])
    if changed:
        raise ValueError(f"{out_path} was trained with other settings: {', '.join(changed)}; resume with "
                         "the same ones, or start afresh with --overwrite")
    model.load_flat_state_dict(flat)
    optimizer.load_state_dict(ckpt["optimizer"])
    generator.set_state(ckpt["generator"])
    return int(ckpt["iter_num"]), float(ckpt["best_val_loss"]), list(ckpt.get("history") or [])
