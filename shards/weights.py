"""Loading a model directory's weights: each file read only if it is a regular file of the size
and sha256 the manifest gives and holds exactly the tensors its config needs (manifest.py says
why), then made into modules (embeddings, head, a span of blocks or heads, the whole model)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load as st_load

from nanoswarm.files import open_regular_file

from .loaders import StateDict, expected_shapes, first_line
from .manifest import (
    DTYPES,
    FileEntry,
    Manifest,
    ManifestError,
    Range,
    ShardIntegrityError,
    layer_of,
    read_manifest,
    slice_block_weights,
)
from .model import GPT, Blocks, Embeddings, Head, ModelConfig

_M = TypeVar("_M", bound=torch.nn.Module)


def _read_exactly(path: Path, size: int) -> bytes:
    """The file's bytes if it is a regular file of `size` bytes (a symlink to /dev/zero or a FIFO
    must not be read without end: nanoswarm.files)."""
    f, st = open_regular_file(path)
    with f:
        if st.st_size != size:
            raise OSError(f"it is {st.st_size} bytes, the manifest says {size}")
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"read {len(data)} bytes, the manifest says {size}")
    return data


def read_verified(model_dir: str | Path, entry: FileEntry, manifest: Manifest | None = None) -> StateDict:
    """The tensors of one file, after checking its size and sha256 against the manifest and, with
    `manifest`, its tensor names, shapes and dtype against the manifest's config."""
    try:
        data = _read_exactly(Path(model_dir) / entry.name, entry.size)
    except OSError as exc:
        why = exc.strerror if exc.strerror else exc  # (the path once, not again in the OSError's words)
        raise ShardIntegrityError(f"{entry.name}: cannot read it from {model_dir}: {why}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise ShardIntegrityError(f"{entry.name}: sha256 {actual[:16]}... does not match the manifest's "
                                  f"{entry.sha256[:16]}...; the file is corrupted or was modified")
    try:
        sd = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise ShardIntegrityError(f"{entry.name}: not a safetensors file: {first_line(exc)}") from exc
    if manifest is not None:
        _check_tensors(entry, sd, manifest)
    return sd


def _expected_tensors(entry: FileEntry, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor the file must hold (an untied lm_head aside)."""
    # One layer's shapes, renumbered below: a file holds a few layers, not all n_layer.
    one = expected_shapes(dataclasses.replace(config, n_layer=1))
    if entry.role == "embeddings":
        return {k: one[k] for k in ("wte.weight", "wpe.weight")}
    if entry.role == "head":
        return {k: v for k, v in one.items() if k.startswith("ln_f.")}
    a, b = entry.layers
    shapes = {f"h.{i}.{k[4:]}": v for i in range(a, b) for k, v in one.items() if k.startswith("h.0.")}
    if entry.heads is not None:  # slice meta tensors: the writer's own rules, and no memory
        meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        shapes = {k: tuple(t.shape) for k, t in slice_block_weights(meta, config, entry.heads).items()}
    return shapes


def _check_tensors(entry: FileEntry, sd: StateDict, manifest: Manifest) -> None:
    """ShardIntegrityError naming the file unless it holds exactly the tensors the config needs:
    a file can match its hash and still be wrong if whoever made the manifest got it wrong."""
    config = manifest.config
    shapes = _expected_tensors(entry, config)
    if entry.role == "head" and "lm_head.weight" in sd:  # an untied head is stored with ln_f
        shapes["lm_head.weight"] = (config.vocab_size, config.n_embd)
    missing, extra = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    problems = [f"missing {', '.join(missing[:4])}"] if missing else []
    problems += [f"unexpected {', '.join(extra[:4])}"] if extra else []
    problems += [f"{k} has shape {tuple(t.shape)}, the config needs {shapes[k]}"
                 for k, t in sd.items() if k in shapes and tuple(t.shape) != shapes[k]][:4]
    problems += [f"{k} is {t.dtype}, the manifest says {manifest.dtype}"
                 for k, t in sd.items() if t.dtype != DTYPES[manifest.dtype]][:1]
    if problems:
        raise ShardIntegrityError(f"{entry.name}: tensors do not match the manifest: {'; '.join(problems)}")


def _materialize(module: _M, sd: StateDict, device: torch.device | str, dtype: torch.dtype) -> _M:
    # Modules are built on the meta device and take the loaded tensors by assignment: no random
    # init and no second copy of the weights, which matters for the big layers.
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    module.eval().requires_grad_(False)
    return module


def _embeddings_from(sd: StateDict, config: ModelConfig, device: torch.device | str,
                     dtype: torch.dtype) -> Embeddings:
    with torch.device("meta"):
        module = Embeddings(config, init=False)
    return _materialize(module, sd, device, dtype)


def _head_from(sd: StateDict, wte: torch.Tensor, config: ModelConfig, device: torch.device | str,
               dtype: torch.dtype) -> Head:
    with torch.device("meta"):
        module = Head(config)
    sd = sd if "lm_head.weight" in sd else {**sd, "lm_head.weight": wte}  # tied to wte
    head = _materialize(module, sd, device, dtype)
    head.freeze_for_inference()
    return head


def load_embeddings(model_dir: str | Path, manifest: Manifest | None = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Embeddings:
    manifest = manifest or read_manifest(model_dir)
    sd = read_verified(model_dir, manifest.entry("embeddings"), manifest)
    return _embeddings_from(sd, manifest.config, device, dtype)


def load_head(model_dir: str | Path, manifest: Manifest | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Head:
    manifest = manifest or read_manifest(model_dir)
    sd = read_verified(model_dir, manifest.entry("head"), manifest)
    wte = None
    if "lm_head.weight" not in sd:
        wte = read_verified(model_dir, manifest.entry("embeddings"), manifest)["wte.weight"]
    return _head_from(sd, wte, manifest.config, device, dtype)


def _find_file(manifest: Manifest, layer: int, heads: Range | None) -> FileEntry | None:
    full = (0, manifest.config.n_head)
    for f in manifest.files:
        if f.role == "blocks" and f.layers[0] <= layer < f.layers[1] and (f.heads or full) == (heads or full):
            return f
    return None


def _plan_blocks(manifest: Manifest, start: int, stop: int, heads: Range) -> dict[FileEntry, list[int]]:
    """Which file gives each layer: an exactly matching head-sliced file if there is one, else a
    full-layer file (sliced in memory). Files in layer order, each read once."""
    plan: dict[FileEntry, list[int]] = {}
    for layer in range(start, stop):
        entry = _find_file(manifest, layer, heads) or _find_file(manifest, layer, None)
        if entry is None:
            raise ManifestError(f"layer {layer} (heads {heads[0]}:{heads[1]}) is in no file of the manifest")
        plan.setdefault(entry, []).append(layer)
    return plan


def check_block_files(model_dir: str | Path, manifest: Manifest) -> None:
    """ShardIntegrityError unless every block's whole-heads file is in `model_dir` at its size:
    a client that redoes blocks (--verify) finds a missing one before it asks the swarm, not at
    its first check mid-generation (review207). The contents are checked as each is loaded."""
    config = manifest.config
    for entry in _plan_blocks(manifest, 0, config.n_layer, (0, config.n_head)):
        path = Path(model_dir) / entry.name
        try:
            size = path.stat().st_size
        except OSError as exc:
            why = exc.strerror if exc.strerror else exc
            raise ShardIntegrityError(f"{entry.name}: cannot read it from {model_dir}: {why}") from exc
        if size != entry.size:
            raise ShardIntegrityError(f"{entry.name}: it is {size} bytes, the manifest says {entry.size}")


def load_blocks(model_dir: str | Path, start: int, stop: int, heads: Range | None = None,
                manifest: Manifest | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Blocks:
    """Blocks [start, stop) (heads [a, b) of each), from only the files that hold them."""
    manifest = manifest or read_manifest(model_dir)
    config = manifest.config
    heads = tuple(heads) if heads is not None else (0, config.n_head)
    if not 0 <= start < stop <= config.n_layer:
        raise ValueError(f"block range {start}:{stop} is outside 0:{config.n_layer}")
    plan = _plan_blocks(manifest, start, stop, heads)  # a missing layer fails before any work
    with torch.device("meta"):
        module = Blocks(config, start, stop, heads)  # validates the head range
    sd: StateDict = {}
    for entry, layers in plan.items():
        wanted = {k: v for k, v in read_verified(model_dir, entry, manifest).items()
                  if layer_of(k) in layers}
        if (entry.heads or (0, config.n_head)) != heads:
            wanted = slice_block_weights(wanted, config, heads)
        sd.update(wanted)
    return _materialize(module, sd, device, dtype)


def load_model(model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """The whole model in one process, eval mode: the reference and local generation."""
    manifest = read_manifest(model_dir)
    config = manifest.config
    embeddings = _embeddings_from(read_verified(model_dir, manifest.entry("embeddings"), manifest),
                                  config, device, dtype)
    head_sd = read_verified(model_dir, manifest.entry("head"), manifest)
    # Passing the wte Parameter itself keeps the tie: one tensor, not a copy.
    head = _head_from(head_sd, embeddings.wte.weight, config, device, dtype)
    blocks = load_blocks(model_dir, 0, config.n_layer, manifest=manifest, device=device, dtype=dtype)
    with torch.device("meta"):
        model = GPT(config, init=False)
    model.embeddings, model.blocks, model.head = embeddings, blocks, head
    return model.eval().requires_grad_(False)
