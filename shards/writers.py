"""Write GPT-2 checkpoints in the two layouts loaders.py reads: nanoGPT's ckpt.pt (the training
script's output) and a Hugging Face GPT-2 directory (tests, and anyone who wants one). Both take
the flat form loaders.py produces.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from nanoswarm.files import write_beside

from .loaders import CONV1D_WEIGHTS, CheckpointError, StateDict, validate_flat_state_dict
from .model import ModelConfig


def save_nanogpt_checkpoint(config: ModelConfig, flat_sd: StateDict, path: str | Path,
                            extra: dict | None = None) -> Path:
    """Write nanoGPT's ckpt.pt layout. `extra` adds top-level entries (iter_num, optimizer, ...).
    The GELU form goes in a top-level "gelu" key: nanoGPT's own GPTConfig(**model_args) would
    reject an unknown model_args field, while it ignores extra top-level keys."""
    validate_flat_state_dict(config, flat_sd, "state dict to save")
    model = {f"transformer.{k}": v for k, v in flat_sd.items() if k != "lm_head.weight"}
    model["lm_head.weight"] = flat_sd.get("lm_head.weight", flat_sd["wte.weight"])
    args = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias",
                                             "vocab_size")}
    ckpt = {**(extra or {}), "model": model, "model_args": {**args, "dropout": 0.0}, "gelu": config.gelu}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: training rewrites its checkpoint at every new best, and a run killed
    # mid-write must leave the previous best, not a truncated file.
    # Serialised in memory first: torch.save to a file reports a full disk as an internal
    # "enforce fail ... unexpected pos", without the path or the reason (a review).
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    os.replace(write_beside(path, buffer.getbuffer(), "checkpoint"), path)
    return path


def _hf_buffers(config: ModelConfig, i: int) -> StateDict:
    n = config.block_size
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    return {f"h.{i}.attn.bias": mask, f"h.{i}.attn.masked_bias": torch.tensor(-1e4)}


def save_hf_checkpoint(config: ModelConfig, flat_sd: StateDict, directory: str | Path,
                       use_transformer_prefix: bool = True, safetensors: bool = True,
                       include_buffers: bool = False) -> Path:
    """Write a Hugging Face GPT-2 directory: config.json plus model.safetensors (tied lm_head left
    out, as HF does) or pytorch_model.bin (lm_head saved, as HF did). Conv1D weights [in, out]."""
    if not config.bias:
        raise CheckpointError("Hugging Face GPT-2 has no bias-free variant")
    validate_flat_state_dict(config, flat_sd, "state dict to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "transformer." if use_transformer_prefix else ""
    out: StateDict = {}
    for k, v in flat_sd.items():
        if k == "lm_head.weight":
            continue
        v = v.t() if k.endswith(CONV1D_WEIGHTS) else v
        out[prefix + k] = v.detach().contiguous().clone()
    for i in range(config.n_layer) if include_buffers else []:
        out.update({prefix + k: v for k, v in _hf_buffers(config, i).items()})
    head = flat_sd.get("lm_head.weight")
    if head is not None or not safetensors:
        out["lm_head.weight"] = (head if head is not None else flat_sd["wte.weight"]).detach().clone()
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": config.n_layer,
           "n_head": config.n_head, "n_embd": config.n_embd, "vocab_size": config.vocab_size,
           "n_positions": config.block_size, "n_ctx": config.block_size, "n_inner": None,
           "layer_norm_epsilon": 1e-5, "tie_word_embeddings": head is None,
           "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu"}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if safetensors:
        from safetensors.torch import save_file

        save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(out, directory / "pytorch_model.bin")
    return directory
