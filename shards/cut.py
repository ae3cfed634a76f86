"""Cutting weights into a model directory (shards/manifest.py says what one holds): one
safetensors file per role, block range and head split, and the manifest that lists them, all
written under temporary names and moved into place together.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from nanoswarm.files import write_beside
from nanoswarm.protocol.tensors import abs_max

from .loaders import StateDict, check_tokenizer_vocab, load_checkpoint, validate_flat_state_dict
from .manifest import (
    DTYPES,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Range,
    check_config_limits,
    layer_of,
    slice_block_weights,
    validate_head_splits,
)
from .model import ModelConfig

log = logging.getLogger(__name__)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"storage dtype must be one of {sorted(DTYPES)}, got {dtype}")


def check_storable(flat_sd: StateDict, dtype: torch.dtype) -> None:
    """ValueError naming a weight that is not finite, or that `dtype` cannot hold (float16 ends
    at 65504): written as inf, every step through it would be refused (`bad_value`)."""
    instead = {torch.float16: ": shard it as float32 or bfloat16", torch.bfloat16: ": shard it as float32"}
    for k, v in flat_sd.items():
        m = abs_max(v)
        if not math.isfinite(m):
            raise ValueError(f"{k} holds NaN or Inf")
        if not math.isfinite(torch.tensor(m, dtype=torch.float64).to(dtype).item()):  # as the file would
            raise ValueError(f"{k} holds {m:g}, which {_dtype_name(dtype)} cannot hold{instead.get(dtype, '')}")


def _shard_bytes(tensors: StateDict, dtype: torch.dtype) -> bytes:
    # clone(): safetensors refuses tensors that share storage (views of one parameter).
    return st_save({k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in tensors.items()},
                   metadata={"format": "pt"})


def write_model_dir(config: ModelConfig, flat_sd: StateDict, out_dir: str | Path, layers_per_shard: int,
                    head_splits: list[Range] | None = None, dtype: torch.dtype = torch.float32,
                    progress: bool = True) -> Manifest:
    """Cut flat weights into the model directory and write its manifest.json."""
    validate_flat_state_dict(config, flat_sd, "weights to shard")
    check_config_limits(config)  # never write a directory that read_manifest would refuse
    check_storable(flat_sd, dtype)  # before any file is written: a half-written directory is broken
    if layers_per_shard < 1:
        raise ValueError(f"layers_per_shard must be at least 1, got {layers_per_shard}")
    splits = [s for s in validate_head_splits(head_splits or [(0, config.n_head)], config.n_head)
              if s != (0, config.n_head)]  # the full-head split is the blocks file itself
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    level = logging.INFO if progress else logging.DEBUG
    plan: list[tuple[str, str, Range | None, Range | None, StateDict]] = [
        ("embeddings.safetensors", "embeddings", None, None,
         {k: flat_sd[k] for k in ("wte.weight", "wpe.weight")}),
        ("head.safetensors", "head", None, None,
         {k: v for k, v in flat_sd.items() if k.startswith(("ln_f.", "lm_head."))}),
    ]
    for a in range(0, config.n_layer, layers_per_shard):
        b = min(a + layers_per_shard, config.n_layer)
        block_sd = {k: v for k, v in flat_sd.items() if (i := layer_of(k)) is not None and a <= i < b}
        plan.append((f"blocks-{a}-{b}.safetensors", "blocks", (a, b), None, block_sd))
        for i, j in splits:
            plan.append((f"blocks-{a}-{b}-heads-{i}-{j}.safetensors", "blocks", (a, b), (i, j),
                         slice_block_weights(block_sd, config, (i, j))))
    # Every file goes to a hidden temporary name first and is moved into place only once all of
    # them, the manifest too, are written: a full disk (or Ctrl-C) midway left the directory's
    # earlier model with some of its files replaced, and the partial file behind (a review).
    files, written = [], []
    try:
        for n, (name, role, layers, heads, tensors) in enumerate(plan, start=1):
            data = _shard_bytes(tensors, dtype)
            written.append(write_beside(out / name, data))
            log.log(level, "[%d/%d] wrote %s (%.1f MB)", n, len(plan), name, len(data) / 1e6)
            files.append(FileEntry(name, role, layers, heads, hashlib.sha256(data).hexdigest(), len(data)))
        manifest = Manifest(config=config, dtype=_dtype_name(dtype), files=files)
        written.append(write_beside(out / MANIFEST_NAME, manifest.to_json().encode()))
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp in written:  # renames: no space needed, and a reader never sees a half-written file
        os.replace(tmp, out / tmp.name[1:].removesuffix(".tmp"))  # the manifest last
    log.log(level, "wrote %s: model id %s", out / MANIFEST_NAME, manifest.model_id)
    _remove_stale_shards(out, {f.name for f in files})
    return manifest


_SHARD_NAME = re.compile(r"^(embeddings|head|blocks-\d+-\d+(-heads-\d+-\d+)?)\.safetensors$")
# What a writer killed midway (SIGKILL, a power cut) leaves: our temporary names, nothing else.
_LEFTOVER_NAME = re.compile(r"^\.((embeddings|head|blocks-\d+-\d+(-heads-\d+-\d+)?)\.safetensors|manifest\.json)\.tmp$")


def is_leftover(name: str) -> bool:
    """Whether `name` is a temporary file that write_model_dir left when it was killed midway
    (removed by the next write into the directory)."""
    return _LEFTOVER_NAME.match(name) is not None


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Shard files of an earlier model written to the same directory: the manifest no longer
    names them, and left there they look like part of this one; and the temporary files of a
    write that was killed. Only our own file names."""
    for path in out.iterdir():
        if (is_leftover(path.name) or _SHARD_NAME.match(path.name) and path.name not in keep) and path.is_file():
            path.unlink()
            log.info("removed %s: not part of the new model", path)


def shard_checkpoint(source: str | Path, out_dir: str | Path, layers_per_shard: int,
                     head_splits: list[Range] | None = None, dtype: torch.dtype = torch.float32,
                     gelu: str | None = None, progress: bool = True) -> Manifest:
    """A nanoGPT or Hugging Face checkpoint turned into a model directory."""
    config, flat_sd = load_checkpoint(source, gelu=gelu, check=lambda c: check_tokenizer_vocab(c, str(source)))
    return write_model_dir(config, flat_sd, out_dir, layers_per_shard, head_splits, dtype, progress)
