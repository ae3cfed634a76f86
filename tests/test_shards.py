"""Checkpoint loaders, the model directory (sharding, hashes, head slices) and the tokenizer."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from conftest import SMALL, make_gpt
from safetensors.torch import load_file

from nanoswarm.shards import cut, model, weights
from nanoswarm.shards import manifest as mf
from nanoswarm.shards.loaders import CheckpointError, load_checkpoint
from nanoswarm.shards.model import GPT, ModelConfig
from nanoswarm.shards.tokenizer import (
    EOT_TOKEN,
    TokenizerFileError,
    decode,
    encode,
    get_encoding,
    load_bpe_ranks,
)
from nanoswarm.shards.writers import save_hf_checkpoint, save_nanogpt_checkpoint

TWELVE_HEADS = ModelConfig(n_layer=2, n_head=12, n_embd=96, vocab_size=500, block_size=32, gelu="exact")


def from_flat(config: ModelConfig, sd: dict[str, torch.Tensor]) -> GPT:
    model = GPT(config)
    model.load_flat_state_dict(sd)
    return model.eval()


def ids_for(config: ModelConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (2, 12), generator=g)


@torch.no_grad()
def max_diff(a: GPT, b: GPT, ids: torch.Tensor) -> float:
    return (a(ids) - b(ids)).abs().max().item()


# ---- tokenizer ----

def test_tokenizer_known_sentence():
    ids = encode("Hello world, this is GPT-2.")
    assert ids == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert decode(ids) == "Hello world, this is GPT-2."
    assert get_encoding().n_vocab == 50257
    assert encode("<|endoftext|>", allow_eot=True) == [EOT_TOKEN]
    assert EOT_TOKEN not in encode("<|endoftext|>")  # user text cannot inject the special token


def test_tokenizer_refuses_wrong_hash():
    with pytest.raises(TokenizerFileError, match="sha256"):
        load_bpe_ranks(expected_sha256="0" * 64)


# ---- checkpoint layouts ----

@pytest.mark.parametrize("prefix,use_safetensors", [(True, True), (False, True), (True, False)])
def test_hf_layout_loads_to_same_logits(tmp_path, prefix, use_safetensors):
    model = make_gpt(SMALL)
    save_hf_checkpoint(SMALL, model.flat_state_dict(), tmp_path, use_transformer_prefix=prefix,
                       safetensors=use_safetensors, include_buffers=True)
    config, sd = load_checkpoint(tmp_path)
    assert config == SMALL
    assert "lm_head.weight" not in sd  # tied copy in pytorch_model.bin is recognised and dropped
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert max_diff(from_flat(config, sd), model, ids_for(SMALL)) <= 1e-5


def test_hf_sharded_index_loads_and_bad_indexes_are_refused(tmp_path):
    """A sharded HF checkpoint (model.safetensors.index.json) loads like a single file; an index
    without a weight_map, or naming files outside its directory, is refused in one line."""
    from safetensors.torch import save_file

    model = make_gpt(SMALL)
    save_hf_checkpoint(SMALL, model.flat_state_dict(), tmp_path)
    raw = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(raw)
    halves = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: raw[k] for k in keys}, tmp_path / file)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    config, sd = load_checkpoint(tmp_path)
    assert max_diff(from_flat(config, sd), model, ids_for(SMALL)) <= 1e-5
    for bad, why in [({"metadata": {}}, "weight_map"), ({"weight_map": {"wte.weight": "../x.safetensors"}}, "outside"),
                     ({"weight_map": ["x"]}, "weight_map")]:
        index.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=why) as info:
            load_checkpoint(tmp_path)
        assert "\n" not in str(info.value)


def test_hf_conv1d_weights_are_stored_transposed(tmp_path):
    save_hf_checkpoint(SMALL, make_gpt(SMALL).flat_state_dict(), tmp_path)
    raw = load_file(tmp_path / "model.safetensors")
    assert raw["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # [in, out]
    assert raw["transformer.h.0.mlp.c_proj.weight"].shape == (256, 64)


@pytest.fixture(scope="module")
def padded_nanogpt(tmp_path_factory):
    """A nanoGPT ckpt.pt as torch.compile'd training leaves it: `_orig_mod.` keys, vocabulary
    padded to 50304 with random extra rows, tied lm_head, old causal-mask buffers, exact GELU."""
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, block_size=32, gelu="exact")
    model = make_gpt(config, seed=3)
    flat = model.flat_state_dict()
    wte = torch.cat([flat.pop("wte.weight"), torch.randn(50304 - 50257, 64)])
    sd = {f"_orig_mod.transformer.{k}": v for k, v in flat.items()}
    sd.update({"_orig_mod.transformer.wte.weight": wte, "_orig_mod.lm_head.weight": wte})
    sd.update({f"_orig_mod.transformer.h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)})
    args = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32, "bias": True,
            "vocab_size": 50304, "dropout": 0.0}
    path = tmp_path_factory.mktemp("nanogpt") / "ckpt.pt"
    torch.save({"model": sd, "model_args": args, "iter_num": 5, "best_val_loss": 3.0}, path)
    return path, model


def test_nanogpt_padded_vocab_loads_to_reference_logits(padded_nanogpt):
    path, model = padded_nanogpt
    config, sd = load_checkpoint(path)
    assert config.vocab_size == 50257 and config.gelu == "exact"
    assert sd["wte.weight"].shape == (50257, 64) and "lm_head.weight" not in sd
    assert max_diff(from_flat(config, sd), model, ids_for(config)) <= 1e-5


@pytest.mark.parametrize("vocab", [50400, 60000])
def test_a_vocabulary_past_padding_is_another_tokenizer(tmp_path, caplog, vocab):
    """Padding for speed ends at 50257 rounded up to 1024 (51200): rows past 50304 may be tokens a
    fine-tune added (cropped, with a warning); 60000 is a model of another tokenizer, which the
    GPT-2 one would feed wrong ids (refused; it was cropped and served before)."""
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=vocab, block_size=8, gelu="exact")
    save_nanogpt_checkpoint(config, make_gpt(config).flat_state_dict(), tmp_path / "ckpt.pt")
    if vocab > 51200:
        with pytest.raises(CheckpointError, match=f"vocab_size {vocab} is neither the GPT-2 tokenizer's 50257 "
                                                  "nor it padded \\(up to 51200\\)"):
            load_checkpoint(tmp_path / "ckpt.pt")
        return
    with caplog.at_level("INFO", logger="nanoswarm.shards.loaders"):
        loaded, sd = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.vocab_size == 50257 and sd["wte.weight"].shape == (50257, 16)
    assert [r.levelname for r in caplog.records if "cropping the vocabulary 50400" in r.getMessage()] == ["WARNING"]


def test_an_untied_config_without_a_head_is_refused(tmp_path):
    """tie_word_embeddings false and no lm_head.weight: Hugging Face would make up a random head;
    serving wte as one would be as wrong, silently."""
    save_hf_checkpoint(SMALL, make_gpt(SMALL).flat_state_dict(), tmp_path)  # tied: no lm_head saved
    load_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings false, but the weights have no lm_head.weight"):
        load_checkpoint(tmp_path)


def test_gelu_form_matters(padded_nanogpt):
    path, model = padded_nanogpt
    config, sd = load_checkpoint(path, gelu="tanh")
    assert config.gelu == "tanh"
    assert max_diff(from_flat(config, sd), model, ids_for(config)) > 1e-4


def test_nanogpt_without_bias_round_trips(tmp_path):
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=32, bias=False,
                         gelu="tanh")
    model = make_gpt(config)
    save_nanogpt_checkpoint(config, model.flat_state_dict(), tmp_path / "out" / "ckpt.pt",
                            extra={"iter_num": 1})
    loaded, sd = load_checkpoint(tmp_path / "out")  # nanoGPT out_dir works as well as the file
    assert loaded == config  # the writer records the GELU form it was given
    assert not any(k.endswith("bias") for k in sd)
    assert max_diff(from_flat(loaded, sd), model, ids_for(config)) <= 1e-5


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path)
    sd = make_gpt(SMALL).flat_state_dict()
    del sd["h.2.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError, match=r"h\.2\.mlp\.c_fc\.weight"):
        save_hf_checkpoint(SMALL, sd, tmp_path / "hf")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")


# ---- model directory ----

def test_model_dir_round_trip(tmp_path):
    model = make_gpt(SMALL)
    manifest = cut.write_model_dir(SMALL, model.flat_state_dict(), tmp_path, layers_per_shard=3)
    names = sorted(f.name for f in manifest.files)
    assert names == ["blocks-0-3.safetensors", "blocks-3-4.safetensors", "embeddings.safetensors",
                     "head.safetensors"]
    assert mf.read_manifest(tmp_path) == manifest
    loaded = weights.load_model(tmp_path)
    assert loaded.head.lm_head.weight is loaded.embeddings.wte.weight  # still tied, one tensor
    assert max_diff(loaded, model, ids_for(SMALL)) <= 1e-5


def test_sharding_again_into_a_directory_removes_the_old_shards(tmp_path):
    model = make_gpt(SMALL)
    cut.write_model_dir(SMALL, model.flat_state_dict(), tmp_path, layers_per_shard=1, head_splits=[(0, 2), (2, 4)])
    (tmp_path / "notes.txt").write_text("mine")
    manifest = cut.write_model_dir(SMALL, model.flat_state_dict(), tmp_path, layers_per_shard=3)
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == sorted([f.name for f in manifest.files] + ["manifest.json", "notes.txt"])


def test_untied_head_round_trips(tmp_path):
    model = make_gpt(SMALL)
    sd = {**model.flat_state_dict(), "lm_head.weight": torch.randn(1000, 64)}
    save_hf_checkpoint(SMALL, sd, tmp_path / "hf")
    config, loaded_sd = load_checkpoint(tmp_path / "hf")
    assert torch.equal(loaded_sd["lm_head.weight"], sd["lm_head.weight"])
    cut.write_model_dir(config, loaded_sd, tmp_path / "dir", layers_per_shard=2)
    head = weights.load_head(tmp_path / "dir")
    assert torch.equal(head.lm_head.weight, sd["lm_head.weight"])
    gpt = weights.load_model(tmp_path / "dir")
    assert torch.equal(gpt.head.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(gpt.embeddings.wte.weight, sd["wte.weight"])


def test_load_blocks_across_file_boundary(tmp_path):
    model = make_gpt(SMALL)
    cut.write_model_dir(SMALL, model.flat_state_dict(), tmp_path, layers_per_shard=2)
    blocks = weights.load_blocks(tmp_path, 1, 3)
    assert not blocks.training and not any(p.requires_grad for p in blocks.parameters())
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        expected = model.blocks.h["2"](model.blocks.h["1"](x))
        assert (blocks(x) - expected).abs().max().item() <= 1e-5


def test_tampered_shard_is_refused(tmp_path):
    model = make_gpt(SMALL)
    cut.write_model_dir(SMALL, model.flat_state_dict(), tmp_path, layers_per_shard=2)
    path = tmp_path / "blocks-2-4.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(mf.ShardIntegrityError, match=r"blocks-2-4\.safetensors"):
        weights.load_blocks(tmp_path, 2, 4)
    with pytest.raises(mf.ShardIntegrityError, match=r"blocks-2-4\.safetensors"):
        weights.load_model(tmp_path)
    weights.load_blocks(tmp_path, 0, 2)  # only the files a load needs are checked
    weights.load_embeddings(tmp_path)
    weights.load_head(tmp_path)
    path.unlink()  # named once, with the reason (the OSError's words repeated the path)
    with pytest.raises(mf.ShardIntegrityError) as missing:
        weights.load_blocks(tmp_path, 2, 4)
    assert str(missing.value) == f"blocks-2-4.safetensors: cannot read it from {tmp_path}: No such file or directory"


def test_missing_layer_is_a_clear_error(tmp_path):
    manifest = cut.write_model_dir(SMALL, make_gpt(SMALL).flat_state_dict(), tmp_path, layers_per_shard=2)
    manifest.files = [f for f in manifest.files if f.name != "blocks-2-4.safetensors"]
    with pytest.raises(mf.ManifestError, match="layer 2"):
        weights.load_blocks(tmp_path, 1, 3, manifest=manifest)


@torch.no_grad()
def assert_slices_sum_to_blocks(model: GPT, slices: list, config: ModelConfig) -> None:
    x = torch.randn(2, 7, config.n_embd)
    for i in range(config.n_layer):
        parts = [s.h[str(i)] for s in slices]
        h = x + sum(p.attn_partial(x, None, 0) for p in parts)
        out = h + sum(p.mlp_partial(h) for p in parts)
        assert (out - model.blocks.h[str(i)](x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("config,splits", [(SMALL, [(0, 2), (2, 4)]),
                                           (TWELVE_HEADS, [(0, 5), (5, 9), (9, 12)])])
@pytest.mark.parametrize("from_files", [True, False])
def test_head_slices_sum_to_full_block(tmp_path, config, splits, from_files):
    model = make_gpt(config)
    manifest = cut.write_model_dir(config, model.flat_state_dict(), tmp_path, layers_per_shard=1,
                                  head_splits=splits if from_files else None)
    sliced = {f.name for f in manifest.files if f.heads}
    if from_files:
        assert f"blocks-0-1-heads-{splits[1][0]}-{splits[1][1]}.safetensors" in sliced
        assert len(sliced) == config.n_layer * len(splits)
        for f in manifest.files:  # prove the head-sliced files are the ones used
            if f.role == "blocks" and f.heads is None:
                (tmp_path / f.name).unlink()
    else:
        assert not sliced
    slices = [weights.load_blocks(tmp_path, 0, config.n_layer, heads=s) for s in splits]
    assert [s.h["0"].attn.c_proj.bias is not None for s in slices] == [True] + [False] * (len(splits) - 1)
    assert_slices_sum_to_blocks(model, slices, config)


def test_float16_storage_round_trip(tmp_path):
    model = make_gpt(SMALL)
    manifest = cut.write_model_dir(SMALL, model.flat_state_dict(), tmp_path, layers_per_shard=2,
                                  dtype=torch.float16)
    assert manifest.dtype == "float16"
    assert load_file(tmp_path / "blocks-0-2.safetensors")["h.0.ln_1.weight"].dtype == torch.float16
    rounded = from_flat(SMALL, {k: v.half().float() for k, v in model.flat_state_dict().items()})
    ids = ids_for(SMALL)
    assert max_diff(weights.load_model(tmp_path), rounded, ids) <= 1e-5
    assert max_diff(weights.load_model(tmp_path), model, ids) <= 5e-2
    assert weights.load_blocks(tmp_path, 0, 2, dtype=torch.float16).h["0"].ln_1.weight.dtype == torch.float16


def test_model_id_depends_on_weights_only(tmp_path):
    sd = make_gpt(SMALL).flat_state_dict()
    a = cut.write_model_dir(SMALL, sd, tmp_path / "a", layers_per_shard=2)
    b = cut.write_model_dir(SMALL, sd, tmp_path / "b", layers_per_shard=2, progress=False)
    other = make_gpt(SMALL, seed=9).flat_state_dict()
    c = cut.write_model_dir(SMALL, other, tmp_path / "c", layers_per_shard=2)
    assert a.model_id == b.model_id != c.model_id
    assert len(a.model_id) == 64
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["model_id"] == a.model_id
    assert mf.Manifest.from_json(a.to_json()).model_id == a.model_id


def test_manifest_validation(tmp_path):
    manifest = cut.write_model_dir(SMALL, make_gpt(SMALL).flat_state_dict(), tmp_path, layers_per_shard=2)
    good = json.loads(manifest.to_json())

    def broken(change) -> str:
        d = json.loads(json.dumps(good))
        change(d)
        return json.dumps(d)

    with pytest.raises(mf.ManifestError, match="model_id"):
        mf.Manifest.from_json(broken(lambda d: d["config"].update(gelu="exact")))
    with pytest.raises(mf.ManifestError, match="file name"):
        mf.Manifest.from_json(broken(lambda d: d["files"][0].update(name="../x")))
    with pytest.raises(mf.ManifestError, match="config fields"):
        mf.Manifest.from_json(broken(lambda d: d["config"].pop("gelu")))
    with pytest.raises(mf.ManifestError, match="layers"):
        mf.Manifest.from_json(broken(lambda d: d["files"][2].update(layers=[3, 9])))
    with pytest.raises(mf.ManifestError, match="JSON"):
        mf.Manifest.from_json("{")
    with pytest.raises(mf.ManifestError, match="manifest.json"):
        mf.read_manifest(tmp_path / "nowhere")


def test_parse_head_splits():
    assert mf.parse_head_splits("0:6,6:12", None, 12) == [(0, 6), (6, 12)]
    assert mf.parse_head_splits(None, 5, 12) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    assert mf.parse_head_splits(None, None, 12) is None
    for spec in ("0:6,7:12", "0:6", "a:b", "0:6:9", "6:6,0:6,6:12"):
        with pytest.raises(ValueError):
            mf.parse_head_splits(spec, None, 12)
    with pytest.raises(ValueError):
        mf.parse_head_splits("0:12", 2, 12)
    with pytest.raises(ValueError):
        mf.parse_head_splits(None, 13, 12)


def test_shard_checkpoint_from_nanogpt(tmp_path, padded_nanogpt):
    path, model = padded_nanogpt
    manifest = cut.shard_checkpoint(path, tmp_path, layers_per_shard=1, head_splits=[(0, 1), (1, 4)])
    assert manifest.config.vocab_size == 50257 and manifest.config.gelu == "exact"
    assert max_diff(weights.load_model(tmp_path), model, ids_for(manifest.config)) <= 1e-5


# ---- what a model directory may hold (hostile or broken input) ----

def rewrite_file(model_dir, name: str, data: bytes) -> None:
    """Replace one file and update its hash and size in the manifest, so that only the file's
    contents are wrong (as if whoever made the manifest got them wrong)."""
    import hashlib

    (model_dir / name).write_bytes(data)
    d = json.loads((model_dir / "manifest.json").read_text())
    entry = next(f for f in d["files"] if f["name"] == name)
    entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    d.pop("model_id")
    (model_dir / "manifest.json").write_text(json.dumps(d))


@pytest.mark.parametrize("name,change,message", [
    ("blocks-0-2.safetensors", lambda sd: sd.update({"h.0.attn.c_attn.weight": torch.zeros(10, 64)}),
     r"h\.0\.attn\.c_attn\.weight has shape \(10, 64\), the config needs \(192, 64\)"),
    ("blocks-0-2.safetensors", lambda sd: sd.pop("h.1.mlp.c_fc.bias"), r"missing h\.1\.mlp\.c_fc\.bias"),
    ("blocks-0-2.safetensors", lambda sd: sd.update({"h.0.attn.bogus": torch.zeros(3)}),
     r"unexpected h\.0\.attn\.bogus"),
    ("blocks-0-2.safetensors", lambda sd: sd.update({"h.0.ln_1.weight": torch.ones(64, dtype=torch.float16)}),
     r"h\.0\.ln_1\.weight is torch\.float16, the manifest says float32"),
    # a head-sliced file holding a full block's weights
    ("blocks-0-2-heads-2-4.safetensors", lambda sd: sd.update({"h.0.mlp.c_fc.weight": torch.zeros(256, 64)}),
     r"h\.0\.mlp\.c_fc\.weight has shape \(256, 64\), the config needs \(128, 64\)"),
])
def test_shard_files_with_wrong_tensors_are_named(small_dir, name, change, message):
    from safetensors.torch import load, save

    sd = load((small_dir / name).read_bytes())
    change(sd)
    rewrite_file(small_dir, name, save(sd))
    heads = (2, 4) if "heads" in name else None
    with pytest.raises(mf.ShardIntegrityError, match=rf"^{name}: tensors do not match the manifest: .*{message}"):
        weights.load_blocks(small_dir, 0, 2, heads=heads)
    weights.load_blocks(small_dir, 2, 4)  # the other files are fine


def test_shard_file_that_is_not_safetensors_is_named(small_dir):
    rewrite_file(small_dir, "embeddings.safetensors", b"not safetensors at all")
    with pytest.raises(mf.ShardIntegrityError, match=r"^embeddings\.safetensors: not a safetensors file"):
        weights.load_embeddings(small_dir)


def test_untied_head_and_bias_free_dirs_pass_the_tensor_checks(tmp_path):
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=32, bias=False)
    model = make_gpt(config)
    sd = {**model.flat_state_dict(), "lm_head.weight": torch.randn(300, 64)}
    cut.write_model_dir(config, sd, tmp_path, layers_per_shard=1, head_splits=[(0, 1), (1, 4)])
    assert torch.equal(weights.load_model(tmp_path).head.lm_head.weight, sd["lm_head.weight"])
    weights.load_blocks(tmp_path, 0, 2, heads=(1, 4))


# /dev/zero is tested in a subprocess with a memory limit (test_cli.py): a regression would
# read it until this process ran out of memory.
@pytest.mark.timeout(30)  # a regression would wait on the FIFO forever
@pytest.mark.parametrize("kind", ["fifo", "longer", "shorter"])
def test_shard_file_must_be_a_regular_file_of_the_manifest_size(small_dir, kind):
    import os

    path = small_dir / "blocks-2-4.safetensors"
    data = path.read_bytes()
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a plain open() would wait forever
    else:
        path.write_bytes(data + b"\0" if kind == "longer" else data[:-1])
    expected = "not a regular file" if kind == "fifo" else "bytes, the manifest says"
    with pytest.raises(mf.ShardIntegrityError, match=rf"^blocks-2-4\.safetensors: .*{expected}"):
        weights.load_blocks(small_dir, 2, 4)


def test_manifest_config_is_bounded_and_its_layers_covered(small_dir):
    good = json.loads((small_dir / "manifest.json").read_text())
    good.pop("model_id")

    def refused(change) -> str:
        d = json.loads(json.dumps(good))
        change(d)
        (small_dir / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(mf.ManifestError) as info:
            weights.load_model(small_dir)  # used to build every Block before looking at the files
        return str(info.value)

    assert "n_layer 1000000 is above the limit" in refused(lambda d: d["config"].update(n_layer=10**6))
    assert "n_embd" in refused(lambda d: d["config"].update(n_embd=1 << 20, n_head=4))
    assert "vocab_size 50304 is above the gpt2 tokenizer's 50257" in refused(
        lambda d: d["config"].update(vocab_size=50304))
    assert "layers 4:6 are in no full-head blocks file" in refused(lambda d: d["config"].update(n_layer=6))
    # head-sliced files alone do not cover a layer
    assert "layers 0:2 are in no full-head blocks file" in refused(
        lambda d: d.update(files=[f for f in d["files"] if f["name"] != "blocks-0-2.safetensors"]))
    # ...but a file that names all heads explicitly is a full-head file
    explicit = json.loads(json.dumps(good))
    for f in explicit["files"]:
        if f["name"] == "blocks-0-2.safetensors":
            f["heads"] = [0, explicit["config"]["n_head"]]
    (small_dir / "manifest.json").write_text(json.dumps(explicit))
    assert mf.read_manifest(small_dir).config.n_layer == good["config"]["n_layer"]
    with pytest.raises(ValueError, match="vocab_size 50304"):
        cut.write_model_dir(ModelConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=50304, block_size=8),
                           GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=50304,
                                           block_size=8)).flat_state_dict(), small_dir / "x", 1)


def test_head_groups_zero_is_refused():
    with pytest.raises(ValueError, match="head groups must be 1 or more, got 0"):
        mf.parse_head_splits(None, 0, 12)
    with pytest.raises(ValueError, match="head groups must be from 1 to 12, got 13"):
        mf.parse_head_splits(None, 13, 12)
    with pytest.raises(ValueError, match="not both"):
        mf.parse_head_splits("0:12", 0, 12)


def test_shard_refuses_a_vocabulary_the_tokenizer_does_not_fit(tmp_path):
    """A character-level nanoGPT (vocab 65) was trained on other ids than GPT-2's tokenizer gives."""
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=65, block_size=16, gelu="exact")
    save_nanogpt_checkpoint(config, make_gpt(config).flat_state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="vocab_size 65 is smaller than the GPT-2 tokenizer's 50257"):
        cut.shard_checkpoint(tmp_path / "ckpt.pt", tmp_path / "m", 1, progress=False)
    assert not (tmp_path / "m").exists()


def test_a_pickle_that_needs_code_is_refused_in_one_line(tmp_path):
    import fractions

    torch.save({"model": fractions.Fraction(1, 3)}, tmp_path / "code.pt")
    (tmp_path / "frame.pt").write_bytes(pickle.dumps({"model": 1}, protocol=4))  # a pickle torch cannot read
    (tmp_path / "text.pt").write_text("{}")
    for name, found in (("code.pt", "not a checkpoint of plain tensors and settings (Unsupported global: GLOBAL "
                                    "fractions.Fraction"),
                        ("frame.pt", "not a checkpoint of plain tensors and settings (Unsupported operand 149)"),
                        ("text.pt", "text.pt: not a torch checkpoint (torch.save writes a zip archive)")):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert found in message and "\n" not in message, message
        assert "weights_only=False" not in message and "add_safe_globals" not in message


@pytest.mark.parametrize("shape", [(1, 1, 96), (5, 1, 96), (1, 37, 96), (2, 0, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_linear_matches_f_linear(shape, bias):
    """Blocks and head run their linear layers through oneDNN in inference (shards/model.py
    `linear`): the same numbers as F.linear up to float32 rounding, and training keeps F.linear
    (the oneDNN op has no backward)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w, b = torch.randn(80, 96, generator=g), (torch.randn(80, generator=g) if bias else None)
    with torch.inference_mode():
        y = model.linear(x, w, b)
    assert y.shape == (*shape[:-1], 80)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_()
    model.linear(x, wg, b).sum().backward()  # grad enabled: F.linear, which has a backward
    torch.testing.assert_close(wg.grad, x.reshape(-1, 96).sum(0).expand(80, 96).contiguous())


def test_head_keeps_no_transposed_copy_when_onednn_runs_it():
    head = model.Head(ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=300, block_size=16))
    x = torch.randn(1, 3, 32)
    with torch.inference_mode():
        before = head(x)
        head.freeze_for_inference()
        torch.testing.assert_close(head(x), before, rtol=1e-5, atol=1e-5)
    assert (head._weight_t is None) == (model.onednn_linear() is not None)


def test_onednn_can_be_turned_off():
    code = "from nanoswarm.shards.model import onednn_linear; print(onednn_linear() is None)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NANOSWARM_ONEDNN": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_inference_linear_takes_a_strided_bias_exactly():
    # oneDNN's op reads a bias as if contiguous: a strided one must go the F.linear way.
    g = torch.Generator().manual_seed(1)
    x, w, wide = torch.randn(1, 4, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(160, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(model.linear(x, w, wide[::2]), torch.nn.functional.linear(x, w, wide[::2]))


def test_onednn_kernel_caches_stay_bounded_over_many_prompt_lengths():
    """oneDNN keeps kernels per input shape; nanoswarm caps its caches on import
    (nanoswarm.onednn_defaults). Uncapped, this grew by ~270 MB here."""
    code = """
import nanoswarm, torch
from nanoswarm.shards.model import linear
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
w, b = torch.randn(3072, 768), torch.randn(3072)
with torch.inference_mode():
    linear(torch.randn(1, 1, 768), w, b)
    before = rss()
    for t in range(1, 401):
        linear(torch.randn(1, t, 768), w, b)
print(rss() - before)
"""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("reads RSS from /proc (Linux)")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 100 * 2**20


# ---- files a stranger hands us (found in review, thirteenth session) ----

def _nanogpt_file(path, model_sd: dict, **args) -> None:
    """A nanoGPT ckpt.pt written directly, so its parts can disagree with each other."""
    model_args = {"n_layer": SMALL.n_layer, "n_head": SMALL.n_head, "n_embd": SMALL.n_embd,
                  "block_size": SMALL.block_size, "vocab_size": SMALL.vocab_size, **args}
    torch.save({"model": model_sd, "model_args": model_args}, path)


def test_a_checkpoint_claiming_a_huge_model_is_refused_before_building_its_weight_names(tmp_path):
    """A 1e9-layer config over a small state dict made `shard` build 12e9 expected names (a 3 MB
    file took the process past 3.4 GB)."""
    _nanogpt_file(tmp_path / "ckpt.pt", make_gpt(SMALL).flat_state_dict(), n_layer=10**9)
    with pytest.raises(CheckpointError, match="n_layer 1000000000 is above the limit 1024"):
        load_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("change,message", [
    (lambda t: t.to(torch.int64), "holds int64, not floating-point weights"),
    (lambda t: t.to(torch.complex64), "holds complex64, not floating-point weights"),
    (lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), "holds NaN or Inf"),
])
def test_checkpoint_weights_that_are_not_finite_floats_are_refused(tmp_path, change, message):
    sd = make_gpt(SMALL).flat_state_dict()
    sd["h.1.mlp.c_fc.weight"] = change(sd["h.1.mlp.c_fc.weight"])
    _nanogpt_file(tmp_path / "ckpt.pt", sd)
    with pytest.raises(CheckpointError, match=rf"h\.1\.mlp\.c_fc\.weight {message}"):
        load_checkpoint(tmp_path / "ckpt.pt")


def test_a_weight_float16_cannot_hold_is_refused_not_stored_as_inf(tmp_path):
    sd = make_gpt(SMALL).flat_state_dict()
    good = cut.write_model_dir(SMALL, sd, tmp_path / "half", layers_per_shard=2, dtype=torch.float16)
    sd["h.3.mlp.c_fc.weight"][0, 0] = 1e5
    with pytest.raises(ValueError, match=r"h\.3\.mlp\.c_fc\.weight holds 100000, which float16 cannot hold: "
                                         "shard it as float32 or bfloat16"):
        cut.write_model_dir(SMALL, sd, tmp_path / "half", layers_per_shard=2, dtype=torch.float16)
    weights.load_model(tmp_path / "half")  # refused before any file was written: still whole
    assert mf.read_manifest(tmp_path / "half").model_id == good.model_id
    cut.write_model_dir(SMALL, sd, tmp_path / "bf16", layers_per_shard=2, dtype=torch.bfloat16)
    sd["h.0.ln_1.weight"][0] = float("nan")
    with pytest.raises(ValueError, match=r"h\.0\.ln_1\.weight holds NaN or Inf"):
        cut.write_model_dir(SMALL, sd, tmp_path / "f32", layers_per_shard=2)


def test_pickled_checkpoints_need_a_torch_whose_weights_only_load_is_safe(tmp_path, monkeypatch):
    from nanoswarm.shards import loaders

    _nanogpt_file(tmp_path / "ckpt.pt", make_gpt(SMALL).flat_state_dict())
    monkeypatch.setattr(loaders, "SAFE_TORCH_LOAD", (99, 0))
    with pytest.raises(CheckpointError, match=r"cannot read pickled checkpoints safely; upgrade to torch>=99\.0"):
        load_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.timeout(30)  # a regression would wait on the FIFO forever
def test_a_manifest_that_is_a_fifo_is_refused_naming_it(small_dir):
    path = small_dir / "manifest.json"
    path.unlink()
    os.mkfifo(path)  # no writer: a plain open() would wait forever
    with pytest.raises(mf.ManifestError, match=r"manifest\.json: not a regular file"):
        mf.read_manifest(small_dir)


def test_a_manifest_that_is_not_utf8_json_or_names_bad_files_is_refused_naming_it(small_dir):
    path = small_dir / "manifest.json"
    good = path.read_text()
    path.write_bytes(b"\xff" + good.encode())
    with pytest.raises(mf.ManifestError, match=r"manifest\.json: 'utf-8' codec"):
        mf.read_manifest(small_dir)
    path.write_text("[" * 100_000)
    with pytest.raises(mf.ManifestError, match=r"manifest\.json: manifest is not valid JSON: RecursionError"):
        mf.read_manifest(small_dir)
    for name in ("", "a\x00b", "x\\y"):
        d = json.loads(good)
        d.pop("model_id")
        d["files"][0]["name"] = name
        path.write_text(json.dumps(d))
        with pytest.raises(mf.ManifestError, match="bad file name"):
            mf.read_manifest(small_dir)


def test_malformed_checkpoint_parts_are_named_in_one_line(tmp_path):
    torch.save({"model": [1], "model_args": {}}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: 'model' and 'model_args' must be dictionaries"):
        load_checkpoint(tmp_path / "list.pt")
    hf = tmp_path / "hf"
    save_hf_checkpoint(SMALL, make_gpt(SMALL).flat_state_dict(), hf)
    (hf / "model.safetensors").write_bytes(b"garbage!garbage!")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(hf)
    config = json.loads((hf / "config.json").read_text())
    for change, message in (({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be 1e-5"),
                            # Each of these failed in Python's words without the file's name, or
                            # (NaN) passed the check (review77).
                            ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon must be 1e-5"),
                            ({"layer_norm_epsilon": 10**400}, "layer_norm_epsilon must be 1e-5"),
                            ({"activation_function": []}, "unsupported activation_function"),
                            ({"n_embd": None, "n_inner": None}, "bad model config"),
                            ({"n_embd": {}}, "bad model config"),
                            ({"n_positions": None, "n_ctx": None}, "lacks n_positions"),
                            # The string "false" counted as tied: wte would have served as the head.
                            ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false")):
        (hf / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=r"config\.json: " + re.escape(message)):
            load_checkpoint(hf)
    # nanoGPT's model_args: bool("no") was True.
    ckpt = tmp_path / "bias.pt"
    save_nanogpt_checkpoint(SMALL, make_gpt(SMALL).flat_state_dict(), ckpt)
    saved = torch.load(ckpt, weights_only=True)
    torch.save({**saved, "model_args": {**saved["model_args"], "bias": "no"}}, ckpt)
    with pytest.raises(CheckpointError, match=r"bias\.pt: model_args bias must be True or False"):
        load_checkpoint(ckpt)


def test_exact_float32_leaves_cudnns_flags_usable():
    """Review78: setting cuDNN's float32 precision too (resolve_device does this for every GPU)
    made torch refuse `cudnn.allow_tf32` and `cudnn.flags()` for the rest of the process."""
    from nanoswarm.shards.device import exact_float32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        exact_float32()
        assert matmul.fp32_precision == "ieee" and matmul.allow_tf32 is False
        assert isinstance(torch.backends.cudnn.allow_tf32, bool)
        with torch.backends.cudnn.flags(enabled=True):
            pass
    finally:
        matmul.fp32_precision = before


def test_gpu_settings_checked_without_a_gpu(tiny_model_dir, monkeypatch):
    """What only a GPU would show, with torch.cuda's answers given by hand: bfloat16 on a GPU
    without it is refused in one line; an idle GPU node gives the cache memory of closed sessions
    back; an API client with a GPU that is not there gets the CLI's error, not a traceback."""
    from nanoswarm.client.api import SwarmModel
    from nanoswarm.node.handler import RequestHandler
    from nanoswarm.node.sessions import NodeLimits
    from nanoswarm.shards.device import check_dtype

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(ValueError, match=r"--dtype bfloat16: cuda:0 \(Tesla T4\) has no native bfloat16"):
        check_dtype(gpu, torch.bfloat16)
    check_dtype(gpu, torch.float16)
    check_dtype(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    check_dtype(gpu, torch.bfloat16)

    handler = RequestHandler(weights.load_blocks(tiny_model_dir, 0, 4), "m", "a", NodeLimits())
    handler.device = gpu
    emptied, held = [], {"reserved": 8 << 20, "allocated": 2 << 20}
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: held["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: held["allocated"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    session = handler.sessions.open(handler.blocks, 0, 4, 8, b"peer")
    handler.expire_idle()
    assert emptied == []  # a session is open: its next step may need the memory
    handler.sessions.close(session.id)
    handler.expire_idle()
    assert emptied == [1]
    handler.expire_idle()
    assert emptied == [1]  # what it could not give back (inside the weights' segments) is not asked again
    held["reserved"] = 6 << 20
    handler.expire_idle()
    assert emptied == [1, 1]  # more was held meanwhile
    held["reserved"] = held["allocated"]
    handler.expire_idle()
    assert emptied == [1, 1]  # nothing cached to give back

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            SwarmModel.local(tiny_model_dir, device="cuda")  # (connect's head is made the same way)


def _fail_writing(monkeypatch, name: str, error: BaseException, nth: int = 1) -> None:
    """Path.write_bytes raises `error` on its `nth` write of a file called `name` (a full disk,
    or Ctrl-C, as the write goes on)."""
    from pathlib import Path

    real, seen = Path.write_bytes, []

    def write_bytes(self, data):
        if self.name == name:
            seen.append(self)
            if len(seen) == nth:
                raise error
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "ctrl_c"])
def test_a_model_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, error):
    """A full disk midway through `shard --overwrite` left the directory's earlier model with some
    files replaced (its manifest then refused them), a hidden partial file filling the disk, and
    an error that named no file (a review). Every file is now written under a temporary name and
    moved into place once all are."""
    from conftest import TINY, invoke_cli

    out = tmp_path / "m"
    cut.write_model_dir(TINY, GPT(TINY).flat_state_dict(), out, 1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.manual_seed(1)
    save_nanogpt_checkpoint(TINY, GPT(TINY).flat_state_dict(), tmp_path / "other.pt")
    _fail_writing(monkeypatch, ".blocks-2-3.safetensors.tmp", error)
    done = invoke_cli("shard", str(tmp_path / "other.pt"), str(out), "--layers-per-shard", "1", "--overwrite")
    assert done.returncode != 0
    if isinstance(error, OSError):
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
            f"error: cannot write {out / 'blocks-2-3.safetensors'}: No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier model, whole
    weights.load_blocks(out, 0, 4)  # (every file checked against its manifest)


def test_what_a_killed_shard_run_left_is_no_model(tmp_path):
    """A shard run killed midway (SIGKILL: no cleanup runs) leaves its temporary files: the next
    run into the directory takes it as empty and removes them, and keeps anything else."""
    from conftest import TINY, invoke_cli

    out = tmp_path / "m"
    out.mkdir()
    for name in (".blocks-0-1.safetensors.tmp", ".manifest.json.tmp", ".embeddings.safetensors.tmp"):
        (out / name).write_bytes(b"partial")
    save_nanogpt_checkpoint(TINY, GPT(TINY).flat_state_dict(), tmp_path / "ckpt.pt")
    done = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(out), "--layers-per-shard", "2")
    assert done.returncode == 0, done.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    (out / ".notes.tmp").write_text("mine")  # not a name of ours: kept, and the directory is not empty
    done = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(out), "--layers-per-shard", "2")
    assert done.returncode == 1 and "is not empty" in done.stderr
    done = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(out), "--layers-per-shard", "2", "--overwrite")
    assert done.returncode == 0 and (out / ".notes.tmp").read_text() == "mine"


def test_a_bpe_file_with_a_bad_token_or_none_at_all_is_refused_and_ids_cut_mid_character_decode(tmp_path):
    """Checked for the file read, not only its hash (review220: base64 read leniently took
    `@@@@` as an empty token); a token cut mid-character decodes to U+FFFD, not an error."""
    import hashlib

    from nanoswarm.shards.tokenizer import _parse_bpe_ranks

    assert _parse_bpe_ranks(b"IQ== 0\n\nIg== 1\n") == {b"!": 0, b'"': 1}  # a blank line is skipped
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\n@@@@ 1\n")
    with pytest.raises(TokenizerFileError, match="bad line 2: b'@@@@ 1'"):
        load_bpe_ranks(bad, hashlib.sha256(bad.read_bytes()).hexdigest())
    with pytest.raises(TokenizerFileError, match="cannot read the GPT-2 BPE file"):
        load_bpe_ranks(tmp_path / "missing.tiktoken")
    assert decode([158]) == "\ufffd" and decode([447, 247]) == "\u2019"  # b"\xe2" alone; b"\xe2\x80" + b"\x99"


def test_resolve_device_checks_the_gpus_torch_sees_and_bfloat16_on_an_older_torch(monkeypatch):
    """With torch.cuda's answers given by hand: an index past the GPUs torch sees is refused in
    one line naming them (review220: `>` for `>=` let cuda:N with N GPUs through to torch);
    cpu:0 is the CPU. An older torch without `including_emulation` reads the compute capability:
    8.0 (Ampere) has bfloat16."""
    from nanoswarm.shards.device import check_dtype, resolve_device

    assert resolve_device("cpu") == resolve_device("cpu:0") == torch.device("cpu")
    for bad in ("cpu:1", "meta", "tpu"):
        with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^--device cuda:2: torch sees 2 CUDA devices \(cuda:0..cuda:1\)$"):
        resolve_device("cuda:2")
    chosen, matmul = [], torch.backends.cuda.matmul
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    before, matmul.fp32_precision = matmul.fp32_precision, "tf32"
    try:
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
        assert resolve_device("cuda") == torch.device("cuda", 1)
        assert chosen == [torch.device("cuda", 0), torch.device("cuda", 1)]  # the GPU's contexts and allocations
        assert matmul.fp32_precision == "ieee"  # float32 exact on a GPU, not TF32
    finally:
        matmul.fp32_precision = before
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^--device cuda:1: torch sees 1 CUDA device \(cuda:0..cuda:0\)$"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        resolve_device("cuda")

    gpu, capability = torch.device("cuda", 0), {"now": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # no including_emulation: TypeError
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability["now"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    check_dtype(gpu, torch.bfloat16)
    capability["now"] = (7, 5)
    with pytest.raises(ValueError, match=r"cuda:0 \(Tesla T4\) has no native bfloat16"):
        check_dtype(gpu, torch.bfloat16)


def test_exact_float32_warns_of_a_driver_override_only_when_it_is_on(monkeypatch, caplog):
    from nanoswarm.shards.device import exact_float32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        for value, warned in (("0", False), ("", False), ("1", True)):
            caplog.clear()
            monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", value)
            with caplog.at_level("WARNING", logger="nanoswarm.shards.device"):
                exact_float32()
            assert ("NVIDIA_TF32_OVERRIDE is set" in caplog.text) is warned, value
    finally:
        matmul.fp32_precision = before


def test_an_untied_head_round_trips_through_nanogpts_layout(tmp_path):
    """nanoGPT's ckpt.pt keeps an untied lm_head of its own, not wte (review220: writing wte in
    its place passed every test)."""
    model = make_gpt(SMALL)
    sd = {**model.flat_state_dict(), "lm_head.weight": torch.randn(1000, 64)}
    save_nanogpt_checkpoint(SMALL, sd, tmp_path / "ckpt.pt")
    _, loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert torch.equal(loaded["lm_head.weight"], sd["lm_head.weight"])
    assert torch.equal(loaded["wte.weight"], sd["wte.weight"])


def test_a_hugging_face_directory_says_its_gelu_and_tying_as_transformers_reads_them(tmp_path):
    """config.json as Hugging Face's own GPT-2 reads it, not only as our loader does: which GELU
    (gelu is the exact form, gelu_new tanh's), and tie_word_embeddings false for a head of its own
    (transformers would tie it to wte, dropping the saved head); no bias-free variant is written
    (review220: each of these mutated passed every test)."""
    exact = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, block_size=32, gelu="exact")
    flat = make_gpt(exact).flat_state_dict()
    save_hf_checkpoint(exact, flat, tmp_path / "tied")
    cfg = json.loads((tmp_path / "tied" / "config.json").read_text())
    assert cfg["activation_function"] == "gelu" and cfg["tie_word_embeddings"] is True
    assert load_checkpoint(tmp_path / "tied")[0].gelu == "exact"
    save_hf_checkpoint(exact, {**flat, "lm_head.weight": torch.randn(1000, 64)}, tmp_path / "untied")
    cfg = json.loads((tmp_path / "untied" / "config.json").read_text())
    assert cfg["activation_function"] == "gelu" and cfg["tie_word_embeddings"] is False
    tanh = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, block_size=32, gelu="tanh")
    save_hf_checkpoint(tanh, make_gpt(tanh).flat_state_dict(), tmp_path / "tanh")
    assert json.loads((tmp_path / "tanh" / "config.json").read_text())["activation_function"] == "gelu_new"
    bare = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, block_size=32, bias=False)
    with pytest.raises(CheckpointError, match="Hugging Face GPT-2 has no bias-free variant"):
        save_hf_checkpoint(bare, make_gpt(bare).flat_state_dict(), tmp_path / "bare")
    assert not (tmp_path / "bare").exists()
