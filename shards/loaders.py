"""Read GPT-2 checkpoints in the two layouts people have: nanoGPT's ckpt.pt and a
Hugging Face GPT-2 directory. Both come out as one "flat" form: GPT-2 names without prefixes
(wte.weight, h.0.attn.c_attn.weight, ln_f.bias, ...), nn.Linear layout ([out, in]), float32;
lm_head.weight only when it is not tied to wte. That is what the shard writer (manifest.py)
takes, and GPT.load_flat_state_dict for a tied model (it refuses an untied head).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.torch_version import InvalidVersion, Version

from nanoswarm.files import read_regular_file

from .model import ModelConfig
from .tokenizer import N_VOCAB

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
ConfigCheck = Callable[[ModelConfig], None]  # load_checkpoint's early look at a config

GPT2_VOCAB = N_VOCAB  # the tokenizer's ids
# The most rows a vocabulary padded for speed has: 50257 rounded up to a multiple of 1024
# (nanoGPT pads to 50304, a multiple of 64). More is a model of another tokenizer.
MAX_PADDED_VOCAB = -(-GPT2_VOCAB // 1024) * 1024
NANOGPT_PADDED_VOCAB = 50304
# Hugging Face's GPT-2 uses Conv1D, which stores weights [in, out]; these names need a transpose.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that old nanoGPT and HF checkpoints save next to the weights.
_BUFFER_RE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
HF_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}


# Far above any GPT-2-family model, yet low enough that a manifest or checkpoint from elsewhere
# cannot make a loader build millions of modules or names (a hang, or memory without end) before
# its weights are looked at.
CONFIG_LIMITS = {"n_layer": 1024, "n_head": 1024, "n_embd": 1 << 16, "block_size": 1 << 20}


def check_size_limits(config: ModelConfig) -> None:
    """ValueError for a config above CONFIG_LIMITS."""
    for name, limit in CONFIG_LIMITS.items():
        if getattr(config, name) > limit:
            raise ValueError(f"{name} {getattr(config, name)} is above the limit {limit}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: unknown layout, missing or misshapen weights."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the flat form (tied lm_head excluded) and its nn.Linear-layout shape."""
    E, bias = config.n_embd, config.bias
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, E), "wpe.weight": (config.block_size, E),
        "ln_f.weight": (E,),
    }
    per_layer = {
        "ln_1.weight": (E,), "attn.c_attn.weight": (3 * E, E), "attn.c_proj.weight": (E, E),
        "ln_2.weight": (E,), "mlp.c_fc.weight": (4 * E, E), "mlp.c_proj.weight": (E, 4 * E),
    }
    if bias:
        shapes["ln_f.bias"] = (E,)
        per_layer.update({"ln_1.bias": (E,), "attn.c_attn.bias": (3 * E,), "attn.c_proj.bias": (E,),
                          "ln_2.bias": (E,), "mlp.c_fc.bias": (4 * E,), "mlp.c_proj.bias": (E,)})
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def validate_flat_state_dict(config: ModelConfig, sd: StateDict, source: str) -> None:
    """Raise CheckpointError naming missing or misshapen weights (so a wrong layout fails here
    and not as a cryptic matmul error on some peer later)."""
    expected = expected_shapes(config)
    if "lm_head.weight" in sd:
        expected["lm_head.weight"] = (config.vocab_size, config.n_embd)
    missing = sorted(set(expected) - set(sd))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: missing weights: {shown}")
    bad = [f"{k} {tuple(sd[k].shape)} (expected {v})" for k, v in expected.items()
           if tuple(sd[k].shape) != v]
    if bad:
        raise CheckpointError(f"{source}: wrong shapes: {'; '.join(bad[:8])}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected weights: {', '.join(extra[:8])}")


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:  # prefixes can stack: _orig_mod.transformer.h.0...
        changed = False
        for p in prefixes:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _finish(config: ModelConfig, raw: StateDict, source: str,
            transpose_conv1d: bool) -> tuple[ModelConfig, StateDict]:
    """Shared tail of both layouts: drop buffers, transpose Conv1D, untie, crop vocab, check."""
    sd: StateDict = {}
    for key, t in raw.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is not a tensor")
        name = _strip(key, ("_orig_mod.", "module.", "transformer."))
        if _BUFFER_RE.match(name):
            continue
        if not t.is_floating_point():  # ints, bools, complex: not weights, and a cast would hide it
            kind = str(t.dtype).removeprefix("torch.")
            raise CheckpointError(f"{source}: {key} holds {kind}, not floating-point weights")
        t = t.detach().to(torch.float32)
        if not torch.isfinite(t).all():  # a node would refuse every step through it (bad_value)
            raise CheckpointError(f"{source}: {key} holds NaN or Inf")
        if transpose_conv1d and name.endswith(CONV1D_WEIGHTS) and t.dim() == 2:
            t = t.t()
        sd[name] = t.contiguous()
    wte, head = sd.get("wte.weight"), sd.get("lm_head.weight")
    if wte is not None and head is not None and head.shape == wte.shape and torch.equal(head, wte):
        del sd["lm_head.weight"]  # tied to wte, as in GPT-2: the flat form stores it once
    if config.vocab_size > MAX_PADDED_VOCAB:
        raise CheckpointError(f"{source}: vocab_size {config.vocab_size} is neither the GPT-2 tokenizer's "
                              f"{GPT2_VOCAB} nor it padded (up to {MAX_PADDED_VOCAB}): a model of another "
                              "tokenizer; nanoswarm serves GPT-2-tokenized models only")
    if config.vocab_size > GPT2_VOCAB:
        # nanoGPT pads the vocabulary to 50304 (a multiple of 64) for speed. The extra rows are
        # never real tokens: cropping them leaves the logits of the 50257 real tokens unchanged
        # (each logit is its own row's dot product) and keeps unencodable ids from being sampled.
        # Past 50304 they may be tokens a fine-tune added, which the GPT-2 tokenizer has no ids for.
        log.log(logging.INFO if config.vocab_size <= NANOGPT_PADDED_VOCAB else logging.WARNING,
                "%s: cropping the vocabulary %d to the GPT-2 tokenizer's %d (rows past it are padding, "
                "or tokens it cannot write)", source, config.vocab_size, GPT2_VOCAB)
        for k in ("wte.weight", "lm_head.weight"):
            if k in sd:
                sd[k] = sd[k][:GPT2_VOCAB].clone()  # clone: free the padded storage
        config = ModelConfig(**{**config.to_dict(), "vocab_size": GPT2_VOCAB})
    validate_flat_state_dict(config, sd, source)
    return config, sd


def _config(source: str, **fields) -> ModelConfig:
    try:
        config = ModelConfig(**fields)
        check_size_limits(config)  # before expected_shapes names 12 weights a layer
        return config
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad model config: {exc}") from exc


def first_line(exc: Exception) -> str:
    """The first non-empty line of an exception's message (torch's and safetensors' run to
    several), or its type name: error messages here are one line."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def check_tokenizer_vocab(config: ModelConfig, source: str) -> None:
    """CheckpointError unless the model can embed every id of the GPT-2 tokenizer, the only one
    nanoswarm has: a smaller vocabulary (nanoGPT's character-level 65, say) was trained on other
    ids, and its prompts would fail or mean something else. A padded one was cropped to 50257."""
    if config.vocab_size < GPT2_VOCAB:
        raise CheckpointError(f"{source}: vocab_size {config.vocab_size} is smaller than the GPT-2 "
                              f"tokenizer's {GPT2_VOCAB} ids; nanoswarm serves GPT-2-tokenized models only")


# torch.load(weights_only=True) ran code from a crafted file before 2.6 (CVE-2025-32434) and could
# corrupt memory before 2.10 (CVE-2026-24747, GHSA-63cw-57p8-fm3p): older versions are not asked to
# unpickle a stranger's checkpoint at all. pyproject.toml asks for 2.10 too.
SAFE_TORCH_LOAD = (2, 10)


def _torch_load_is_safe() -> bool:
    """By PEP 440, as pip reads pyproject's torch>=2.10: 2.10.0+cpu is, a 2.10.0a0 nightly (which
    may predate the fix) is not, and a version that does not parse is not either."""
    try:
        return Version(torch.__version__) >= Version(".".join(map(str, SAFE_TORCH_LOAD)))
    except (InvalidVersion, TypeError):
        return False


def _check_torch_file(path: Path) -> None:
    """CheckpointError for what torch.load would fail on with an unhelpful word ("EOFError",
    "KeyError: 101"): an empty file, or one that is neither torch.save's zip archive nor a
    legacy pickle."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: safetensors weights alone have no config: give the Hugging Face "
                              "directory that holds them with its config.json")
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path}: not a torch checkpoint (torch.save writes a zip archive)")


def _torch_load(path: Path) -> dict:
    if not _torch_load_is_safe():
        raise CheckpointError(f"{path}: torch {torch.__version__} cannot read pickled checkpoints safely; "
                              f"upgrade to torch>={'.'.join(map(str, SAFE_TORCH_LOAD))} or give safetensors weights")
    _check_torch_file(path)
    try:
        with warnings.catch_warnings():  # noise on stderr; any problem is in the error below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # weights_only: a checkpoint from a stranger must not be able to run code on unpickling.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, i.e. running the file's code: we never do.
        # Keep only what it found (say "Unsupported global: GLOBAL x.Y"), not that advice or
        # the allowlisting advice after it.
        found = (re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
                 or re.search(r"^(Trying to load unsupported .+?)\.?$", str(exc), re.MULTILINE))  # torch 2.13
        detail = f" ({found.group(1).split('. Please')[0].strip()})" if found else ""
        raise CheckpointError(f"{path}: not a checkpoint of plain tensors and settings{detail}") from exc
    except Exception as exc:  # torch raises many kinds for a bad file (a text file: KeyError 101)
        raise CheckpointError(f"{path}: cannot load it as a checkpoint: {type(exc).__name__}: "
                              f"{first_line(exc)}") from exc


def load_nanogpt(path: Path, gelu: str | None = None,
                 check: ConfigCheck | None = None) -> tuple[ModelConfig, StateDict]:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (needs 'model' and 'model_args')")
    args = ckpt["model_args"]
    if not isinstance(args, dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' and 'model_args' must be dictionaries")
    needed = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    missing = [k for k in needed if k not in args]
    if missing:
        raise CheckpointError(f"{path}: model_args lacks {', '.join(missing)}")
    # nanoGPT's MLP uses nn.GELU() (exact erf); our own writer records the form it trained with.
    form = gelu or ckpt.get("gelu") or "exact"
    bias = args.get("bias", True)
    if not isinstance(bias, bool):  # bool("no") would be True
        raise CheckpointError(f"{path}: model_args bias must be True or False, got {bias!r:.40}")
    config = _config(str(path), **{k: args[k] for k in needed}, bias=bias, gelu=form)
    if check is not None:
        check(config)
    return _finish(config, ckpt["model"], str(path), transpose_conv1d=False)


def _hf_config(path: Path, gelu: str | None) -> ModelConfig:
    try:
        cfg = json.loads(read_regular_file(path))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}")
    act = cfg.get("activation_function", "gelu_new")
    if not isinstance(act, str) or (gelu is None and act not in HF_ACTIVATIONS):
        raise CheckpointError(f"{path}: unsupported activation_function {act!r:.60}")
    # Architecture switches our Block does not implement: refuse rather than compute wrong logits.
    n_inner, n_embd = cfg.get("n_inner"), cfg["n_embd"]
    if n_inner is not None and type(n_embd) is int and n_inner != 4 * n_embd:  # (a bad n_embd: _config says)
        raise CheckpointError(f"{path}: n_inner {n_inner!r:.40} is not 4 * n_embd")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        raise CheckpointError(f"{path}: non-standard attention scaling is not supported")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if type(eps) is not float or not abs(eps - 1e-5) <= 1e-12:  # (NaN compares false)
        raise CheckpointError(f"{path}: layer_norm_epsilon must be 1e-5")
    if not isinstance(cfg.get("tie_word_embeddings", True), bool):  # the string "false" is not False
        raise CheckpointError(f"{path}: tie_word_embeddings must be true or false")
    block_size = cfg.get("n_positions", cfg.get("n_ctx"))
    if block_size is None:
        raise CheckpointError(f"{path}: lacks n_positions (the context length)")
    return _config(str(path), n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                   vocab_size=cfg["vocab_size"], block_size=block_size, bias=True,
                   gelu=gelu or HF_ACTIVATIONS[act])


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own kinds for a bad file
        raise CheckpointError(f"{path}: not a readable safetensors file: {first_line(exc)}") from exc


def _hf_weights(directory: Path) -> StateDict:
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():  # sharded safetensors: weight_map says which file holds each tensor
        return {k: v for f in _index_files(index) for k, v in _load_safetensors(directory / f).items()}
    if (directory / "pytorch_model.bin").is_file():
        sd = _torch_load(directory / "pytorch_model.bin")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{directory}/pytorch_model.bin does not hold a state dict")
        return sd.get("state_dict", sd)
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _index_files(index: Path) -> list[str]:
    """The weight files a sharded checkpoint's index names: plain names in its own directory."""
    try:
        weight_map = json.loads(read_regular_file(index))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(exc).__name__})") from None
    bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or f.startswith(".")]
    if bad:
        raise CheckpointError(f"{index}: weight_map names files outside its directory: {bad[:3]}")
    return files


def load_hf(directory: Path, gelu: str | None = None,
            check: ConfigCheck | None = None) -> tuple[ModelConfig, StateDict]:
    config = _hf_config(directory / "config.json", gelu)
    if check is not None:  # before the weights, which may be gigabytes
        check(config)
    weights = _hf_weights(directory)
    if not _hf_tied(directory / "config.json") and not any(
            _strip(k, ("_orig_mod.", "module.", "transformer.")) == "lm_head.weight" for k in weights):
        # Hugging Face would make up a random head here; serving wte as the head is no better.
        raise CheckpointError(f"{directory}: config.json says tie_word_embeddings false, but the weights "
                              "have no lm_head.weight")
    return _finish(config, weights, str(directory), transpose_conv1d=True)


def _hf_tied(path: Path) -> bool:
    """Whether a (readable: _hf_config read it) config.json ties the head to wte, HF's default."""
    return json.loads(read_regular_file(path)).get("tie_word_embeddings", True) is not False


def load_checkpoint(source: str | Path, gelu: str | None = None,
                    check: ConfigCheck | None = None) -> tuple[ModelConfig, StateDict]:
    """Config and flat float32 weights of a nanoGPT ckpt.pt (or its out_dir) or a Hugging Face
    GPT-2 directory. `gelu` overrides the GELU form the layout implies. `check(config)` runs as
    soon as the config is known, before the weights are read (a Hugging Face directory) or
    converted (a ckpt.pt, whose config is inside it), so that what it raises comes early."""
    path = Path(source)
    if gelu is not None and gelu not in ("tanh", "exact"):
        raise CheckpointError(f"gelu must be 'tanh' or 'exact', got {gelu!r}")
    log.info("reading checkpoint %s", source)
    if path.is_file() and path.name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        path = path.parent  # a file of a Hugging Face directory: take the directory
    if path.is_dir():
        if (path / "config.json").is_file():
            return load_hf(path, gelu, check)
        if (path / "ckpt.pt").is_file():
            return load_nanogpt(path / "ckpt.pt", gelu, check)
        raise CheckpointError(f"{path}: neither a Hugging Face GPT-2 directory (config.json) "
                              "nor a nanoGPT out_dir (ckpt.pt)")
    if path.is_file():
        return load_nanogpt(path, gelu, check)
    if path.exists():  # a FIFO, a device: reading one may never end
        raise CheckpointError(f"{source}: not a regular file or a directory")
    raise CheckpointError(f"{source}: no such checkpoint file or directory")

