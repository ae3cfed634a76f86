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
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from nanoswarm.files import read_regular_file, write_beside
from nanoswarm.protocol.tensors import abs_max

from .loaders import (
    GPT2_VOCAB,
    StateDict,
    check_size_limits,
    check_tokenizer_vocab,
    load_checkpoint,
    validate_flat_state_dict,
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


def _as(value: object, kind: type, message: str):
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


# ---- writing ----

def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"storage dtype must be one of {sorted(DTYPES)}, got {dtype}")


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


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


# ---- reading ----

def read_manifest(model_dir: str | Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    try:
        text = read_regular_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # the path only once
        raise ManifestError(f"cannot read {path}: {why}") from exc
    try:
        return Manifest.from_json(text)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
