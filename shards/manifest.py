"""The model directory: weights cut into safetensors files plus a manifest.json that lists them.

A peer downloads and loads only the files for the blocks (and heads) it serves, so every file is
hash-checked on load against the manifest (weights.py): a corrupted or tampered shard is refused instead of
quietly producing wrong activations for other people's prompts. The manifest's own hash is the
model id that peers and clients compare to be sure they run the same weights.

Files: embeddings.safetensors (wte, wpe), head.safetensors (ln_f; lm_head only if untied),
blocks-{a}-{b}.safetensors (layers [a, b)) and, optionally, head-sliced
blocks-{a}-{b}-heads-{i}-{j}.safetensors. Tensor names are the flat GPT-2 names (loaders.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoswarm.files import read_regular_file

from .loaders import (
    GPT2_VOCAB,
    StateDict,
    check_size_limits,
)
from .model import ModelConfig, head_slice_width

log = logging.getLogger(__name__)

FORMAT = "nanoswarm-model/1"
MANIFEST_NAME = "manifest.json"
ROLES = ("embeddings", "head", "blocks")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LAYER_RE = re.compile(r"^h\.(\d+)\.(.+)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
Range = tuple[int, int]


class ManifestError(ValueError):
    """manifest.json is missing or invalid, or does not list what was asked for."""


class ShardIntegrityError(Exception):
    """A weight file is missing or its bytes do not match the manifest."""


# ---- manifest data ----

@dataclass(frozen=True)
class FileEntry:
    name: str
    role: str
    layers: Range | None  # half-open block range, blocks files only
    heads: Range | None  # half-open head range; None = all heads
    sha256: str
    size: int

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "sha256": self.sha256, "size": self.size,
                "layers": list(self.layers) if self.layers else None,
                "heads": list(self.heads) if self.heads else None}


@dataclass
class Manifest:
    config: ModelConfig
    tokenizer: str = "gpt2"
    dtype: str = "float32"  # storage dtype of the files
    files: list[FileEntry] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "config": self.config.to_dict(), "tokenizer": self.tokenizer,
                "dtype": self.dtype, "files": [f.to_dict() for f in self.files]}

    @property
    def model_id(self) -> str:
        # Canonical JSON, so the id depends on the content only, not on formatting or key order.
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({**self.to_dict(), "model_id": self.model_id}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than Python's stack
            raise ManifestError(f"manifest is not valid JSON: {type(exc).__name__}: {exc}") from exc
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        d = _as(d, dict, "manifest must be a JSON object")
        _require(d.get("format") == FORMAT, f"unsupported manifest format {d.get('format')!r}")
        unknown = set(d) - {"format", "config", "tokenizer", "dtype", "files", "model_id"}
        _require(not unknown, f"unknown manifest fields: {sorted(unknown)}")
        config = _config_from(d.get("config"))
        _require(d.get("tokenizer") == "gpt2", f"unsupported tokenizer {d.get('tokenizer')!r}")
        _require(d.get("dtype") in tuple(DTYPES), f"dtype must be one of {sorted(DTYPES)}")
        files = _as(d.get("files"), list, "files must be a list")
        m = cls(config=config, dtype=d["dtype"], files=[_entry_from(f, config) for f in files])
        _check_files(m)
        if "model_id" in d:
            _require(d["model_id"] == m.model_id, "model_id does not match the manifest content")
        return m

    def entry(self, role: str) -> FileEntry:
        return next(f for f in self.files if f.role == role)  # from_dict ensured exactly one


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ManifestError(message)


def _as(value: object, kind: type, message: str) -> Any:
    """`value` if it is a `kind`, else a ManifestError (JSON from elsewhere can hold anything)."""
    _require(isinstance(value, kind), message)
    return value


def _range(v: object, limit: int, what: str) -> Range | None:
    if v is None:
        return None
    message = f"{what} must be [start, stop] integers, got {v!r}"
    v = _as(v, list, message)
    _require(len(v) == 2 and all(type(x) is int for x in v), message)
    _require(0 <= v[0] < v[1] <= limit, f"{what} {v} is outside 0:{limit}")
    return v[0], v[1]


def _config_from(d: object) -> ModelConfig:
    d = _as(d, dict, "config must be an object")
    names = set(ModelConfig().to_dict())
    # Every field must be present: a default filled in silently (say gelu) would change logits.
    _require(set(d) == names, f"config fields must be exactly {sorted(names)}")
    _require(isinstance(d["bias"], bool), "config.bias must be true or false")
    try:
        config = ModelConfig(**d)
        check_config_limits(config)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"bad config: {exc}") from exc
    return config


def check_config_limits(config: ModelConfig) -> None:
    """ValueError for a config no model directory may have (loaders.CONFIG_LIMITS, the vocabulary)."""
    check_size_limits(config)
    # The gpt2 tokenizer decodes ids < 50257 only: a larger vocabulary could sample ids it cannot
    # decode (the loaders crop nanoGPT's padded 50304 to 50257 for that reason).
    if config.vocab_size > GPT2_VOCAB:
        raise ValueError(f"vocab_size {config.vocab_size} is above the gpt2 tokenizer's {GPT2_VOCAB} ids")


# What a shard file may be called: no path separators, NUL, leading dot or empty name.
_FILE_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,254}")


def _entry_from(d: object, config: ModelConfig) -> FileEntry:
    d = _as(d, dict, "each file entry must be an object")
    keys = {"name", "role", "layers", "heads", "sha256", "size"}
    _require(set(d) == keys, f"file entry fields must be exactly {sorted(keys)}, got {sorted(d)}")
    name = d["name"]
    # A plain file name: a manifest from elsewhere must not make us read outside the directory.
    _require(isinstance(name, str) and bool(_FILE_NAME.fullmatch(name)), f"bad file name {name!r}"[:200])
    _require(d["role"] in ROLES, f"{name}: role must be one of {ROLES}")
    _require(isinstance(d["sha256"], str) and bool(_SHA_RE.match(d["sha256"])),
             f"{name}: sha256 must be 64 lowercase hex digits")
    _require(type(d["size"]) is int and d["size"] >= 0, f"{name}: bad size")
    layers = _range(d["layers"], config.n_layer, f"{name}: layers")
    heads = _range(d["heads"], config.n_head, f"{name}: heads")
    _require((layers is not None) == (d["role"] == "blocks"), f"{name}: only blocks files have layers")
    _require(heads is None or d["role"] == "blocks", f"{name}: only blocks files have heads")
    return FileEntry(name, d["role"], layers, heads, d["sha256"], d["size"])


def _check_files(m: Manifest) -> None:
    names = [f.name for f in m.files]
    _require(len(names) == len(set(names)), "file names repeat")
    for role in ("embeddings", "head"):
        _require(sum(f.role == role for f in m.files) == 1, f"need exactly one {role} file")
    # Every layer needs a full-head file: head-sliced files are optional extras, and a layer no
    # file holds would only fail later, on some peer, after it built its modules.
    covered = 0
    full = (None, (0, m.config.n_head))  # an entry may also name all heads explicitly
    for a, b in sorted(f.layers for f in m.files if f.role == "blocks" and f.heads in full):
        _require(a <= covered, f"layers {covered}:{a} are in no full-head blocks file")
        covered = max(covered, b)
    _require(covered == m.config.n_layer,
             f"layers {covered}:{m.config.n_layer} are in no full-head blocks file")


# ---- head splits ----

def validate_head_splits(splits: list[Range], n_head: int) -> list[Range]:
    """The splits sorted; they must partition heads 0..n_head into non-empty ranges."""
    ordered = sorted((int(a), int(b)) for a, b in splits)
    written = ",".join(f"{int(a)}:{int(b)}" for a, b in splits)  # as given, in the CLI's form
    pos = 0
    for a, b in ordered:
        if a != pos or b <= a:
            raise ValueError(f"head splits {written} must partition 0:{n_head} into non-empty ranges")
        pos = b
    if pos != n_head:
        raise ValueError(f"head splits {written} must cover all heads 0:{n_head}")
    return ordered


def head_split_pairs(spec: str | None, groups: int | None) -> list[tuple[int, ...]]:
    """What can be checked of a head split before the model's head count is known (the CLI checks
    it before reading a checkpoint): one form, not both; at least one group; "0:6,6:12" syntax."""
    if spec and groups is not None:
        raise ValueError("give head splits either as ranges or as a number of groups, not both")
    if groups is not None and groups < 1:  # 0 is a (bad) value, not "not given"
        raise ValueError(f"head groups must be 1 or more, got {groups}")
    if not spec:
        return []
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in spec.split(",")]
    except ValueError as exc:
        raise ValueError(f"head splits {spec!r} must look like 0:6,6:12") from exc
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"head splits {spec!r} must look like 0:6,6:12")
    return pairs


def parse_head_splits(spec: str | None, groups: int | None, n_head: int) -> list[Range] | None:
    """"0:6,6:12" (half-open, a partition of all heads) or `groups` near-equal groups; None if
    neither is given."""
    pairs = head_split_pairs(spec, groups)
    if groups is not None:
        if not 1 <= groups <= n_head:
            raise ValueError(f"head groups must be from 1 to {n_head}, got {groups}")
        base, extra = divmod(n_head, groups)
        sizes = [base + (g < extra) for g in range(groups)]  # sizes differ by at most one
        starts = [sum(sizes[:g]) for g in range(groups)]
        return [(s, s + n) for s, n in zip(starts, sizes, strict=True)]
    if not pairs:
        return None
    return validate_head_splits(pairs, n_head)  # type: ignore[arg-type]


def slice_block_weights(flat_block_sd: StateDict, config: ModelConfig, heads: Range) -> StateDict:
    """The share of full-block weights (h.{i}.* keys, any layers) that serves heads [a, b); what
    Blocks(config, start, stop, heads).load_state_dict takes. See model.Block for the rules."""
    a, b = heads
    if not 0 <= a < b <= config.n_head:
        raise ValueError(f"head range {a}:{b} is outside 0:{config.n_head}")
    E, hd = config.n_embd, config.head_dim
    q0, q1 = a * hd, b * hd
    f0, f1 = head_slice_width(config, heads)
    out: StateDict = {}
    for name, t in flat_block_sd.items():
        m = _LAYER_RE.match(name)
        if not m:
            raise ValueError(f"{name} is not a block weight")
        part = m.group(2)
        if part in ("attn.c_attn.weight", "attn.c_attn.bias"):  # rows q | k | v, each E wide
            t = torch.cat([t[s * E + q0:s * E + q1] for s in range(3)])
        elif part == "attn.c_proj.weight":
            t = t[:, q0:q1]
        elif part in ("mlp.c_fc.weight", "mlp.c_fc.bias"):
            t = t[f0:f1]
        elif part == "mlp.c_proj.weight":
            t = t[:, f0:f1]
        elif part in ("attn.c_proj.bias", "mlp.c_proj.bias"):
            if a != 0:
                continue  # only the slice with head 0 adds the output bias, so the sum has it once
        elif not part.startswith(("ln_1.", "ln_2.")):
            raise ValueError(f"unknown block weight {name}")
        out[name] = t.contiguous().clone()
    return out


def layer_of(name: str) -> int | None:
    """The block a flat weight name belongs to (h.{i}.*), or None."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


# ---- reading ----

def read_manifest(model_dir: str | Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    try:
        text = read_regular_file(path).decode("utf-8")
    except (FileNotFoundError, NotADirectoryError) as exc:  # a new user's first mistake: say what to do
        raise ManifestError(f"{model_dir} is not a model directory (it has no {MANIFEST_NAME}): make one from a "
                            "checkpoint with `nanoswarm shard CHECKPOINT DIR`") from exc
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # the path only once
        raise ManifestError(f"cannot read {path}: {why}") from exc
    try:
        return Manifest.from_json(text)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
