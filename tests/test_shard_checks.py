"""What the shard code refuses, each check on its own (review211, a mutation review of
shards/manifest.py, cut.py, weights.py and loaders.py: each test fails under a mutation that the
rest of the suite let through): every field of a manifest from elsewhere, the file names a
re-shard may remove, an lm_head and transposed weights named rather than loaded, a blocks file
that names all heads, a block file longer than its manifest says, and checkpoint configs that
would change the logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL

from nanoswarm.shards import cut, weights
from nanoswarm.shards import manifest as mf
from nanoswarm.shards.model import GPT, ModelConfig


def _file(d: dict, name: str) -> dict:
    return next(f for f in d["files"] if f["name"] == name)


# (Files of small_dir: embeddings, head, blocks-0-2, blocks-0-2-heads-0-2, blocks-0-2-heads-2-4, blocks-2-4, ...)
@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format="nanoswarm-model/2"), "unsupported manifest format 'nanoswarm-model/2'"),
    (lambda d: d.update(comment="hi"), "unknown manifest fields: ['comment']"),
    (lambda d: d.update(tokenizer="llama"), "unsupported tokenizer 'llama'"),
    (lambda d: d.update(dtype="int8"), "dtype must be one of"),
    (lambda d: d["config"].update(bias=1), "config.bias must be true or false"),
    # the tokenizer's last id is 50256: one row more is an id it cannot decode
    (lambda d: d["config"].update(vocab_size=50258), "vocab_size 50258 is above the gpt2 tokenizer's 50257"),
    (lambda d: _file(d, "embeddings.safetensors").update(name=".embeddings.safetensors.tmp"), "bad file name"),
    (lambda d: _file(d, "embeddings.safetensors").update(name=".."), "bad file name"),
    (lambda d: _file(d, "head.safetensors").update(role="tail"), "role must be one of"),
    (lambda d: _file(d, "head.safetensors").update(sha256="ab" * 31), "sha256 must be 64 lowercase hex digits"),
    (lambda d: _file(d, "head.safetensors").update(sha256="AB" * 32), "sha256 must be 64 lowercase hex digits"),
    (lambda d: _file(d, "head.safetensors").update(size=-1), "bad size"),
    (lambda d: _file(d, "head.safetensors").update(size=100.0), "bad size"),
    (lambda d: _file(d, "head.safetensors").update(size="100"), "bad size"),
    (lambda d: _file(d, "blocks-2-4.safetensors").update(layers=[2.0, 4]), "layers must be [start, stop] integers"),
    (lambda d: _file(d, "blocks-2-4.safetensors").update(layers=[2, 5]), "layers [2, 5] is outside 0:4"),
    (lambda d: _file(d, "blocks-0-2-heads-2-4.safetensors").update(layers=[-1, 2]), "layers [-1, 2] is outside 0:4"),
    (lambda d: _file(d, "blocks-0-2-heads-2-4.safetensors").update(layers=[2, 2]), "layers [2, 2] is outside 0:4"),
    (lambda d: _file(d, "blocks-0-2-heads-2-4.safetensors").update(heads=[2, 5]), "heads [2, 5] is outside 0:4"),
    (lambda d: _file(d, "blocks-0-2-heads-2-4.safetensors").update(heads=[2, 2]), "heads [2, 2] is outside 0:4"),
    (lambda d: _file(d, "blocks-0-2-heads-2-4.safetensors").update(heads=[-2, 2]), "heads [-2, 2] is outside 0:4"),
    (lambda d: _file(d, "embeddings.safetensors").update(layers=[0, 1]), "only blocks files have layers"),
    (lambda d: _file(d, "blocks-2-4.safetensors").update(layers=None), "only blocks files have layers"),
    (lambda d: _file(d, "head.safetensors").update(heads=[0, 2]), "only blocks files have heads"),
    (lambda d: d["files"].append(dict(_file(d, "head.safetensors"))), "file names repeat"),
    (lambda d: d["files"].append({**_file(d, "head.safetensors"), "name": "head2.safetensors"}),
     "need exactly one head file"),
    # a one-layer gap between full-head files
    (lambda d: _file(d, "blocks-0-2.safetensors").update(layers=[0, 1]), "layers 1:2 are in no full-head blocks file"),
])
def test_each_manifest_field_is_checked(small_dir, change, message):
    """Every check of a manifest from elsewhere refuses what it is there for, with its own words
    (a manifest that passed would fail later on some peer, or load the wrong file)."""
    good = json.loads((small_dir / "manifest.json").read_text())
    good.pop("model_id")
    mf.Manifest.from_dict(json.loads(json.dumps(good)))  # (the unchanged manifest passes)
    d = json.loads(json.dumps(good))
    change(d)
    with pytest.raises(mf.ManifestError) as info:
        mf.Manifest.from_dict(d)
    assert message in str(info.value)


def test_full_head_files_may_overlap(small_dir):
    """Coverage is the union of the full-head files' ranges, in whatever order they overlap."""
    d = json.loads((small_dir / "manifest.json").read_text())
    d.pop("model_id")
    _file(d, "blocks-0-2.safetensors")["layers"] = [0, 4]
    _file(d, "blocks-2-4.safetensors")["layers"] = [2, 3]
    assert mf.Manifest.from_dict(d).config.n_layer == 4


def test_head_splits_must_not_overlap_and_each_needs_two_ends():
    for spec in ("0:6,3:12", "0:6,6:9,6:12"):
        with pytest.raises(ValueError, match="must partition"):
            mf.parse_head_splits(spec, None, 12)
    with pytest.raises(ValueError, match="must look like 0:6,6:12"):
        mf.parse_head_splits("0:6,12", None, 12)


def test_slicing_refuses_an_empty_head_range_and_names_other_weights():
    with pytest.raises(ValueError, match="head range 2:2 is outside 0:4"):
        mf.slice_block_weights({"h.0.ln_1.weight": torch.zeros(64)}, SMALL, (2, 2))
    with pytest.raises(ValueError, match="wte.weight is not a block weight"):
        mf.slice_block_weights({"wte.weight": torch.zeros(1000, 64)}, SMALL, (0, 2))
    with pytest.raises(ValueError, match="unknown block weight h.0.attn.bogus"):
        mf.slice_block_weights({"h.0.attn.bogus": torch.zeros(3)}, SMALL, (0, 2))


def test_a_model_dir_that_is_a_file_says_what_a_model_directory_is(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(mf.ManifestError, match="is not a model directory .*nanoswarm shard"):
        mf.read_manifest(path)


def test_weights_to_shard_are_checked_before_anything_is_written(tmp_path):
    from nanoswarm.shards.loaders import CheckpointError

    sd = GPT(SMALL).flat_state_dict()
    bad = {**sd, "h.1.mlp.c_fc.weight": torch.zeros(10, 64)}
    with pytest.raises(CheckpointError, match=r"weights to shard: wrong shapes: h\.1\.mlp\.c_fc\.weight \(10, 64\)"):
        cut.write_model_dir(SMALL, bad, tmp_path / "m", layers_per_shard=2)
    assert not (tmp_path / "m").exists()
    # the right number of values in the wrong layout (Conv1D's [in, out]) is no better
    bad = {**sd, "h.1.mlp.c_fc.weight": sd["h.1.mlp.c_fc.weight"].t()}
    with pytest.raises(CheckpointError, match=r"wrong shapes: h\.1\.mlp\.c_fc\.weight \(64, 256\) "
                                                r"\(expected \(256, 64\)\)"):
        cut.write_model_dir(SMALL, bad, tmp_path / "m", layers_per_shard=2)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="layers_per_shard must be at least 1, got 0"):
        cut.write_model_dir(SMALL, sd, tmp_path / "m", layers_per_shard=0)


def test_sharding_again_removes_only_our_own_file_names(tmp_path):
    """The stale-shard sweep removes shard files of an earlier model and our temporary files,
    and nothing that only looks like one: a user's backup, notes, or a directory."""
    sd = GPT(SMALL).flat_state_dict()
    cut.write_model_dir(SMALL, sd, tmp_path, layers_per_shard=1, progress=False)
    mine = ["head.safetensors.bak", "embeddings.safetensors.tmp", ".manifest.json.tmp.keep",
            "blocks-9-10.safetensors/"]  # (a directory)
    for name in mine:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("mine")
    (tmp_path / ".blocks-0-1.safetensors.tmp").write_bytes(b"partial")  # ours: removed
    cut.write_model_dir(SMALL, sd, tmp_path, layers_per_shard=2, progress=False)
    assert not (tmp_path / ".blocks-0-1.safetensors.tmp").exists()
    assert not (tmp_path / "blocks-0-1.safetensors").exists()  # the earlier model's: removed
    assert (tmp_path / "blocks-9-10.safetensors").is_dir()
    for name in mine[:-1]:
        assert (tmp_path / name).read_text() == "mine"


def _rewrite(model_dir, name: str, change) -> None:
    """Change one file's tensors and update its hash and size in the manifest."""
    import hashlib

    from safetensors.torch import load, save

    sd = load((model_dir / name).read_bytes())
    change(sd)
    data = save(sd)
    (model_dir / name).write_bytes(data)
    d = json.loads((model_dir / "manifest.json").read_text())
    entry = _file(d, name)
    entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    d.pop("model_id", None)
    (model_dir / "manifest.json").write_text(json.dumps(d))


def test_an_lm_head_is_checked_in_the_head_file_and_refused_elsewhere(small_dir):
    _rewrite(small_dir, "embeddings.safetensors", lambda sd: sd.update({"lm_head.weight": torch.zeros(1000, 64)}))
    with pytest.raises(mf.ShardIntegrityError, match=r"^embeddings\.safetensors: .*unexpected lm_head\.weight"):
        weights.load_embeddings(small_dir)
    _rewrite(small_dir, "head.safetensors", lambda sd: sd.update({"lm_head.weight": torch.zeros(999, 64)}))
    with pytest.raises(mf.ShardIntegrityError,
                       match=r"^head\.safetensors: .*lm_head\.weight has shape \(999, 64\), "
                             r"the config needs \(1000, 64\)"):
        weights.load_head(small_dir)


def test_a_blocks_file_that_names_all_heads_serves_full_blocks_and_head_slices(small_dir):
    """manifest.py takes heads [0, n_head] as a full-head file; the loader must too."""
    reference = weights.load_blocks(small_dir, 0, 2)
    d = json.loads((small_dir / "manifest.json").read_text())
    d.pop("model_id")
    _file(d, "blocks-0-2.safetensors")["heads"] = [0, 4]
    d["files"] = [f for f in d["files"] if "heads" not in f["name"]]  # no head-sliced files: slice in memory
    (small_dir / "manifest.json").write_text(json.dumps(d))
    manifest = mf.read_manifest(small_dir)
    weights.check_block_files(small_dir, manifest)
    blocks = weights.load_blocks(small_dir, 0, 2)
    for k, v in reference.state_dict().items():
        assert torch.equal(blocks.state_dict()[k], v)
    weights.load_blocks(small_dir, 0, 2, heads=(2, 4))
    weights.load_model(small_dir)


def test_check_block_files_refuses_a_block_file_longer_than_the_manifest_says(small_dir):
    manifest = mf.read_manifest(small_dir)
    weights.check_block_files(small_dir, manifest)
    with open(small_dir / "blocks-2-4.safetensors", "ab") as f:
        f.write(b"\0")
    size = (small_dir / "blocks-2-4.safetensors").stat().st_size
    with pytest.raises(mf.ShardIntegrityError, match=rf"^blocks-2-4\.safetensors: it is {size} bytes, "
                                                              "the manifest says"):
        weights.check_block_files(small_dir, manifest)


def test_a_transposed_weight_is_named_not_loaded(small_dir):
    """A weight of the right size but the wrong shape (a Conv1D [in, out] layout) is the file's
    fault, said as such, not a size-mismatch traceback from load_state_dict."""
    _rewrite(small_dir, "blocks-2-4.safetensors",
             lambda sd: sd.update({"h.3.mlp.c_fc.weight": sd["h.3.mlp.c_fc.weight"].t().contiguous()}))
    with pytest.raises(mf.ShardIntegrityError,
                       match=r"^blocks-2-4\.safetensors: .*h\.3\.mlp\.c_fc\.weight has shape \(64, 256\), "
                             r"the config needs \(256, 64\)"):
        weights.load_blocks(small_dir, 2, 4)


def test_checkpoints_at_the_limits(tmp_path):
    from nanoswarm.shards.loaders import CheckpointError, check_size_limits, load_checkpoint
    from nanoswarm.shards.writers import save_nanogpt_checkpoint

    check_size_limits(ModelConfig(n_layer=1024, n_head=1, n_embd=1, vocab_size=1, block_size=1))
    with pytest.raises(ValueError, match="n_layer 1025 is above the limit 1024"):
        check_size_limits(ModelConfig(n_layer=1025, n_head=1, n_embd=1, vocab_size=1, block_size=1))
    # the most rows a padded GPT-2 vocabulary may have: cropped, not refused
    config = ModelConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=51200, block_size=8)
    save_nanogpt_checkpoint(config, GPT(config).flat_state_dict(), tmp_path / "padded.pt")
    assert load_checkpoint(tmp_path / "padded.pt")[0].vocab_size == 50257
    # a weight the config has no place for (another architecture) is refused, not carried along
    ckpt = torch.load(tmp_path / "padded.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.attn.extra"] = torch.zeros(8)
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra\.pt: unexpected weights: h\.0\.attn\.extra"):
        load_checkpoint(tmp_path / "extra.pt")


def test_hf_configs_that_would_change_the_logits(tmp_path):
    from nanoswarm.shards.loaders import CheckpointError, check_tokenizer_vocab, load_checkpoint
    from nanoswarm.shards.writers import save_hf_checkpoint

    with pytest.raises(CheckpointError, match="vocab_size 50256 is smaller than the GPT-2 tokenizer's 50257"):
        check_tokenizer_vocab(ModelConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=50256, block_size=8), "x")
    hf = tmp_path / "hf"
    save_hf_checkpoint(SMALL, GPT(SMALL).flat_state_dict(), hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    assert load_checkpoint(hf)[0].gelu == "exact"  # HF's "gelu" is the erf form
    (hf / "config.json").write_text(json.dumps({**config, "scale_attn_weights": False}))
    with pytest.raises(CheckpointError, match="non-standard attention scaling"):
        load_checkpoint(hf)


def test_an_hf_pytorch_bin_with_its_weights_under_state_dict_loads_as_a_flat_one(tmp_path):
    """Review211: a `pytorch_model.bin` saved as {"state_dict": ...} (as training scripts do)
    loads the same weights as the flat form."""
    from safetensors.torch import load_file

    from nanoswarm.shards.loaders import load_checkpoint
    from nanoswarm.shards.writers import save_hf_checkpoint

    hf = tmp_path / "hf"
    save_hf_checkpoint(SMALL, GPT(SMALL).flat_state_dict(), hf)
    want = load_checkpoint(hf)
    sd = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    for name, saved in (("flat", sd), ("nested", {"state_dict": sd})):
        torch.save(saved, hf / "pytorch_model.bin")
        config, got = load_checkpoint(hf)
        assert config == want[0] and got.keys() == want[1].keys(), name
        assert all(torch.equal(got[k], want[1][k]) for k in got), name
