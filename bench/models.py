"""Random-weight model directories in the shapes the benchmark runs (speed does not depend on
the values, only on the shape), written like any sharded checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nanoswarm.shards.cut import write_model_dir
from nanoswarm.shards.manifest import MANIFEST_NAME, read_manifest
from nanoswarm.shards.model import GPT, ModelConfig

log = logging.getLogger(__name__)

SHAPES: dict[str, ModelConfig] = {
    "gpt2-small": ModelConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=50257, block_size=1024),
}


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT-2 init, with biases and norms pushed off their 0/1 defaults so that every block
    changes the logits (a wire format's error then shows in them)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.flat_state_dict()


def make_random_model_dir(path: str | Path, config: ModelConfig, seed: int = 0, layers_per_shard: int = 1,
                          head_splits: list[tuple[int, int]] | None = None, reuse: bool = True) -> Path:
    """A model directory of random weights at `path`; with `reuse`, one of the same config there
    is kept (its files are checked as they load)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is not a directory; the benchmark keeps its random {path.name} model there")
    if reuse and (path / MANIFEST_NAME).exists():
        try:
            if read_manifest(path).config == config:
                return path
        except (ValueError, OSError):  # a broken leftover (ManifestError is a ValueError): write it again
            log.info("rewriting unreadable model dir %s", path)
    write_model_dir(config, random_state_dict(config, seed), path, layers_per_shard, head_splits,
                    progress=False)
    return path
